"""The options of the runner's commands (`run`, `verify`, `status`, `slurm`): one typed, validated dataclass each.

These dataclasses are the only list of the options and their defaults: `featshard.run(...)` takes their fields as
keywords, `featshard run --help` is built from them (featshard.options). Validation that needs no torch happens in
`__post_init__`; the model name, layer and weights are checked by `prepare` before any worker starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from featshard.errors import UsageError
from featshard.options import check_types, option

POOLS = ("avg", "max", "gem")
DTYPES = ("float32", "float16")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
GRAPHS = ("auto", "eager", "jit", "compile")
DECODES = ("exact", "fast", "gpu")
BACKENDS = ("pool", "inline")


def _at_least(config: Any, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise UsageError(f"--{name.replace('_', '-')} {value} is out of range (must be >= {minimum})")


@dataclass
class RunConfig:
    """`featshard run`: extract features of an image list into HDF5 shards, one shard per device."""

    input: str = option(help="list file, CSV/TSV/parquet with a 'path' column, a directory, or WebDataset tars (a "
                        ".tar, a folder of *.tar, 'shards/{00000..00099}.tar')", metavar="LIST")
    out: str = option(help="run directory (created; an existing run is resumed)", metavar="DIR")
    gpus: str | None = option(None, "0-7 | 0,2,5 | all | cpu | cpu:N (default: all GPUs, else cpu)")
    model: str = option("resnet50", "torchvision.models.get_model name (default resnet50), or timm:NAME (timm's "
                        "architecture[.pretrained_tag])")
    weights: str = option("DEFAULT", "DEFAULT | none | PATH to a state_dict or checkpoint")
    layer: str | None = option(None, "graph node to read (default: input of the classifier)")
    pool: str = option("avg", "avg | max | gem, for spatial maps (default avg)", choices=POOLS)
    normalize: bool = option(True, "store raw vectors instead of L2-normalised", flag="--no-normalize")
    dtype: str = option("float32", "stored dtype: float32 | float16", choices=DTYPES)
    precision: str = option("auto", "auto | fp32 | bf16 | fp16 (auto: fastest accurate one)", choices=PRECISIONS)
    graph: str = option("auto", "how the network runs: auto (CPU fp32: TorchScript where it measures faster, else "
                        "eager), eager, jit (TorchScript), compile (torch.compile: slow first start, worth it for long "
                        "runs)", choices=GRAPHS)
    decode: str = option("fast", "exact: plain PIL; fast: JPEG draft decode + crop folded into resize (default); "
                         "gpu: nvJPEG on the device (CPU devices: as fast)", choices=DECODES)
    batch_size: int | None = option(None, "images per model batch (default 32 CPU, 256 GPU: halved on out-of-memory)")
    loader_workers: int | None = option(None, "decode processes per device")
    chunk_size: int = option(2048, "rows per durable chunk (resume granularity)")
    max_retries: int = option(2, "retries of a shard whose worker died, stalled or hit a CUDA error")
    stall_timeout: float = option(1800.0, "seconds a worker may go without updating its progress before it is "
                                  "stopped and its shard retried (stuck in a CUDA sync, a hung write); keep it above "
                                  "the loader's timeout, max(120, 8 x --image-timeout + 60); 0: never (default 1800)")
    retry_failed: bool = option(False, "process again the rows recorded as failed (e.g. after a network mount came "
                                "back)")
    max_pixels: int = option(178_956_970, "refuse images with more pixels")
    image_timeout: float = option(60.0, "per-image open+decode deadline, seconds")
    seed: int = option(0, "seed for --weights none (same in every worker)")
    overwrite: bool = option(False, "discard an existing run in --out and start over")
    num_nodes: int | None = option(None, "nodes in the job (default from SLURM, else 1)")
    node_rank: int | None = option(None, "this node's rank (default from SLURM, else 0)")
    backend: str = option(os.environ.get("FEATSHARD_BACKEND", "pool"),
                          "pool (default) or inline (in-process, for debugging)", choices=BACKENDS)
    dry_run: bool = option(False, "print the shard plan and exit")
    progress_every: float = option(30.0, "without a terminal (a log file, SLURM): print a progress line every SECONDS "
                                   "(default 30; 0: none)", metavar="SECONDS")
    quiet: bool = option(False, "print only warnings, errors and the final line")

    def __post_init__(self) -> None:
        check_types(self)
        _at_least(self, 1, "batch_size", "chunk_size", "max_pixels", "num_nodes")
        _at_least(self, 0, "loader_workers", "max_retries", "seed", "node_rank")
        if self.progress_every < 0:
            raise UsageError(f"--progress-every {self.progress_every} must be >= 0 seconds")
        if self.image_timeout <= 0:
            raise UsageError(f"--image-timeout {self.image_timeout} must be > 0 seconds")
        if self.stall_timeout < 0:
            raise UsageError(f"--stall-timeout {self.stall_timeout} must be >= 0 seconds (0: never)")
        if not self.input:
            raise UsageError("--input is empty")
        if not self.out:
            raise UsageError("--out is empty")


@dataclass
class VerifyConfig:
    """`featshard verify`: check that every input row is accounted for exactly once."""

    run_dir: str = option(help="a run directory (made by `featshard run`)", positional=True, metavar="DIR")
    json: bool = option(False, "print the report as JSON")

    def __post_init__(self) -> None:
        check_types(self)


@dataclass
class StatusConfig:
    """`featshard status`: per-shard progress of a run, live or after a crash."""

    run_dir: str = option(help="the run directory (--out of `run` or `slurm`)", positional=True, metavar="DIR")
    json: bool = option(False, "print one JSON object instead of a table")
    stale_after: float = option(300.0, "seconds without a progress update after which an active shard is `stale` "
                                "(default 300)")

    def __post_init__(self) -> None:
        check_types(self)
        if self.stale_after <= 0:
            raise UsageError("--stale-after must be > 0")


@dataclass
class DoctorConfig:
    """`featshard doctor`: torch, CUDA, driver, GPU and faiss facts of this machine, and what would go wrong on it."""

    json: bool = option(False, "print one JSON object instead of lines")

    def __post_init__(self) -> None:
        check_types(self)


SLURM = "slurm options"
SLURM_OWN_RUN_OPTIONS = ("input", "out", "gpus", "num_nodes", "node_rank", "dry_run")  # set by slurm for every task


@dataclass
class SlurmConfig:
    """`featshard slurm`: write (and submit) a SLURM job array running `featshard run`, plus a dependent merge job.
    `run_options` are `run`'s own options for every task (keywords of RunConfig)."""

    input: str = option(help="list file, CSV/TSV/parquet, directory or tars (as for `run`)", group=SLURM)
    out: str = option(help="run directory on a filesystem every node sees", group=SLURM)
    nodes: int = option(help="array tasks (one node's share of the shards each)", group=SLURM)
    gpus_per_node: int = option(help="GPUs per task (--gres=gpu:G); 0 = CPU only", group=SLURM)
    cpu_workers_per_node: int | None = option(None, "CPU workers per task with 0 GPUs", group=SLURM)
    cpus_per_gpu: int = option(16, "CPUs per GPU (or CPU worker): the GPU's model worker and its decode processes "
                               "(default 16; with 4, about 3 decode processes kept a fast GPU waiting for images)",
                               group=SLURM)
    exclusive: bool = option(False, "whole nodes (#SBATCH --exclusive): every CPU of the node feeds its GPUs, "
                             "instead of --cpus-per-gpu per GPU", group=SLURM)
    merge_gpu: bool | None = option(None, "the merge job asks for one GPU (--gres=gpu:1) and merges on it "
                                    "(--no-merge-gpu: on CPUs, `merge --no-gpu`; default: a GPU when the extraction "
                                    "has GPUs and a GPU build of faiss is installed)", group=SLURM)
    partition: str | None = option(None, "partition", group=SLURM)
    account: str | None = option(None, "account", group=SLURM)
    time: str | None = option(None, "time limit per task, e.g. 04:00:00 (default: the partition's)", group=SLURM)
    mem: str | None = option(None, "memory per task, e.g. 64G (default: the partition's)", group=SLURM)
    array_parallelism: int | None = option(None, "at most K tasks at once (%%K)", group=SLURM)
    signal: str = option("B:USR2@90", "warning signal before the limit (default B:USR2@90)", group=SLURM)
    max_requeues: int = option(3, "self-requeues per task on the signal (default 3)", group=SLURM)
    sbatch_arg: list[str] = option([], "extra #SBATCH line (both jobs)", metavar="ARG", group=SLURM)
    merge_arg: list[str] = option([], "extra `featshard merge` option", metavar="ARG", group=SLURM)
    python: str | None = option(None, "Python that runs featshard on the nodes (default: this one)", group=SLURM)
    dry_run: bool = option(False, "print the shard plan and both scripts", group=SLURM)
    submit: bool = option(False, "sbatch the array, then the merge (afterok)", group=SLURM)
    run_options: dict[str, Any] = option({}, "`run` options for every task", passthrough=RunConfig,
                                         skip=SLURM_OWN_RUN_OPTIONS,
                                         group="run options (passed to `featshard run` unchanged)")

    def __post_init__(self) -> None:
        check_types(self)
        if self.dry_run and self.submit:
            raise UsageError("--dry-run and --submit exclude each other")
        if self.nodes < 1:
            raise UsageError("--nodes must be >= 1")
        if self.gpus_per_node < 0:
            raise UsageError("--gpus-per-node must be >= 0")
        if self.gpus_per_node > 0 and self.cpu_workers_per_node is not None:
            raise UsageError("--cpu-workers-per-node is for CPU-only jobs (--gpus-per-node 0)")
        merge_gpu_args = [a for a in self.merge_arg if a in ("--gpu", "--no-gpu")]
        if merge_gpu_args:
            raise UsageError(f"--merge-arg={merge_gpu_args[0]}: use --merge-gpu / --no-merge-gpu, which also ask "
                             "SLURM for the GPU the merge uses")
        _at_least(self, 1, "cpu_workers_per_node", "cpus_per_gpu", "array_parallelism")
        _at_least(self, 0, "max_requeues")
        allowed = set(RunConfig.__dataclass_fields__) - set(SLURM_OWN_RUN_OPTIONS)
        unknown = sorted(set(self.run_options) - allowed)
        if unknown:
            raise UsageError(f"run_options: {unknown} are not `run` options slurm passes on (allowed: "
                             f"{', '.join(sorted(allowed))})")
        if self.run_options.get("overwrite"):
            raise UsageError("--overwrite is refused for SLURM jobs: every task (and every requeued task) would wipe "
                             "the others' work; remove the run directory yourself or use a new --out")



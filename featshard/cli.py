"""Command line: `python -m featshard COMMAND ...`. Thin: parse into the command's config dataclass (its options are
built from the dataclass, featshard.options), call the API function, print its result, map errors to exit codes
(FeatshardError 1, UsageError 2, a stop signal 128+N)."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Sequence

from featshard import __version__, api
from featshard.errors import FeatshardError
from featshard.logs import default_level, setup_logging
from featshard.options import add_options, from_namespace

if TYPE_CHECKING:  # the configs are imported when their command runs (keeps `--help` and `status` light)
    from featshard.index.config import AddConfig, DedupConfig, MergeConfig, SearchConfig
    from featshard.runner.config import DoctorConfig, RunConfig, SlurmConfig, StatusConfig, VerifyConfig
    from featshard.tools.config import BenchConfig, DemoConfig, ExportConfig, ServeConfig

# command -> (config class "module:Class", one-line help); only the invoked command's config module is imported
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("featshard.runner.config:RunConfig", "extract features of an image list into HDF5 shards"),
    "merge": ("featshard.index.config:MergeConfig", "build one faiss index from a run's shards"),
    "search": ("featshard.index.config:SearchConfig", "find the nearest images of query images"),
    "verify": ("featshard.runner.config:VerifyConfig", "check that every input row is accounted for exactly once"),
    "dedup": ("featshard.index.config:DedupConfig", "find exact and near-duplicate groups"),
    "add": ("featshard.index.config:AddConfig", "add another run's vectors to an existing index"),
    "export": ("featshard.tools.config:ExportConfig",
               "write a run's vectors as clip-retrieval npy + parquet, or parquet"),
    "status": ("featshard.runner.config:StatusConfig", "per-shard progress of a run, live or after a crash"),
    "slurm": ("featshard.runner.config:SlurmConfig", "write (and submit) SLURM job-array scripts for a run"),
    "doctor": ("featshard.runner.config:DoctorConfig", "torch, CUDA, driver, GPU and faiss facts of this machine"),
    "bench": ("featshard.tools.config:BenchConfig", "measure decode, model and end-to-end throughput side by side"),
    "demo": ("featshard.tools.config:DemoConfig", "build the embedded demo set and run run/merge/search on it"),
    "serve": ("featshard.tools.config:ServeConfig", "HTTP search service and result gallery over a run's index"),
}


def config_class(name: str) -> type:
    module, _, cls = COMMANDS[name][0].partition(":")
    found: type = getattr(importlib.import_module(module), cls)
    return found


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Only the invoked command's options are built (keeps `--help`, `status` and `--dry-run` light)."""
    parser = argparse.ArgumentParser(prog="featshard", description=__doc__)
    parser.add_argument("--version", action="version", version=f"featshard {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (_, help_text) in COMMANDS.items():
        if name != chosen:
            sub.add_parser(name, help=help_text)
            continue
        cls = config_class(name)
        p = sub.add_parser(name, help=help_text, description=cls.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_options(p, cls)
        p.set_defaults(_config=cls)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    setup_logging(args.log_level or default_level())  # each command sets it: an in-process caller may call main again
    if not getattr(args, "_config", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        config = from_namespace(args._config, args)
        return SHOW[args.command](config)
    except FeatshardError as exc:
        print(f"featshard {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        if exc.name != "faiss":
            raise
        print(f"featshard {args.command}: error: faiss is not installed: pip install 'featshard[cpu]' (or "
              "'featshard[gpu]'; in this repository: make install, or make install GPU=1)", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `featshard search ... | head`: the reader went away; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"featshard {args.command}: interrupted", file=sys.stderr)
        return 130


def _json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, ensure_ascii=False, sort_keys=True)
    sys.stdout.write("\n")


def _run(config: RunConfig) -> int:
    summary = api.run.with_config(config)
    if config.dry_run:
        _json({"rows": summary.rows, "input_sha256": summary.input_sha256, "num_nodes": summary.num_nodes,
               "plan": summary.plan})
    return 0


def _merge(config: MergeConfig) -> int:
    api.merge.with_config(config)
    return 0


def _search(config: SearchConfig) -> int:
    from featshard.index.search import render_csv, render_table

    results = api.search.with_config(config)
    if config.json:
        _json([r.to_dict() for r in results])
    else:
        sys.stdout.write(render_csv(results) if config.csv else render_table(results))
    return 1 if any(r.error is not None for r in results) else 0


def _verify(config: VerifyConfig) -> int:
    from featshard.runner.verifyreport import render

    report = api.verify.with_config(config)
    print(json.dumps(report.to_dict(), indent=2) if config.json else render(report))
    return 0 if report.ok else 1


def _dedup(config: DedupConfig) -> int:
    from featshard.index.dedup import output_format, render

    result = api.dedup.with_config(config)
    if not config.out:
        sys.stdout.write(render(result, output_format(config)))
    return 0


def _add(config: AddConfig) -> int:
    api.add.with_config(config)
    return 0


def _export(config: ExportConfig) -> int:
    result = api.export.with_config(config)
    print(f"exported {result.rows} vectors (dim {result.dim}, {result.dtype}) as {result.format} into {result.out} "
          f"({len(result.files)} files)")
    return 0


def _status(config: StatusConfig) -> int:
    from featshard.runner.status import render_any

    status = api.status.with_config(config)
    print(json.dumps(status, indent=2, sort_keys=True) if config.json else render_any(status))
    return 0


def _slurm(config: SlurmConfig) -> int:
    import shlex

    from featshard.runner.slurm import slurm_job

    job = slurm_job(config)
    extract, merge = shlex.quote(str(job.extract_script)), shlex.quote(str(job.merge_script))
    if config.dry_run:
        print(job.plan)
        for path in (job.extract_script, job.merge_script):
            print(f"\n# ===== {path} =====")
            print(path.read_text(encoding="utf-8"), end="")
        print(f"\n# dry run: nothing submitted (submit with --submit, or: sbatch {extract})")
    elif not config.submit:
        print(f"wrote {job.extract_script}\nwrote {job.merge_script}\nsubmit with --submit, or by hand:\n"
              f"  id=$(sbatch --parsable {extract})\n  sbatch --dependency=afterok:$id {merge}")
    else:
        print(f"extract array job {job.extract_job} ({job.nodes} task(s)), logs in {job.logs}")
        print(f"merge job {job.merge_job} (after the whole array succeeds)")
        print(f"progress: {shlex.quote(job.python)} -m featshard status {shlex.quote(job.out)}")
    return 0


def _doctor(config: DoctorConfig) -> int:
    report = api.doctor.with_config(config)
    if config.json:
        _json(report.to_dict())
    else:
        for key, value in report.facts.items():
            print(f"{key:<24} {json.dumps(value) if isinstance(value, (dict, list)) else value}")
        for problem in report.problems:
            print(f"PROBLEM: {problem}")
        print("ok" if report.ok else f"{len(report.problems)} problem(s)")
    return 0 if report.ok else 1


def _bench(config: BenchConfig) -> int:
    from featshard.tools.bench import bench
    from featshard.tools.benchreport import table

    result = bench(config)
    print(table(result))
    print(f"wrote {os.path.join(config.out, 'bench.json')} and {os.path.join(config.out, 'bench.png')}")
    return 0


def _demo(config: DemoConfig) -> int:
    from featshard.tools.demo import demo

    print(demo(config))
    return 0


def _serve(config: ServeConfig) -> int:
    api.serve.with_config(config)
    return 0


# command -> presenter: calls the API with the config, prints the result, returns the exit status
SHOW: dict[str, Callable[..., int]] = {
    "run": _run, "merge": _merge, "search": _search, "verify": _verify, "dedup": _dedup, "add": _add,
    "export": _export, "status": _status, "slurm": _slurm, "doctor": _doctor, "bench": _bench, "demo": _demo,
    "serve": _serve,
}

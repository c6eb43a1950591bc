"""The end-of-run report: `summary.json` (rows, ok, failed, speed, stage timings) and a one-line verdict."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from featshard.errors import FeatshardError
from featshard.runner.prepare import Prepared
from featshard.runner.shardspec import STAGES, ShardResult
from featshard.store.plan import Shard


@dataclass
class RunSummary:
    """What `featshard.run` returns and `summary.json` holds: rows, ok, failed, speed, per-shard details, stage
    timings, the verdict. A dry run fills `plan` (and `input_sha256`, `num_nodes`) and nothing else."""

    run_dir: str
    rows: int
    ok: int = 0
    failed: int = 0
    complete: bool = False
    images_per_s: float = 0.0
    wall_seconds: float = 0.0
    resumed_rows: int = 0
    processed_rows: int = 0
    retried_rows: int = 0
    recovered_rows: int = 0
    fingerprint: str = ""
    verdict: str = ""
    errors: dict[str, str] = field(default_factory=dict)
    shards: list[dict[str, Any]] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    graphs: list[str] = field(default_factory=list)
    batch_size_used: int = 0  # the smallest model batch a shard ended with (halved on CUDA out-of-memory)
    plan: list[dict[str, Any]] = field(default_factory=list)
    input_sha256: str = ""
    num_nodes: int = 1
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunSummary":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class RunIncomplete(FeatshardError):
    """Some shards did not complete (their errors are in `summary.errors`); the same command resumes."""

    def __init__(self, message: str, summary: RunSummary) -> None:
        super().__init__(message)
        self.summary = summary


def summarize(p: Prepared, mine: list[Shard], results: list[ShardResult], errors: dict[str, str],
              start_rows: dict[str, int] | None = None, retries: dict[str, list[int]] | None = None) -> RunSummary:
    """`resumed_rows`: rows found done when the command started; `processed_rows`: rows this command finished
    (a retried shard's rows are counted once; its attempts are listed)."""
    start_rows, retries = start_rows or {}, retries or {}
    wall = max((r.seconds for r in results), default=0.0)
    per_shard = [shard_entry(r, start_rows.get(r.shard, r.resumed_rows), retries.get(r.shard, [])) for r in results]
    processed = sum(e["processed_rows"] for e in per_shard)
    extracted = sum(r.processed_rows for r in results)  # by the attempts that returned: the speed's numerator
    stages = total_stages(results)
    return RunSummary.from_dict({
        "run_dir": p.run_dir, "fingerprint": p.fingerprint, "rows": sum(s.rows for s in mine),
        "ok": sum(r.ok for r in results), "failed": sum(r.failed for r in results),
        "resumed_rows": sum(start_rows.values()) if start_rows else sum(e["resumed_rows"] for e in per_shard),
        "processed_rows": processed,
        "retried_rows": sum(r.retried_rows for r in results), "recovered_rows": sum(r.recovered_rows for r in results),
        "wall_seconds": round(wall, 3), "images_per_s": round(extracted / wall, 2) if wall > 0 else 0.0,
        "shards": per_shard, "errors": errors, "complete": not errors and len(results) == len(mine),
        "stages": stages, "graphs": sorted({r.graph for r in results if r.graph}),
        "batch_size_used": min((r.batch_size_used for r in results if r.batch_size_used), default=0),
        "verdict": verdict_of(stages, p.model.precision, p.prep.decode) if results or not errors
        else "no shard completed: see errors",
    })


def shard_entry(r: ShardResult, resumed: int, retries: list[int]) -> dict[str, Any]:
    return {
        "shard": r.shard, "device": r.device, "device_uuid": r.device_uuid, "device_name": r.device_name,
        "rows": r.rows, "ok": r.ok, "failed": r.failed,
        "resumed_rows": resumed, "processed_rows": r.rows - resumed, "seconds": round(r.seconds, 3),
        "images_per_s": round(r.images_per_s, 2), "stages": {k: round(v, 3) for k, v in r.stages.items()},
        "graph": r.graph, "batch_size_used": r.batch_size_used,
        "retried_rows": r.retried_rows, "recovered_rows": r.recovered_rows,
        "retries": len(retries), "retry_resumed_rows": retries,
        "last_attempt": {"resumed_rows": r.resumed_rows, "processed_rows": r.processed_rows},
    }


def total_stages(results: list[ShardResult]) -> dict[str, float]:
    return {k: round(sum(r.stages.get(k, 0.0) for r in results), 3) for k in STAGES}


def verdict_of(stages: dict[str, float], precision: str = "fp32", decode: str = "fast") -> str:
    """Which stage bound the run (steady state: the loaders' start-up is not counted), and what to change.

    The stages overlap on a GPU (featshard.runner.pipeline): the share of each is taken of the loop's wall time
    (`loop`) when known, else of their sum (a serial loop). The device decode (`--decode gpu`, booked as `decode`)
    and the model share the device: the larger of the two is the device's bound."""
    model = stages.get("model", 0.0) + stages.get("h2d", 0.0)
    device_decode = stages.get("decode", 0.0)
    wait, write = stages.get("wait_data", 0.0), stages.get("write", 0.0)
    total = stages.get("loop", 0.0) or model + device_decode + wait + write
    if total <= 0:
        return "nothing processed (everything was already done)"
    if wait > 0.25 * total:
        hint = "use --decode fast, " if decode == "exact" else ""
        return (f"decode-bound: {100 * wait / total:.0f}% of the worker's time spent waiting for images; add "
                f"--loader-workers, {hint}or install pillow-simd (make install-simd)")
    if write > 0.25 * total:
        return f"write-bound: {100 * write / total:.0f}% of the time writing; use a faster disk or --dtype float16"
    if device_decode > model:
        return (f"device-decode-bound: {100 * min(1.0, device_decode / total):.0f}% of the time decoding JPEGs on "
                f"the device, more than the model; --decode fast with more --loader-workers may be faster")
    hint = ("--precision auto chose fp32 (no native bf16 here): use a GPU or a CPU with bf16, "
            if precision == "fp32" else "")
    return (f"model-bound: {100 * min(1.0, model / total):.0f}% of the time in the model; {hint}--graph compile for "
            "long runs, a bigger --batch-size, or more devices")


def verdict(summary: RunSummary) -> str:
    return f"verdict: {summary.verdict}"

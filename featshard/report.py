"""The end-of-run report: `summary.json` (rows, ok, failed, speed, stage timings) and a one-line verdict."""
from __future__ import annotations

from typing import Any

from featshard.plan import Shard
from featshard.prepare import Prepared
from featshard.worker import ShardResult

STAGES = ("load_model", "wait_data", "h2d", "model", "write")


def summarize(p: Prepared, mine: list[Shard], results: list[ShardResult], errors: dict[str, str]) -> dict[str, Any]:
    wall = max((r.seconds for r in results), default=0.0)
    processed = sum(r.processed_rows for r in results)
    per_shard = [{
        "shard": r.shard, "device": r.device, "rows": r.rows, "ok": r.ok, "failed": r.failed,
        "resumed_rows": r.resumed_rows, "processed_rows": r.processed_rows, "seconds": round(r.seconds, 3),
        "images_per_s": round(r.images_per_s, 2), "stages": {k: round(v, 3) for k, v in r.stages.items()},
    } for r in results]
    stages = total_stages(results)
    return {
        "run_dir": p.run_dir, "fingerprint": p.fingerprint, "rows": sum(s.rows for s in mine),
        "ok": sum(r.ok for r in results), "failed": sum(r.failed for r in results),
        "resumed_rows": sum(r.resumed_rows for r in results), "processed_rows": processed,
        "wall_seconds": round(wall, 3), "images_per_s": round(processed / wall, 2) if wall > 0 else 0.0,
        "shards": per_shard, "errors": errors, "complete": not errors and len(results) == len(mine),
        "stages": stages, "verdict": verdict_of(stages),
    }


def total_stages(results: list[ShardResult]) -> dict[str, float]:
    return {k: round(sum(r.stages.get(k, 0.0) for r in results), 3) for k in STAGES}


def verdict_of(stages: dict[str, float]) -> str:
    """Which stage bound the run, and what to change."""
    busy = stages.get("model", 0.0) + stages.get("h2d", 0.0)
    wait, write = stages.get("wait_data", 0.0), stages.get("write", 0.0)
    total = busy + wait + write
    if total <= 0:
        return "nothing processed (everything was already done)"
    if wait > 0.25 * total:
        return (f"decode-bound: {100 * wait / total:.0f}% of the worker's time spent waiting for images; add "
                "--loader-workers, use --decode fast, or install pillow-simd (make install-simd)")
    if write > 0.25 * total:
        return f"write-bound: {100 * write / total:.0f}% of the time writing; use a faster disk or --dtype float16"
    return (f"model-bound: {100 * busy / total:.0f}% of the time in the model; use --precision auto (bf16/fp16), "
            "a bigger --batch-size, or more devices")


def verdict(summary: dict[str, Any]) -> str:
    return f"verdict: {summary.get('verdict', '')}"

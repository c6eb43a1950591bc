"""`featshard status DIR`: per-shard progress of a run from what is on disk, while it runs or after a crash.

Reads `manifest.json` (the plan), each shard's `progress.json` (written by its worker) and the finished shard files
(whose sizes win over a stale progress file). A shard with no progress file is `pending`; an active shard whose
progress is older than --stale-after seconds, or whose process is gone on this host, is `stale`. `durable` counts
the rows in finished chunk files: what a resumed run keeps.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from featshard.runner.config import StatusConfig
from featshard.store.manifest import load_manifest
from featshard.store.plan import shard_name
from featshard.store.progress import read_progress
from featshard.store.rundir import RunDir, chunk_range
from featshard.system import pid_alive

ACTIVE = ("starting", "running", "finalizing")



def durable_rows(run_dir: str, name: str) -> int:
    """Rows covered by finished chunk files (a chunk file that exists is complete: written atomically)."""
    try:
        entries = os.listdir(RunDir(run_dir).parts(name))
    except OSError:
        return 0
    return sum(r[1] - r[0] for r in map(chunk_range, entries) if r)


def finished_sizes(path: Path) -> tuple[int, int] | None:
    """(ok, failed) of a complete shard file, None when it is missing, torn or not complete."""
    if not path.is_file():
        return None
    try:
        import h5py

        with h5py.File(path, "r") as h5:
            if not bool(h5.attrs.get("complete", False)):
                return None
            return int(h5["rows"].shape[0]), int(h5["failed_rows"].shape[0])
    except (OSError, KeyError):
        return None


def is_stale(progress: dict[str, Any], now: float, stale_after: float, host: str) -> bool:
    if now - float(progress.get("updated") or 0) > stale_after:
        return True
    pid = progress.get("pid")
    return progress.get("host") == host and isinstance(pid, int) and not pid_alive(pid)


def shard_status(run_dir: str, entry: dict[str, Any], now: float, stale_after: float, host: str) -> dict[str, Any]:
    name = shard_name(int(entry["index"]), int(entry["count"]))
    total = int(entry["stop"]) - int(entry["start"])
    progress = read_progress(run_dir, name) or {}
    row: dict[str, Any] = {
        "shard": name, "node": entry.get("node", 0), "device": progress.get("device") or entry.get("device"),
        "rows_total": total, "rows_done": 0, "ok": 0, "failed": 0, "durable": 0, "images_per_s": 0.0,
        "eta_s": None, "state": "pending", "stage": progress.get("stage"),
        "retries": int(progress.get("retries") or 0), "started": progress.get("started"),
        "updated": progress.get("updated"), "pid": progress.get("pid"), "host": progress.get("host"),
        "error": progress.get("error"),
    }
    sizes = finished_sizes(RunDir(run_dir).shard(name))
    if sizes is not None:
        ok, failed = sizes
        row.update(state="complete", stage="done", ok=ok, failed=failed, rows_done=ok + failed, durable=ok + failed,
                   images_per_s=float(progress.get("images_per_s") or 0.0), error=None)
        return row
    row["durable"] = durable_rows(run_dir, name)
    row["rows_done"] = row["durable"]
    if progress:
        row.update(rows_done=max(int(progress.get("rows_done") or 0), row["durable"]),
                   ok=int(progress.get("ok") or 0), failed=int(progress.get("failed") or 0),
                   images_per_s=float(progress.get("images_per_s") or 0.0), state=progress.get("state", "running"))
        if row["state"] in ACTIVE and is_stale(progress, now, stale_after, host):
            row["state"] = "stale"
        elif row["state"] == "complete":
            row["state"] = "incomplete"  # the worker said complete but no complete shard file is there
    if row["state"] not in ACTIVE:
        row["images_per_s"] = 0.0
    row["eta_s"] = eta(total, row["rows_done"], row["images_per_s"])
    return row


def eta(rows: int, done: int, rate: float) -> float | None:
    """Seconds left at `rate` (the workers' images/s over their last minute); None when nothing runs or is left."""
    return round((rows - done) / rate, 1) if rate > 0 and done < rows else None


def totals(shards: list[dict[str, Any]], rows: int) -> dict[str, Any]:
    """The sums over `shards` (of `rows` rows in all), with `nodes`: the same per node of a multi-node job, and
    `eta_s`: the whole job's (see `job_eta`)."""
    sums = _sums(shards, rows)
    sums["nodes"] = []
    for node in sorted({int(s["node"]) for s in shards}):
        group = [s for s in shards if int(s["node"]) == node]
        sums["nodes"].append({"node": node, **_sums(group, sum(s["rows_total"] for s in group))})
    sums["eta_s"] = job_eta(sums, sums["nodes"])
    return sums


def _sums(shards: list[dict[str, Any]], rows: int) -> dict[str, Any]:
    states: dict[str, int] = {}
    for s in shards:
        states[s["state"]] = states.get(s["state"], 0) + 1
    done = sum(s["rows_done"] for s in shards)
    rate = sum(s["images_per_s"] for s in shards if s["state"] in ACTIVE)
    return {
        "shards": len(shards), "states": states, "rows": rows, "rows_done": done,
        "durable": sum(s["durable"] for s in shards), "ok": sum(s["ok"] for s in shards),
        "failed": sum(s["failed"] for s in shards), "images_per_s": round(rate, 2),
        "eta_s": eta(rows, done, rate), "retries": sum(s.get("retries", 0) for s in shards),
        "complete": bool(shards) and states.get("complete", 0) == len(shards),
    }


def job_eta(job: dict[str, Any], nodes: list[dict[str, Any]]) -> float | None:
    """The whole job's ETA, its nodes' shards all being in the one manifest: the later of the slowest running node's
    own ETA and every row left done at the current total rate (nodes that have not started yet, an array running
    a few tasks at a time, get theirs done at that rate); None while no shard runs."""
    if job["eta_s"] is None:
        return None
    return max([job["eta_s"]] + [n["eta_s"] for n in nodes if n["eta_s"] is not None])


def collect(run_dir: str, stale_after: float = 300.0, now: float | None = None) -> dict[str, Any]:
    """The whole status as one dict (what --json prints)."""
    manifest = load_manifest(run_dir)
    now = time.time() if now is None else now
    host = socket.gethostname()
    shards = [shard_status(run_dir, e, now, stale_after, host) for e in manifest.get("plan") or []]
    jobs_file = RunDir(run_dir).slurm_jobs
    try:
        slurm = json.loads(jobs_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        slurm = None
    return {
        "run_dir": os.path.abspath(run_dir), "fingerprint": manifest.get("fingerprint"),
        "rows": int(manifest.get("rows") or 0), "now": now, "shards": shards,
        "totals": totals(shards, int(manifest.get("rows") or 0)), "slurm": slurm,
        "index": RunDir(run_dir).index_file.is_file(),
    }


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def render(status: dict[str, Any]) -> str:
    t = status["totals"]
    lines = [f"run {status['run_dir']}: {status['rows']} rows in {t['shards']} shards"
             f" (fingerprint {status['fingerprint']})"]
    if status["slurm"]:
        jobs = status["slurm"]
        lines.append(f"slurm: extract array job {jobs.get('extract')}, merge job {jobs.get('merge')}")
    lines.append(f"{'shard':<22} {'node':>4} {'device':<7} {'state':<10} {'stage':<20} {'done/total':>15} {'ok':>8} "
                 f"{'failed':>7} {'img/s':>8} {'eta':>7} {'retries':>7} {'updated':>8}  pid@host")
    lines += [_shard_line(s, status["now"]) for s in status["shards"]]
    if len(t["nodes"]) > 1:
        lines += [f"node {n['node']}: {_states(n)}; {figures(n)}" for n in t["nodes"]]
    lines.append(f"total: {_states(t)}; {figures(t, durable=True)}" + (" (whole job)" if len(t["nodes"]) > 1 else "")
                 + ("; index built" if status["index"] else ""))
    return "\n".join(lines)


def _shard_line(s: dict[str, Any], now: float) -> str:
    updated = age(now - s["updated"]) if s["updated"] else "-"
    who = f"{s['pid']}@{s['host']}" if s["pid"] else "-"
    error = f"  error: {s['error']}" if s["error"] else ""
    stage = s.get("stage") or "-"
    return (f"{s['shard']:<22} {s['node']:>4} {str(s['device']):<7} {s['state']:<10} {stage:<20} "
            f"{str(s['rows_done']) + '/' + str(s['rows_total']):>15} {s['ok']:>8} {s['failed']:>7} "
            f"{s['images_per_s']:>8.1f} {age(s.get('eta_s')):>7} {s.get('retries', 0):>7} {updated:>8}  {who}{error}")


def _states(t: dict[str, Any]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(t["states"].items())) or "no shards"


def figures(t: dict[str, Any], durable: bool = False) -> str:
    """The figures of `totals` (or of a node in it) as one phrase: the status total line and the run's plain
    progress lines say the same thing the same way."""
    pct = 100.0 * t["rows_done"] / t["rows"] if t["rows"] else 100.0
    kept = f"{t['durable']} durable, " if durable else ""
    eta_text = f", eta {age(t['eta_s'])}" if t["eta_s"] is not None else ""
    retries = f", {t['retries']} retries" if t.get("retries") else ""
    return (f"{t['rows_done']}/{t['rows']} rows ({pct:.1f}%), {kept}{t['ok']} ok, {t['failed']} failed, "
            f"{t['images_per_s']:.1f} images/s{eta_text}{retries}")


def run_status(config: StatusConfig) -> dict[str, Any]:
    """`featshard status` as a function: the whole status as one dict (what --json prints); a run whose SLURM jobs
    are submitted but not started yet (no manifest) has `waiting` set and no shards."""
    paths = RunDir(config.run_dir)
    if not paths.manifest.is_file() and paths.slurm_jobs.is_file():
        return {"run_dir": os.path.abspath(config.run_dir), "slurm": json.loads(paths.slurm_jobs.read_text("utf-8")),
                "shards": [], "totals": None, "waiting": True}
    return collect(config.run_dir, config.stale_after)


def render_any(status: dict[str, Any]) -> str:
    if status.get("waiting"):
        return (f"run {status['run_dir']}: slurm jobs {status['slurm']} submitted; no task has started yet "
                "(no manifest.json)")
    return render(status)

"""The resume state of a shard: which chunks are finished (a chunk file that exists, opens, says complete and has
the run's fingerprint is done; anything else is redone), and the temp files (`*.tmp-<pid>`) a killed writer left,
removed when the shard starts again."""
from __future__ import annotations

import logging
from pathlib import Path

from featshard.runner.shardspec import ShardSpec
from featshard.store import shards
from featshard.store.atomic import TMP_MARK
from featshard.store.plan import chunk_ranges
from featshard.store.rundir import RunDir

log = logging.getLogger("featshard.resume")


def clean_stale(spec: ShardSpec) -> None:
    """Remove what a killed writer of this shard may have left: torn `*.tmp-<pid>` files; the chunk folder of a
    shard whose file is complete (killed between the final rename and the clean-up)."""
    name, run_dir = spec.shard.name, spec.run_dir
    paths = RunDir(run_dir)
    final, parts = paths.shard(name), paths.parts(name)
    stale = [*final.parent.glob(f"{final.name}{TMP_MARK}*"),
             *paths.shards.glob(f"{paths.progress(name).name}{TMP_MARK}*"),
             *(parts.glob(f"*{TMP_MARK}*") if parts.is_dir() else [])]
    for path in stale:
        log.info("removing %s, left by an interrupted write", path)
        path.unlink(missing_ok=True)
    if parts.is_dir() and shards.is_complete(final):
        shards.remove_tree(parts)


def chunk_usable(path: Path, fingerprint: str | None) -> bool:
    """A chunk file counts as done when it opens, says complete and has this run's fingerprint."""
    if not path.is_file():
        return False
    try:
        attrs = shards.read_attrs(path)
    except (OSError, KeyError):
        attrs = {}
    ok = bool(attrs.get("complete")) and (fingerprint is None or attrs.get("fingerprint") == fingerprint)
    if not ok:
        log.warning("%s is unreadable, incomplete or from another config: redoing that chunk", path)
    return ok


def durable_chunks(spec: ShardSpec) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(finished, pending) chunk ranges of an unfinished shard, from the chunk files on disk."""
    chunks = chunk_ranges(spec.shard.start, spec.shard.stop, spec.chunk_size)
    fp = spec.attrs.get("fingerprint")
    done = {c for c in chunks if chunk_usable(RunDir(spec.run_dir).chunk(spec.shard.name, *c), fp)}
    return [c for c in chunks if c in done], [c for c in chunks if c not in done]


def durable_rows(spec: ShardSpec) -> int:
    """Rows of this shard already on disk: all of them for a complete shard file, else those of finished chunks."""
    if shards.is_complete(RunDir(spec.run_dir).shard(spec.shard.name)):
        return spec.shard.rows
    done, _ = durable_chunks(spec)
    return sum(hi - lo for lo, hi in done)

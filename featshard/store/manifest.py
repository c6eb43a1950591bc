"""The run manifest (`DIR/manifest.json`): full config, fingerprint, row count and shard plan."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from featshard.errors import FeatshardError

MANIFEST = "manifest.json"


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON to a temp file, fsync, rename: readers see the old or the new file, never half of one."""
    path = str(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, ensure_ascii=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def fingerprint_of(fields: dict[str, Any]) -> str:
    """A short stable hash of everything that changes the vectors."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def diff_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable list of what differs between two fingerprint field sets."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def manifest_path(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / MANIFEST


def load_manifest(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = manifest_path(run_dir)
    if not path.is_file():
        raise FeatshardError(f"{run_dir} is not a featshard run: no {MANIFEST} (run `featshard run` first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise FeatshardError(f"{path} is not valid JSON: {exc}") from exc


def write_manifest(run_dir: str | os.PathLike[str], data: dict[str, Any]) -> None:
    write_json_atomic(manifest_path(run_dir), data)

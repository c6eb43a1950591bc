"""The run manifest (`DIR/manifest.json`): full config, fingerprint, row count and shard plan."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from featshard.errors import FeatshardError
from featshard.store.atomic import write_json_atomic
from featshard.store.rundir import RunDir



def fingerprint_of(fields: dict[str, Any]) -> str:
    """A short stable hash of everything that changes the vectors."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def diff_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable list of what differs between two fingerprint field sets."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]



def load_manifest(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = RunDir(run_dir).manifest
    if not path.is_file():
        raise FeatshardError(f"{run_dir} is not a featshard run: no manifest.json (run `featshard run` first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise FeatshardError(f"{path} is not valid JSON: {exc}") from exc


def write_manifest(run_dir: str | os.PathLike[str], data: dict[str, Any]) -> None:
    write_json_atomic(RunDir(run_dir).manifest, data)

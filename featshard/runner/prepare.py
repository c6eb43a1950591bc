"""Prepare a run: validate every input up front, resolve the config, fingerprint it, write or check the manifest.

Everything here fails fast with a clear message (bad list, unknown model/layer, unreadable weights, out dir that is a
file, a changed config on an existing run) before any worker starts.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from featshard import __version__
from featshard.runner.devices import Device
from featshard.errors import FeatshardError, UsageError
from featshard.extract.graph import check_graph
from featshard.store.inputs import InputSource, open_input, scan_input
from featshard.store.manifest import diff_fields, fingerprint_of, manifest_path, load_manifest, write_manifest
from featshard.extract.models import ModelSpec, check_model_name, preprocess_for, resolve_precision, weights_identity
from featshard.store.plan import Shard, plan_shards
from featshard.extract.preprocess import Preprocess
from featshard.extract.timmmodels import HEAD_LAYER, HEAD_POOL, is_timm, timm_fields

log = logging.getLogger("featshard.runner.prepare")
DTYPES = ("float32", "float16")


@dataclass
class Prepared:
    run_dir: str
    source: InputSource
    rows: int
    input_sha256: str
    model: ModelSpec
    prep: Preprocess
    dtype: str
    dim: int
    fingerprint: str
    fields: dict[str, Any]
    plan: list[Shard]
    chunk_size: int
    manifest: dict[str, Any]


def versions() -> dict[str, str]:
    import h5py
    import numpy
    import PIL
    import torch
    import torchvision

    out = {"featshard": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
           "numpy": numpy.__version__, "h5py": h5py.__version__, "pillow": PIL.__version__,
           "python": platform.python_version()}
    if "timm" in sys.modules:  # imported by a timm model: not imported just to say its version
        out["timm"] = sys.modules["timm"].__version__
    return out


def check_out_dir(out: str) -> str:
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out!r} exists and is not a directory")
    try:
        (path / "shards").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out!r}: cannot create it: {exc}") from exc
    return str(path.resolve())


def model_spec(args: Any, device_kind: str) -> ModelSpec:
    check_model_name(args.model)
    weights = args.weights
    if weights.lower() == "none":
        weights = "none"
    elif weights.upper() == "DEFAULT":
        weights = "DEFAULT"
    else:
        weights = os.path.abspath(os.path.expanduser(weights))
    if args.pool not in ("avg", "max", "gem"):
        raise UsageError(f"--pool {args.pool!r}: choose avg, max or gem")
    pool = args.pool
    if is_timm(args.model) and args.layer in (None, HEAD_LAYER):
        if pool != "avg":
            raise UsageError(f"--pool {pool} applies with --layer: a timm model's default features (its pre-logits) "
                             "are pooled by the model itself")
        pool = HEAD_POOL
    precision = resolve_precision(args.precision, device_kind)
    graph = getattr(args, "graph", "auto")
    check_graph(graph, precision)
    return ModelSpec(name=args.model, weights=weights, layer=args.layer, pool=pool,
                     normalize=not args.no_normalize, precision=precision, seed=args.seed, graph=graph)


def probe_model(spec: ModelSpec, prep: Preprocess) -> tuple[str, int]:
    """Build the model once here so a bad model/layer/weights file fails before any worker starts."""
    from featshard.extract.extractor import Extractor

    ext = Extractor(replace(spec, graph="eager"), prep, "cpu", compile=False)  # the workers choose their graph
    return ext.layer, ext.dim


def fingerprint_fields(spec: ModelSpec, layer: str, prep: Preprocess, dtype: str, sha: str) -> dict[str, Any]:
    """Everything that changes the vectors, in its JSON form (so a reloaded manifest compares equal)."""
    fields = {"model": spec.name, "weights": weights_identity(spec), "layer": layer, "pool": spec.pool,
              "normalize": spec.normalize, "precision": spec.precision, "dtype": dtype,
              "preprocess": prep.vector_fields(), "input_sha256": sha, "featshard_version": __version__}
    if is_timm(spec.name):
        fields["timm"] = timm_fields(spec.name)
    return json.loads(json.dumps(fields))


def reconcile(run_dir: str, fields: dict[str, Any], plan: list[Shard], overwrite: bool) -> dict[str, Any] | None:
    """An existing manifest must describe the same vectors and plan; --overwrite starts over instead."""
    if not manifest_path(run_dir).is_file():
        return None
    if overwrite:
        clear_run(run_dir)
        return None
    old = load_manifest(run_dir)
    diffs = [_explain(d, old) for d in diff_fields(old.get("fingerprint_fields", {}), fields)]
    if diffs:
        raise UsageError(f"{run_dir} holds a run with another config; what differs: {'; '.join(diffs)}. "
                         "Use another --out, or --overwrite to start over.")
    old_plan = [(s["start"], s["stop"]) for s in old.get("plan", [])]
    if old_plan != [(s.start, s.stop) for s in plan]:
        raise UsageError(f"{run_dir} was planned as {len(old_plan)} shards over {old.get('num_nodes', 1)} node(s); "
                         f"this command plans {len(plan)}. Resume with the same --gpus/--num-nodes, or --overwrite.")
    return old


def _explain(diff: str, old: dict[str, Any]) -> str:
    if diff.startswith("input_sha256:"):
        return (f"the input list changed (rows, names or paths differ from {old.get('input', {}).get('path')!r} "
                f"when the run began; {diff})")
    return diff


def clear_run(run_dir: str) -> None:
    log.warning("--overwrite: removing the previous run's shards, index and summary in %s", run_dir)
    for name in ("shards", "index"):
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)
    for name in ("manifest.json", "summary.json"):
        (Path(run_dir) / name).unlink(missing_ok=True)
    (Path(run_dir) / "shards").mkdir(parents=True, exist_ok=True)


@dataclass
class Scanned:
    """The input list read once (row count and hash) and the out dir checked: all a run lock needs first."""

    source: InputSource
    rows: int
    input_sha256: str
    run_dir: str


def scan(args: Any) -> Scanned:
    source = open_input(args.input)
    rows, sha = scan_input(source)
    if rows == 0:
        raise UsageError(f"--input {args.input!r} lists no images (blank lines and # comments are skipped)")
    return Scanned(source, rows, sha, check_out_dir(args.out))


def prepare(args: Any, devices: list[Device], num_nodes: int, scanned: Scanned | None = None) -> Prepared:
    """Resolve and check the config against what `--out` holds; run it holding the run lock (it may rewrite
    the manifest, or clear the run with --overwrite)."""
    scanned = scanned or scan(args)
    source, rows, sha, run_dir = scanned.source, scanned.rows, scanned.input_sha256, scanned.run_dir
    spec = model_spec(args, devices[0].kind)
    prep = preprocess_for(spec.name, spec.weights, decode=args.decode, max_pixels=args.max_pixels,
                          timeout=args.image_timeout)
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype!r}: choose float32 or float16")
    layer, dim = probe_model(spec, prep)
    spec = ModelSpec(**{**spec.to_dict(), "layer": layer})
    fields = fingerprint_fields(spec, layer, prep, args.dtype, sha)
    plan = plan_shards(rows, [str(d) for d in devices], num_nodes)
    old = reconcile(run_dir, fields, plan, args.overwrite)
    chunk_size = int(old["chunk_size"]) if old else args.chunk_size
    if old and chunk_size != args.chunk_size:
        log.info("resuming with the run's --chunk-size %d (not %d)", chunk_size, args.chunk_size)
    fp = fingerprint_of(fields)
    manifest = old or _new_manifest(source, rows, sha, spec, prep, args, fields, fp, dim, plan, chunk_size, num_nodes)
    if old is None:
        try:
            write_manifest(run_dir, manifest)
        except OSError as exc:
            raise FeatshardError(f"cannot write {manifest_path(run_dir)}: {exc}") from None
    return Prepared(run_dir, source, rows, sha, spec, prep, args.dtype, dim, fp, fields, plan, chunk_size, manifest)


def _new_manifest(source: InputSource, rows: int, sha: str, spec: ModelSpec, prep: Preprocess, args: Any,
                  fields: dict[str, Any], fp: str, dim: int, plan: list[Shard], chunk_size: int,
                  num_nodes: int) -> dict[str, Any]:
    return {
        "featshard_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": {"path": source.path, "kind": source.kind, "rows": rows, "sha256": sha},
        "rows": rows, "fingerprint": fp, "fingerprint_fields": fields,
        "model": {**spec.to_dict(), "weights_hash": fields["weights"], "dim": dim, "dtype": args.dtype},
        "preprocess": prep.to_dict(), "chunk_size": chunk_size, "num_nodes": num_nodes,
        "config": {"batch_size": args.batch_size, "loader_workers": args.loader_workers, "gpus": args.gpus},
        "versions": versions(), "plan": [s.to_dict() for s in plan],
    }


def shard_attrs(p: Prepared) -> dict[str, Any]:
    """Provenance written into every chunk and shard file: the files describe themselves."""
    m = p.model
    return {"fingerprint": p.fingerprint, "model": m.name, "layer": m.layer, "pool": m.pool,
            "normalize": m.normalize, "precision": m.precision, "dim": p.dim, "dtype": p.dtype,
            "weights": m.weights, "weights_hash": p.fields["weights"], "seed": m.seed,
            "preprocess": p.prep.to_dict(), "input_sha256": p.input_sha256, "versions": versions(),
            "featshard_version": __version__}

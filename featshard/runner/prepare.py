"""Prepare a run: validate every input up front, resolve the config, fingerprint it, write or check the manifest.

Everything here fails fast with a clear message (bad list, unknown model/layer, unreadable weights, out dir that is a
file, a changed config on an existing run) before any worker starts. What the user asked for that changes the
vectors (`request`) is kept in the manifest: resuming with the same request needs no torch in this process at all
(layer, dim and preprocessing come from the manifest); a new or changed request is resolved with torchvision and a
model probe on the `meta` device (no weights loaded into memory twice, no computation).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featshard import __version__
from featshard.errors import FeatshardError, UsageError
from featshard.extract.graph import check_graph
from featshard.extract.models import ModelSpec, library_versions, resolve_precision, weights_identity
from featshard.extract.preprocess import Preprocess
from featshard.extract.timmmodels import HEAD_LAYER, HEAD_POOL, is_timm, timm_fields
from featshard.runner.config import RunConfig
from featshard.runner.devices import Device, capabilities
from featshard.store.atomic import write_json_atomic
from featshard.store.inputs import InputSource, open_input, scan_input
from featshard.store.manifest import diff_fields, fingerprint_of, load_manifest
from featshard.store.plan import Shard, plan_shards
from featshard.store.rundir import RunDir
from featshard.system import sha256_file

log = logging.getLogger("featshard.prepare")


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


@dataclass
class Scanned:
    """The input list read once (row count and hash) and the out dir checked: all a run lock needs first."""

    source: InputSource
    rows: int
    input_sha256: str
    run_dir: str


def check_out_dir(out: str) -> str:
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out!r} exists and is not a directory")
    try:
        RunDir(path).shards.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out!r}: cannot create it: {exc}") from exc
    return str(path.resolve())


def scan(config: RunConfig) -> Scanned:
    source = open_input(config.input)
    rows, sha = scan_input(source)
    if rows == 0:
        raise UsageError(f"--input {config.input!r} lists no images (blank lines and # comments are skipped)")
    return Scanned(source, rows, sha, check_out_dir(config.out))


def model_spec(config: RunConfig, devices: list[Device]) -> ModelSpec:
    """The model as asked for (layer still unresolved); no torch import (a GPU's capability comes from the probe
    subprocess, see featshard.runner.gpuprobe)."""
    weights = config.weights
    if weights.lower() == "none":
        weights = "none"
    elif weights.upper() == "DEFAULT":
        weights = "DEFAULT"
    else:
        weights = os.path.abspath(os.path.expanduser(weights))
    pool = config.pool
    if is_timm(config.model) and config.layer in (None, HEAD_LAYER):
        if pool != "avg":
            raise UsageError(f"--pool {pool} applies with --layer: a timm model's default features (its pre-logits) "
                             "are pooled by the model itself")
        pool = HEAD_POOL
    kind = devices[0].kind
    caps = capabilities(devices) if kind == "cuda" and config.precision == "auto" else []
    precision = resolve_precision(config.precision, kind, caps)
    check_graph(config.graph, precision)
    return ModelSpec(name=config.model, weights=weights, layer=config.layer, pool=pool,
                     normalize=config.normalize, precision=precision, seed=config.seed, graph=config.graph)


def request_of(config: RunConfig, spec: ModelSpec, sha: str) -> dict[str, Any]:
    """What the user asked for that changes the vectors, comparable without torch (a weights file by its hash)."""
    weights = spec.weights if spec.weights in ("DEFAULT", "none") else "sha256:" + _weights_hash(spec.weights)
    return {"model": spec.name, "weights": weights, "layer": spec.layer, "pool": spec.pool,
            "normalize": spec.normalize, "precision": spec.precision, "seed": spec.seed, "dtype": config.dtype,
            "decode": config.decode, "input_sha256": sha, "featshard_version": __version__}


def _weights_hash(path: str) -> str:
    if not os.path.isfile(path):
        raise UsageError(f"--weights {path!r}: no such file (use DEFAULT, none, or a local .pth file)")
    try:
        return sha256_file(path)
    except OSError as exc:
        raise UsageError(f"--weights {path!r}: cannot read: {exc}") from exc


def fingerprint_fields(spec: ModelSpec, layer: str, prep: Preprocess, dtype: str, sha: str) -> dict[str, Any]:
    """Everything that changes the vectors, in its JSON form (so a reloaded manifest compares equal)."""
    fields = {"model": spec.name, "weights": weights_identity(spec), "layer": layer, "pool": spec.pool,
              "normalize": spec.normalize, "precision": spec.precision, "dtype": dtype,
              "preprocess": prep.vector_fields(), "input_sha256": sha, "featshard_version": __version__}
    if is_timm(spec.name):
        fields["timm"] = timm_fields(spec.name)
    return json.loads(json.dumps(fields))


def check_plan(run_dir: str, old: dict[str, Any], plan: list[Shard]) -> None:
    old_plan = [(s["start"], s["stop"]) for s in old.get("plan", [])]
    if old_plan != [(s.start, s.stop) for s in plan]:
        raise UsageError(f"{run_dir} was planned as {len(old_plan)} shards over {old.get('num_nodes', 1)} node(s); "
                         f"this command plans {len(plan)}. Resume with the same --gpus/--num-nodes, or --overwrite.")


def check_same_vectors(run_dir: str, old: dict[str, Any], fields: dict[str, Any]) -> None:
    """An existing manifest must describe the same vectors; say what differs otherwise."""
    diffs = [_explain(d, old) for d in diff_fields(old.get("fingerprint_fields", {}), fields)]
    if diffs:
        raise UsageError(f"{run_dir} holds a run with another config; what differs: {'; '.join(diffs)}. "
                         "Use another --out, or --overwrite to start over.")


def _explain(diff: str, old: dict[str, Any]) -> str:
    if diff.startswith("input_sha256:"):
        return (f"the input list changed (rows, names or paths differ from {old.get('input', {}).get('path')!r} "
                f"when the run began; {diff})")
    return diff


def clear_run(run_dir: str) -> None:
    log.warning("--overwrite: removing the previous run's shards, index and summary in %s", run_dir)
    paths = RunDir(run_dir)
    for folder in (paths.shards, paths.index):
        shutil.rmtree(folder, ignore_errors=True)
    for path in (paths.manifest, paths.summary()):
        path.unlink(missing_ok=True)
    paths.shards.mkdir(parents=True, exist_ok=True)


def existing_manifest(run_dir: str, overwrite: bool) -> dict[str, Any] | None:
    if not RunDir(run_dir).manifest.is_file():
        return None
    if overwrite:
        clear_run(run_dir)
        return None
    return load_manifest(run_dir)


def prepare(config: RunConfig, devices: list[Device], num_nodes: int, scanned: Scanned) -> Prepared:
    """Resolve and check the config against what `--out` holds; run it holding the run lock (it may rewrite
    the manifest, or clear the run with --overwrite)."""
    spec = model_spec(config, devices)
    request = request_of(config, spec, scanned.input_sha256)
    plan = plan_shards(scanned.rows, [str(d) for d in devices], num_nodes)
    old = existing_manifest(scanned.run_dir, config.overwrite)
    if old is not None and old.get("request") == request:  # resuming the same run: all is in the manifest
        check_plan(scanned.run_dir, old, plan)
        return _resumed(config, spec, scanned, old)
    return _resolved(config, spec, request, scanned, plan, old, num_nodes)


def _resumed(config: RunConfig, spec: ModelSpec, scanned: Scanned, old: dict[str, Any]) -> Prepared:
    m = old["model"]
    spec = ModelSpec(**{**spec.to_dict(), "layer": m["layer"]})
    prep = Preprocess.from_dict({**old["preprocess"], "max_pixels": config.max_pixels,
                                 "timeout": config.image_timeout})
    chunk_size = _chunk_size(config, old)
    return Prepared(scanned.run_dir, scanned.source, scanned.rows, scanned.input_sha256, spec, prep, config.dtype,
                    int(m["dim"]), str(old["fingerprint"]), old["fingerprint_fields"], _plan_of(old), chunk_size,
                    old)


def _plan_of(manifest: dict[str, Any]) -> list[Shard]:
    return [Shard(**{k: s[k] for k in ("index", "count", "start", "stop", "node", "device")})
            for s in manifest["plan"]]


def _chunk_size(config: RunConfig, old: dict[str, Any] | None) -> int:
    chunk_size = int(old["chunk_size"]) if old else config.chunk_size
    if chunk_size != config.chunk_size:
        log.info("resuming with the run's --chunk-size %d (not %d)", chunk_size, config.chunk_size)
    return chunk_size


def _resolved(config: RunConfig, spec: ModelSpec, request: dict[str, Any], scanned: Scanned, plan: list[Shard],
              old: dict[str, Any] | None, num_nodes: int) -> Prepared:
    """A new run, or an existing one asked for with other options: resolve the model (torchvision) and compare."""
    from featshard.extract.probe import probe
    from featshard.extract.models import check_model_name, preprocess_for

    check_model_name(spec.name)
    prep = preprocess_for(spec.name, spec.weights, decode=config.decode, max_pixels=config.max_pixels,
                          timeout=config.image_timeout)
    layer, dim = probe(spec, prep)
    spec = ModelSpec(**{**spec.to_dict(), "layer": layer})
    fields = fingerprint_fields(spec, layer, prep, config.dtype, scanned.input_sha256)
    if old is not None:
        check_same_vectors(scanned.run_dir, old, fields)
        check_plan(scanned.run_dir, old, plan)
    fp = fingerprint_of(fields)
    chunk_size = _chunk_size(config, old)
    manifest = {**(old or new_manifest(scanned, spec, prep, config, fields, fp, dim, plan, chunk_size, num_nodes)),
                "request": request}
    try:
        write_json_atomic(RunDir(scanned.run_dir).manifest, manifest)
    except OSError as exc:
        raise FeatshardError(f"cannot write {RunDir(scanned.run_dir).manifest}: {exc}") from None
    return Prepared(scanned.run_dir, scanned.source, scanned.rows, scanned.input_sha256, spec, prep, config.dtype,
                    dim, fp, fields, plan, chunk_size, manifest)


def new_manifest(scanned: Scanned, spec: ModelSpec, prep: Preprocess, config: RunConfig, fields: dict[str, Any],
                 fp: str, dim: int, plan: list[Shard], chunk_size: int, num_nodes: int) -> dict[str, Any]:
    source = scanned.source
    return {
        "featshard_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": {"path": source.path, "kind": source.kind, "rows": scanned.rows, "sha256": scanned.input_sha256},
        "rows": scanned.rows, "fingerprint": fp, "fingerprint_fields": fields,
        "model": {**spec.to_dict(), "weights_hash": fields["weights"], "dim": dim, "dtype": config.dtype},
        "preprocess": prep.to_dict(), "chunk_size": chunk_size, "num_nodes": num_nodes,
        "config": {"batch_size": config.batch_size, "loader_workers": config.loader_workers, "gpus": config.gpus},
        "versions": library_versions(), "plan": [s.to_dict() for s in plan],
    }


def shard_attrs(p: Prepared) -> dict[str, Any]:
    """Provenance written into every chunk and shard file: the files describe themselves (the worker adds the
    library versions it runs with)."""
    m = p.model
    return {"fingerprint": p.fingerprint, "model": m.name, "layer": m.layer, "pool": m.pool,
            "normalize": m.normalize, "precision": m.precision, "dim": p.dim, "dtype": p.dtype,
            "weights": m.weights, "weights_hash": p.fields["weights"], "seed": m.seed,
            "preprocess": p.prep.to_dict(), "input_sha256": p.input_sha256, "featshard_version": __version__}

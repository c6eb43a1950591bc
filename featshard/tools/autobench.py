"""`--index-spec auto` against autofaiss at the same memory budget, on the same synthetic clustered run.

    python -m featshard.tools.autobench --n 500000 --dim 256 --budget 100M --spec IVF2048,PQ64 \\
        --autofaiss-python /tmp/afenv/bin/python

Writes the run (featshard.tools.indexbench.write_run), then, each in a fresh process so each peak RSS is its own:
`merge --index-spec auto --max-index-memory BUDGET`, `merge --index-spec SPEC` for every --spec (e.g. what the old
auto rule chose), and, given a Python that has autofaiss, autofaiss's `build_index(max_index_memory_usage=BUDGET)`
reading the same vectors as .npy files. Every index is scored on the same 1000 stored vectors against exact search:
recall@10 with the search parameters its builder chose (merge: tuned to --target-recall; autofaiss: its own), and
for autofaiss also after featshard's tuning sweep. Seconds are the whole build, tuning included. Prints a table and
writes OUT/auto_bench.json. autofaiss 2.18 needs numpy<2, pyarrow<20 and faiss-cpu<=1.13 (faiss 1.14+ refuses its
`faiss.OPQMatrix(d, M=..., d2=...)` keywords): give it a venv of its own.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from featshard.store.atomic import write_json_atomic
from featshard.tools.indexbench import in_fresh_process, write_run

log = logging.getLogger("featshard.tools.autobench")

AUTOFAISS_JOB = """
import json, resource, sys, time
import faiss
from autofaiss import build_index
emb, index_path, infos_path, budget = sys.argv[1:5]
started = time.perf_counter()
_, infos = build_index(embeddings=emb, index_path=index_path, index_infos_path=infos_path,
                       max_index_memory_usage=budget, metric_type="ip", save_on_disk=True, verbose=30)
print(json.dumps({"seconds": time.perf_counter() - started, "faiss": faiss.__version__, "infos": infos,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def merge_auto_job(run_dir: str, spec: str, budget: int, threads: int | None) -> dict[str, Any]:
    from featshard.index import merge
    from featshard.index import reader as fx

    if threads:
        import faiss

        faiss.omp_set_num_threads(threads)
    started = time.perf_counter()
    meta = merge.build(run_dir, spec, max_memory=budget)
    return {"builder": "featshard merge", "asked": spec, "spec": meta["spec"], "seconds": time.perf_counter() - started,
            "recall_at_10": meta["recall_at_10"], "search_params": meta["search_params"],
            "index_bytes": meta["index_bytes"], "estimated_bytes": meta.get("estimated_bytes"),
            "peak_rss_bytes": fx.peak_rss_bytes(), "steps": meta["steps"]}


def export_npy(run_dir: Path, folder: Path, files: int = 4) -> None:
    """The run's vectors in row order as .npy files (autofaiss gives ids in reading order: the row numbers)."""
    from featshard.index.vectors import batch_rows_for, iter_vectors, source_of

    folder.mkdir(parents=True, exist_ok=True)
    src = source_of(run_dir)
    batches = list(iter_vectors([src], batch_rows_for(src.dim)))
    ids = np.concatenate([i for i, _ in batches])
    if not np.array_equal(ids, np.arange(len(ids))):
        raise ValueError(f"{run_dir}: stored rows are not 0..N-1 in order; autofaiss's ids would not be rows")
    x = np.concatenate([v for _, v in batches])
    step = -(-len(x) // files)
    for i, lo in enumerate(range(0, len(x), step)):
        np.save(folder / f"part-{i:03d}.npy", x[lo:lo + step])


def score_index(run_dir: Path, index_path: Path, seed: int) -> dict[str, Any]:
    """recall@10 of a saved index as its builder left it, then after featshard's tuning sweep."""
    import faiss

    from featshard.index.recall import exact_knn, recall_at, tune
    from featshard.index.vectors import batch_rows_for, gather, sample_positions, source_of

    src = source_of(run_dir)
    index = faiss.read_index(str(index_path))
    _, queries = gather([src], sample_positions(src.rows, 1000, seed + 1), batch_rows_for(src.dim))
    own = recall_at(index.search(queries, 10)[1], exact_knn(queries, [src], 10, "ip"))
    tuned = tune(index, [src], "ip", 0.95, seed)
    return {"recall_at_10": round(own, 4), "recall_at_10_tuned": tuned["recall_at_10"],
            "tuned_params": tuned["search_params"], "index_bytes": index_path.stat().st_size}


def autofaiss_job(python: str, run_dir: Path, work: Path, budget: str, seed: int) -> dict[str, Any]:
    export_npy(run_dir, work / "emb")
    index_path = work / "autofaiss.index"
    done = subprocess.run([python, "-c", AUTOFAISS_JOB, str(work / "emb"), str(index_path),
                           str(work / "autofaiss_infos.json"), budget], capture_output=True, text=True)
    if done.returncode:
        return {"builder": "autofaiss", "error": done.stderr.strip().splitlines()[-1:]}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {"builder": f"autofaiss (faiss {out['faiss']})", "spec": out["infos"]["index_key"],
            "seconds": out["seconds"], "peak_rss_bytes": out["peak_rss_bytes"],
            "search_params": out["infos"].get("index_param"), **score_index(run_dir, index_path, seed)}


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'builder':<26}{'spec':<35}{'index MB':>9}{'recall@10':>22}{'seconds':>9}{'peak RSS MB':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['builder']:<26}failed: {r['error']}")
            continue
        recall = f"{r['recall_at_10']:.3f}" + (f" ({r['recall_at_10_tuned']:.3f} tuned)"
                                               if "recall_at_10_tuned" in r else "")
        lines.append(f"{r['builder']:<26}{r['spec']:<35}{r['index_bytes'] / 1e6:>9.1f}{recall:>22}"
                     f"{r['seconds']:>9.1f}{r['peak_rss_bytes'] / 2**20:>12.0f}")
    return "\n".join(lines)


def run_auto_bench(out_dir: str | os.PathLike[str], n: int = 500_000, dim: int = 256, budget: str = "100M",
                   specs: tuple[str, ...] = (), autofaiss_python: str | None = None, seed: int = 0,
                   threads: int | None = None) -> dict[str, Any]:
    from featshard.index.spec import parse_size

    out = Path(out_dir)
    load_before = os.getloadavg()
    run_dir = out / "auto-bench-run"
    if not (run_dir / "manifest.json").is_file():
        write_run(run_dir, n, dim, seed)
    rows = [in_fresh_process(merge_auto_job, str(run_dir), spec, parse_size(budget), threads)
            for spec in ("auto", *specs)]
    if autofaiss_python:
        rows.append(autofaiss_job(autofaiss_python, run_dir, out / "autofaiss", budget, seed))
    result = {"n": n, "dim": dim, "budget": budget, "seed": seed, "threads": threads, "cpu_count": os.cpu_count(),
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()], "builds": rows, "table": table(rows)}
    print(result["table"])
    write_json_atomic(out / "auto_bench.json", result)
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out/auto")
    parser.add_argument("--n", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--budget", default="100M")
    parser.add_argument("--spec", action="append", default=[], help="also merge this spec (repeatable)")
    parser.add_argument("--autofaiss-python", default=None, help="a Python with autofaiss installed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    ns = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run_auto_bench(ns.out, ns.n, ns.dim, ns.budget, tuple(ns.spec), ns.autofaiss_python, ns.seed, ns.threads)

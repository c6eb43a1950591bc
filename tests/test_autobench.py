from __future__ import annotations

import json
import sys

import pytest

from featshard.tools import autobench


@pytest.mark.slow
def test_auto_bench_compares_auto_with_a_given_spec_and_reports_a_missing_autofaiss(tmp_path, capsys):
    result = autobench.run_auto_bench(tmp_path, n=4000, dim=16, budget="100K", specs=("IVF32,PQ4",),
                                      autofaiss_python=sys.executable, threads=1)
    auto, given, autofaiss = result["builds"]
    assert auto["asked"] == "auto" and auto["spec"].startswith("IVF") and given["spec"] == "IVF32,PQ4"
    assert auto["index_bytes"] <= auto["estimated_bytes"] <= 100 * 1024
    assert auto["recall_at_10"] > given["recall_at_10"]  # more of the budget spent on the codes
    assert all(b["peak_rss_bytes"] > 0 and b["seconds"] > 0 and b["steps"]["train"]["device"] == "cpu"
               for b in (auto, given))
    assert autofaiss["builder"] == "autofaiss" and "autofaiss" in " ".join(autofaiss["error"])
    assert capsys.readouterr().out.startswith("builder")
    assert json.loads((tmp_path / "auto_bench.json").read_text())["table"] == result["table"]
    assert (tmp_path / "autofaiss" / "emb" / "part-000.npy").is_file()


def test_the_vectors_autofaiss_reads_are_the_rows_in_order(tmp_path):
    import numpy as np

    from featshard.tools.indexbench import chunks, write_run

    write_run(tmp_path / "run", 1000, 8, seed=3, n_shards=3)
    autobench.export_npy(tmp_path / "run", tmp_path / "emb", files=3)
    parts = [np.load(p) for p in sorted((tmp_path / "emb").glob("*.npy"))]
    assert [len(p) for p in parts] == [334, 334, 332]
    assert np.array_equal(np.concatenate(parts), np.concatenate([x for _, x in chunks(1000, 8, 3)]))

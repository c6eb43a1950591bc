from __future__ import annotations

import pytest

from featshard.errors import UsageError
from featshard.store.plan import chunk_ranges, plan_shards, split_rows


@pytest.mark.parametrize("rows, parts", [(10, 3), (8, 8), (3, 8), (0, 2), (1_000_003, 7)])
def test_split_rows_balanced_contiguous(rows, parts):
    ranges = split_rows(rows, parts)
    assert len(ranges) == parts
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_more_shards_than_rows_gives_empty_shards():
    plan = plan_shards(2, ["cpu:0", "cpu:1", "cpu:2"])
    assert [s.rows for s in plan] == [0, 1, 1]
    assert sum(s.rows for s in plan) == 2


def test_plan_over_nodes():
    plan = plan_shards(100, ["cuda:0", "cuda:1"], num_nodes=3)
    assert len(plan) == 6
    assert [s.node for s in plan] == [0, 0, 1, 1, 2, 2]
    assert [s.device for s in plan] == ["cuda:0", "cuda:1"] * 3
    assert plan[0].name == "shard-00000-of-00006"


def test_chunks():
    assert chunk_ranges(10, 25, 6) == [(10, 16), (16, 22), (22, 25)]
    assert chunk_ranges(5, 5, 4) == []
    with pytest.raises(UsageError):
        chunk_ranges(0, 5, 0)


def test_plan_errors():
    with pytest.raises(UsageError):
        plan_shards(5, [], 1)
    with pytest.raises(UsageError):
        plan_shards(5, ["cpu:0"], 0)

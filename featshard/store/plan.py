"""The shard plan: balanced contiguous row ranges, one shard per device, split across nodes; chunk ranges."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from featshard.errors import UsageError


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    start: int
    stop: int
    node: int
    device: str

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        return shard_name(self.index, self.count)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def split_rows(n_rows: int, n_parts: int) -> list[tuple[int, int]]:
    """Contiguous ranges covering [0, n_rows) whose sizes differ by at most one (some empty if n_parts > n_rows)."""
    if n_parts < 1:
        raise UsageError("need at least one shard")
    return [(i * n_rows // n_parts, (i + 1) * n_rows // n_parts) for i in range(n_parts)]


def plan_shards(n_rows: int, devices_per_node: list[str], num_nodes: int = 1) -> list[Shard]:
    """Plan the whole job: num_nodes × len(devices_per_node) shards; node r owns a contiguous block of them."""
    if num_nodes < 1:
        raise UsageError("--num-nodes must be >= 1")
    if not devices_per_node:
        raise UsageError("no devices to run on")
    per_node = len(devices_per_node)
    count = num_nodes * per_node
    return [
        Shard(i, count, lo, hi, node=i // per_node, device=devices_per_node[i % per_node])
        for i, (lo, hi) in enumerate(split_rows(n_rows, count))
    ]


def chunk_ranges(start: int, stop: int, chunk_size: int) -> list[tuple[int, int]]:
    """The chunks of a shard: [start, stop) cut every chunk_size rows, aligned to the shard start."""
    if chunk_size < 1:
        raise UsageError("--chunk-size must be >= 1")
    return [(lo, min(stop, lo + chunk_size)) for lo in range(start, stop, chunk_size)]

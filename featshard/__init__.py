"""featshard: images to feature vectors on every device, into HDF5 shards and one faiss index.

The Python API (featshard.api): `run`, `merge`, `search`, `open_run`, `verify`, `dedup`, `add`, `status`, `doctor`; each
command's options are the fields of its config dataclass (`RunConfig`, `MergeConfig`, ...).
"""
from __future__ import annotations

__version__ = "0.1.0"

from featshard.api import add, dedup, doctor, merge, open_run, run, search, status, verify  # noqa: E402
from featshard.errors import FeatshardError, UsageError  # noqa: E402
from featshard.index.config import AddConfig, DedupConfig, MergeConfig, SearchConfig  # noqa: E402
from featshard.runner.config import DoctorConfig, RunConfig, SlurmConfig, StatusConfig, VerifyConfig  # noqa: E402

__all__ = ["run", "merge", "search", "open_run", "verify", "dedup", "add", "status", "doctor", "FeatshardError",
           "UsageError", "RunConfig", "MergeConfig", "SearchConfig", "DedupConfig", "AddConfig", "VerifyConfig",
           "StatusConfig", "SlurmConfig", "DoctorConfig", "__version__"]

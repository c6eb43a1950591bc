"""featshard: images to feature vectors on every device, into HDF5 shards and one faiss index.

The Python API (featshard.api): `run`, `merge`, `search`, `open_run`, `verify`, `dedup`, `add`, `export`, `status`,
`serve`, `doctor`; each command's options are the fields of its config dataclass (`RunConfig`, `MergeConfig`, ...).
"""
from __future__ import annotations

__version__ = "0.1.0"

from featshard.api import add, dedup, doctor, export, merge, open_run, run, search, serve, status, verify  # noqa: E402
from featshard.errors import FeatshardError, UsageError  # noqa: E402
from featshard.index.config import AddConfig, DedupConfig, MergeConfig, SearchConfig  # noqa: E402
from featshard.runner.config import DoctorConfig, RunConfig, SlurmConfig, StatusConfig, VerifyConfig  # noqa: E402
from featshard.tools.config import ExportConfig, ServeConfig  # noqa: E402

__all__ = ["run", "merge", "search", "open_run", "verify", "dedup", "add", "export", "status", "serve", "doctor",
           "FeatshardError", "UsageError", "RunConfig", "MergeConfig", "SearchConfig", "DedupConfig", "AddConfig",
           "ExportConfig", "VerifyConfig", "StatusConfig", "SlurmConfig", "ServeConfig", "DoctorConfig", "__version__"]

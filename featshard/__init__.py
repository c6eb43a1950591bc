"""featshard: images to feature vectors on every device, into HDF5 shards and one faiss index."""
from __future__ import annotations

__version__ = "0.1.0"

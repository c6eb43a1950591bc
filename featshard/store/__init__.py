"""Storage: input lists, the shard plan, the manifest, HDF5 shards, progress files, run locks, the run
folder's paths and the atomic writer. Imports no torch, PIL or faiss."""

"""Index: merge into faiss, auto spec, streaming vectors, recall tuning, add, dedup, search."""

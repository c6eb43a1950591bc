"""Extraction: preprocessing recipes, decoding, loaders, models, the graph and the one extraction step."""

"""The shared test helpers, one package: images made on the fly (`images`), the bad-input corpus (`corpus`),
synthetic finished runs (`runs`), the real CLI (`cli`), a real `featshard serve` process (`server`)."""
from __future__ import annotations

from helpers.cli import FAST, REPO, cli, read_all
from helpers.corpus import cmyk_array, corpus_names, make_corpus, textured
from helpers.images import make_images, mobilenet_weights, photo, write_list
from helpers.runs import clustered, default_names, make_run, normalize

__all__ = ["FAST", "REPO", "cli", "read_all", "cmyk_array", "corpus_names", "make_corpus", "textured", "make_images",
           "mobilenet_weights", "photo", "write_list", "clustered", "default_names", "make_run", "normalize"]

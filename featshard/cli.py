"""Command line: `python -m featshard COMMAND ...`; every command lives in its own module."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from featshard import __version__
from featshard.errors import FeatshardError
from featshard.logs import setup_logging

# command name -> (module, one-line help). Each module defines add_arguments(parser) and command(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("featshard.runner.coordinator", "extract features of an image list into HDF5 shards"),
    "merge": ("featshard.index.merge", "build one faiss index from a run's shards"),
    "search": ("featshard.index.search", "find the nearest images of query images"),
    "verify": ("featshard.runner.verify", "check that every input row is accounted for exactly once"),
    "dedup": ("featshard.index.dedup", "find exact and near-duplicate groups"),
    "add": ("featshard.index.add", "add another run's vectors to an existing index"),
    "export": ("featshard.tools.export", "write a run's vectors as clip-retrieval npy + parquet, or parquet"),
    "status": ("featshard.runner.status", "per-shard progress of a run, live or after a crash"),
    "slurm": ("featshard.runner.slurm", "write (and submit) SLURM job-array scripts for a run"),
    "bench": ("featshard.tools.bench", "measure decode, model and end-to-end throughput side by side"),
    "demo": ("featshard.tools.demo", "build the embedded demo set and run run/merge/search on it"),
}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Only the invoked command's module is imported (keeps `--help`, `status` and `--dry-run` light)."""
    parser = argparse.ArgumentParser(prog="featshard", description=__doc__)
    parser.add_argument("--version", action="version", version=f"featshard {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module_name, help_text) in COMMANDS.items():
        if name != chosen:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_command=module.command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if not getattr(args, "_command", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args._command(args))
    except FeatshardError as exc:
        print(f"featshard {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `featshard search ... | head`: the reader went away; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"featshard {args.command}: interrupted", file=sys.stderr)
        return 130

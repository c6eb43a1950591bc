"""Exceptions that reach the user as a clear one-line message instead of a traceback."""
from __future__ import annotations


class FeatshardError(Exception):
    """A failure the user can act on; the CLI prints it and exits 1."""

    exit_code = 1


class UsageError(FeatshardError):
    """Bad arguments or bad input given on the command line; the CLI exits 2."""

    exit_code = 2

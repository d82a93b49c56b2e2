"""Exceptions with enough context for a user to fix the input."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input: names the file, the row or field, and what was expected.

    The message reads ``<file>: <where>: <problem>`` so it can be grepped and shown as is.
    """

    def __init__(self, problem: str, path: str | Path | None = None, where: str | None = None):
        self.path = None if path is None else Path(path)
        self.where = where
        self.problem = problem
        parts = [str(p) for p in (path, where) if p is not None]
        super().__init__(": ".join(parts + [problem]))

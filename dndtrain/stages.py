"""Helpers shared by the stage modules: the stage error type and the "run X first" check."""

from __future__ import annotations

from pathlib import Path


class StageError(RuntimeError):
    """A stage cannot run; the message says why and what to do (e.g. which command to run first)."""


def require(path: Path, what: str, command: str) -> Path:
    """Raise a StageError naming the command that produces `path` when it is missing."""
    if not Path(path).exists():
        raise StageError(f"{what} not found at {path}. Run `{command}` first.")
    return Path(path)

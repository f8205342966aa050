"""Helpers shared by the stage modules: the stage error type and the "run X first" check."""

from __future__ import annotations

import json
from pathlib import Path


class StageError(RuntimeError):
    """A stage cannot run; the message says why and what to do (e.g. which command to run first)."""


def require(path: Path, what: str, command: str) -> Path:
    """Raise a StageError naming the command that produces `path` when it is missing."""
    if not Path(path).exists():
        raise StageError(f"{what} not found at {path}. Run `{command}` first.")
    return Path(path)


def read_json_object(path: Path, fix: str = "") -> dict:
    """A JSON object from `path`, or a StageError naming the file (and `fix`, what to run to recreate it)."""
    hint = f"; {fix}" if fix else ""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StageError(f"{path}: cannot read ({exc}){hint}") from None
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected a JSON object{hint}")
    return data

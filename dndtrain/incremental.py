"""Incremental training and model versions (placeholder until implemented)."""

from __future__ import annotations


def add_commands(sub, common, handler) -> None:
    p = sub.add_parser("incremental", help="incremental training and model versions")
    common(p)
    p.set_defaults(func=handler, inc_command=None)


def run_command(args, cfg, paths, log=print) -> int:
    log("incremental: not implemented yet")
    return 2

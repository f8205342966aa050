"""The `data` and `tools` command groups of the dndtrain CLI (registered by `dndtrain.cli` via `add_commands`).

    dndtrain data check [PATH ...] [--registry FILE]
    dndtrain data stats [DIR] [--json] [--png FILE] [--update-readme FILE]
    dndtrain tools exec "CALL" [--scenario FILE] [--seed N] [--registry FILE]
    dndtrain tools scan [DIR] [--registry FILE]
    dndtrain tools extend [DIR] [--registry FILE]
    dndtrain tools docs [DIR] [--out FILE] [--registry FILE]

Handlers are thin: parse arguments, call `dndtrain.datacheck` / `game` / `extension`, print, return the exit status.
A user error prints `error: ...` to stderr and returns 1; it never shows a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
from pathlib import Path
from typing import Callable

from dndtrain.game import GameState, ToolError
from dndtrain.registry import RegistryError, ToolRegistry
from dndtrain.scenario import ScenarioError

DEFAULT_SCENARIOS = "data/scenarios"
DEFAULT_REGISTRY = "trained_models/tool_registry.json"
DEFAULT_PNG = "trained_models/data_stats.png"
DEFAULT_DOCS = "trained_models/tool_documentation.md"
STATS_START = "<!-- stats:start -->"
STATS_END = "<!-- stats:end -->"
MAX_EXEC_CHARS = 1000
MAX_README_BYTES = 1024 * 1024

Handler = Callable[[argparse.Namespace], int]


def _guarded(fn: Handler) -> Handler:
    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ScenarioError, RegistryError, ToolError, OSError, UnicodeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


def _help(parser: argparse.ArgumentParser) -> Handler:
    def show(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return show


# --- data ------------------------------------------------------------------------------------------------------------

@_guarded
def cmd_data_check(args: argparse.Namespace) -> int:
    from dndtrain.datacheck import check_paths

    registry = ToolRegistry.load(args.registry)
    report = check_paths(args.paths or [DEFAULT_SCENARIOS], registry)
    for line in report.lines:
        print(line)
    print(report.summary())
    return 1 if report.errors else 0


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"


def _human_stats(stats: dict) -> list[str]:
    from dndtrain.datacheck import first_call_shares

    cats = ", ".join(f"{k} {v['files']}" for k, v in stats["categories"].items())
    unit = stats["length_unit"]
    fl, tl = stats["file_length"], stats["dm_turn_length"]
    return [
        f"{stats['files']} scenario files ({cats}), {stats['turns']} turns, {stats['dm_turns']} DM turns",
        f"tool calls: {stats['calls_total']} ({_counts(stats['calls_per_tool'])})",
        f"DM turns: {stats['dm_turns_no_call']} without a call ({stats['dm_turns_no_call_share']:.0%}), "
        f"{stats['dm_turns_one_call']} with one, {stats['dm_turns_multi_call']} with two or more",
        *(f"first call {context}: {first_call_shares(counts)}" for context, counts in stats["first_call_by_context"].items()),
        f"length per file ({unit}): min {fl['min']}, mean {fl['mean']}, p95 {fl['p95']}, max {fl['max']}",
        f"length per DM turn ({unit}): min {tl['min']}, mean {tl['mean']}, p95 {tl['p95']}, max {tl['max']}",
        f"classes: {_counts(stats['classes'])}",
        f"levels: {_counts(stats['levels'])}",
        f"party sizes: {_counts(stats['party_sizes'])}",
        f"worlds: {_counts(stats['worlds'])}",
    ]


def update_readme(path: str | Path, block: str) -> Path:
    """Replace the text between the stats markers of a markdown file (atomically). Raises OSError/ValueError."""
    from dndtrain.extension import atomic_write

    path = Path(path)
    if path.stat().st_size > MAX_README_BYTES:
        raise OSError(f"{path}: larger than {MAX_README_BYTES} bytes")
    text = path.read_bytes().decode("utf-8")
    start, end = text.find(STATS_START), text.find(STATS_END)
    if start < 0 or end < start:
        raise ValueError(f"{path}: no '{STATS_START}' ... '{STATS_END}' block to update")
    new = text[: start + len(STATS_START)] + "\n" + block.strip("\n") + "\n" + text[end:]
    return atomic_write(path, new)


def _token_counter():
    """Count tokens with the default base model's tokenizer when it is already prepared, else fall back to words."""
    from dndtrain.basemodel import default_model_dir

    folder = default_model_dir()
    if not (folder / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


@_guarded
def cmd_data_stats(args: argparse.Namespace) -> int:
    from dndtrain.datacheck import corpus_stats, stats_chart, stats_markdown
    from dndtrain.scenario import load_scenarios

    registry = ToolRegistry.load(args.registry)
    stats = corpus_stats(load_scenarios(args.dir), registry, count_tokens=_token_counter())
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print("\n".join(_human_stats(stats)))
    if args.png:
        png = stats_chart(stats, args.png)
        print(f"chart: {png}", file=sys.stderr if args.json else sys.stdout)
    if args.update_readme:
        try:
            path = update_readme(args.update_readme, stats_markdown(stats))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"updated: {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


# --- tools -----------------------------------------------------------------------------------------------------------

@_guarded
def cmd_tools_exec(args: argparse.Namespace) -> int:
    from dndtrain.game import execute
    from dndtrain.scenario import parse_file
    from dndtrain.toolcalls import find_calls, find_malformed

    text = args.call
    if len(text) > MAX_EXEC_CHARS:
        print(f"error: the call is {len(text)} characters long (limit {MAX_EXEC_CHARS})", file=sys.stderr)
        return 1
    registry = ToolRegistry.load(args.registry)
    calls = find_calls(text)
    if not calls:
        bad = find_malformed(text, frozenset(registry.names()))
        what = f"malformed tool call '{bad[0]}'" if bad else f"no tool call in {text!r}"
        print(f"error: {what}; write it like [roll: d20+5]", file=sys.stderr)
        return 1
    if args.scenario:
        state = GameState.from_scenario(parse_file(args.scenario), registry)
    else:
        state = GameState.default(registry)
    rng = random.Random(args.seed) if args.seed is not None else random.Random()
    for call in calls:
        print(execute(call, state, rng))
    return 0


def _load(dir_: str):
    from dndtrain.scenario import load_scenarios

    return load_scenarios(dir_)


@_guarded
def cmd_tools_scan(args: argparse.Namespace) -> int:
    from dndtrain.extension import scan

    found = scan(_load(args.dir), ToolRegistry.load(args.registry))
    if not found:
        print("no unregistered tools in the data")
        return 0
    for t in found:
        print(f"{t.name}: {t.count} call(s), {t.arity} argument(s) ({', '.join(t.arg_kinds) or 'none'})")
        for e in t.examples:
            print(f"  {e}")
    print(f"{len(found)} unregistered tool(s); `dndtrain tools extend` adds them to the registry")
    return 0


@_guarded
def cmd_tools_extend(args: argparse.Namespace) -> int:
    from dndtrain.extension import extend

    result = extend(_load(args.dir), args.registry)
    for spec in result.added:
        print(f"added {spec.syntax()}  e.g. {spec.examples[0] if spec.examples else ''}".rstrip())
    if not result.added:
        print("no new tools; the registry is up to date")
    print(f"registry: {result.registry_path}")
    return 0


@_guarded
def cmd_tools_docs(args: argparse.Namespace) -> int:
    from dndtrain.extension import write_docs

    path = write_docs(_load(args.dir), ToolRegistry.load(args.registry), args.out)
    print(f"wrote {path}")
    return 0


# --- registration ----------------------------------------------------------------------------------------------------

def add_commands(subparsers) -> None:
    """Register the `data` and `tools` command groups on an argparse subparsers object."""
    data = subparsers.add_parser("data", help="check the scenario data and describe it",
                                 description="Check the scenario data and describe it.")
    data.set_defaults(func=_help(data))
    dsub = data.add_subparsers(dest="data_command", metavar="COMMAND")

    p = dsub.add_parser("check", help="validate every scenario file and tool call",
                        description="Parse every scenario, validate each tool call against the 5e rules and the "
                                    "file's party, and check each TOOLCALL result line. Exit 1 on errors.")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help=f"scenario folders and/or files, any number (default {DEFAULT_SCENARIOS})")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help=f"tool registry JSON (default {DEFAULT_REGISTRY})")
    p.set_defaults(func=cmd_data_check)

    p = dsub.add_parser("stats", help="corpus statistics, chart and README table",
                        description="Print corpus statistics, write a chart, optionally update a README block.")
    p.add_argument("dir", nargs="?", default=DEFAULT_SCENARIOS, help=f"scenario folder (default {DEFAULT_SCENARIOS})")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--png", default=DEFAULT_PNG, help=f"chart path (default {DEFAULT_PNG}; '' to skip)")
    p.add_argument("--update-readme", metavar="FILE", default=None,
                   help=f"replace the block between {STATS_START} and {STATS_END} in FILE")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help=f"tool registry JSON (default {DEFAULT_REGISTRY})")
    p.set_defaults(func=cmd_data_stats)

    tools = subparsers.add_parser("tools", help="execute, scan, extend and document tools",
                                  description="Execute, scan, extend and document the DM's tools.")
    tools.set_defaults(func=_help(tools))
    tsub = tools.add_subparsers(dest="tools_command", metavar="COMMAND")

    p = tsub.add_parser("exec", help="execute a tool call and print its TOOLCALL result line",
                        description="Execute tool calls such as '[roll: d20+5]' and print their result lines.")
    p.add_argument("call", help="the call, e.g. '[roll: d20+5]' (several calls run in order)")
    p.add_argument("--scenario", metavar="FILE", help="take the party from this scenario (default: a built-in party)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible rolls")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help=f"tool registry JSON (default {DEFAULT_REGISTRY})")
    p.set_defaults(func=cmd_tools_exec)

    p = tsub.add_parser("scan", help="list tools used in the data but not registered")
    p.add_argument("dir", nargs="?", default=DEFAULT_SCENARIOS, help=f"scenario folder (default {DEFAULT_SCENARIOS})")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help=f"tool registry JSON (default {DEFAULT_REGISTRY})")
    p.set_defaults(func=cmd_tools_scan)

    p = tsub.add_parser("extend", help="add the data's unregistered tools to the registry")
    p.add_argument("dir", nargs="?", default=DEFAULT_SCENARIOS, help=f"scenario folder (default {DEFAULT_SCENARIOS})")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help=f"tool registry JSON (default {DEFAULT_REGISTRY})")
    p.set_defaults(func=cmd_tools_extend)

    p = tsub.add_parser("docs", help="write markdown documentation of every tool")
    p.add_argument("dir", nargs="?", default=DEFAULT_SCENARIOS, help=f"scenario folder (default {DEFAULT_SCENARIOS})")
    p.add_argument("--out", default=DEFAULT_DOCS, help=f"output markdown (default {DEFAULT_DOCS})")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help=f"tool registry JSON (default {DEFAULT_REGISTRY})")
    p.set_defaults(func=cmd_tools_docs)

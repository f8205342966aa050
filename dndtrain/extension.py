"""Tool extension: find tools the data uses that the registry does not know, register them, document every tool.

A scene that introduces `[light: torch, 60]` flows through `scan` (found: `light`, 2 args: text, int), `extend` (added
to `trained_models/tool_registry.json` with an inferred schema, so it reaches the model's prompt and the validator)
and `write_docs` (documented with real examples from the data).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dndtrain.registry import ArgSpec, ToolRegistry, ToolSpec
from dndtrain.rules import dice_problem, scenario_calls
from dndtrain.scenario import Scenario, ScenarioError, read_text
from dndtrain.toolcalls import ToolCall

MAX_EXAMPLES = 3
_UINT = re.compile(r"^\d{1,9}$")
_SINT = re.compile(r"^[+-]?\d{1,9}$")
_DICEISH = re.compile(r"(?i)^\s*\d*d(\d+|%)")

KIND_ARG_NAMES = {"int": "number", "signed_int": "+/-N", "dice": "dice", "character": "character", "text": "text"}


@dataclass(frozen=True)
class ToolExample:
    call: str
    """The call as written in the data, e.g. `[light: torch, 60]`."""
    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.call}"


@dataclass
class ToolUsage:
    """How the data uses one tool name."""

    name: str
    count: int = 0
    examples: list[ToolExample] = field(default_factory=list)
    arg_counts: Counter = field(default_factory=Counter)
    calls: list[tuple[ToolCall, frozenset[str]]] = field(default_factory=list, repr=False)
    """Every call with the lowercase party names of its scenario (for kind inference)."""


@dataclass
class NewTool:
    """A tool used in the data but not in the registry."""

    name: str
    count: int
    examples: list[ToolExample]
    arity: int
    """The most common argument count."""
    arg_kinds: list[str]
    """Inferred kind per argument: int, signed_int, dice, character or text."""

    def to_spec(self) -> ToolSpec:
        names: list[str] = []
        for kind in self.arg_kinds:
            base = KIND_ARG_NAMES.get(kind, "text")
            name = base
            k = 2
            while name in names:
                name, k = f"{base}{k}", k + 1
            names.append(name)
        args = [ArgSpec(n, k, f"inferred from {self.count} call(s) in the data") for n, k in zip(names, self.arg_kinds)]
        examples = list(dict.fromkeys(e.call for e in self.examples))
        return ToolSpec(self.name, "custom tool", args, examples, builtin=False)


@dataclass
class ExtendResult:
    registry_path: Path
    added: list[ToolSpec]
    """Tools newly written to the registry."""
    known: list[str]
    """Extension tools the registry already had."""
    found: list[NewTool]


def _file_lines(scenario: Scenario) -> list[str] | None:
    try:
        return read_text(Path(scenario.path)).split("\n")
    except (ScenarioError, OSError, ValueError):
        return None


def usage(scenarios: list[Scenario]) -> dict[str, ToolUsage]:
    """Per tool name: count, first examples (file:line), argument counts — for every call in every DM turn."""
    out: dict[str, ToolUsage] = {}
    for sc in scenarios:
        lines = _file_lines(sc)
        party = frozenset(c.name.lower() for c in sc.party) | {"player"}
        for located in scenario_calls(sc, lines):
            call = located.call
            u = out.setdefault(call.name, ToolUsage(call.name))
            u.count += 1
            u.arg_counts[len(call.args)] += 1
            u.calls.append((call, party))
            if len(u.examples) < MAX_EXAMPLES:
                u.examples.append(ToolExample(call.raw, sc.path, located.line))
    return out


def infer_kind(values: list[str], party_names: list[frozenset[str]]) -> str:
    """The narrowest kind that fits every value: int, signed_int, dice, character, else text."""
    if not values:
        return "text"
    if all(_UINT.match(v) for v in values):
        return "int"
    if all(_SINT.match(v) for v in values):
        return "signed_int"
    if all(_SINT.match(v) or (_DICEISH.match(v) and dice_problem(v) is None) for v in values):
        return "dice"
    if all(v.lower() in names for v, names in zip(values, party_names)):
        return "character"
    return "text"


def scan(scenarios: list[Scenario], registry: ToolRegistry) -> list[NewTool]:
    """Tools used in DM turns that the registry does not have, most used first."""
    found = []
    for name, u in usage(scenarios).items():
        if name in registry:
            continue
        arity = max(u.arg_counts.items(), key=lambda kv: (kv[1], -kv[0]))[0]
        fitting = [(c, p) for c, p in u.calls if len(c.args) == arity]
        kinds = [infer_kind([c.args[i] for c, _ in fitting], [p for _, p in fitting]) for i in range(arity)]
        found.append(NewTool(name, u.count, list(u.examples), arity, kinds))
    return sorted(found, key=lambda t: (-t.count, t.name))


def extend(scenarios: list[Scenario], registry_path: str | Path, min_count: int = 1) -> ExtendResult:
    """Add the data's unknown tools (used at least `min_count` times) to the registry file. Idempotent: a second run
    adds nothing and leaves the file unchanged. Raises RegistryError for a corrupt registry file."""
    registry_path = Path(registry_path)
    registry = ToolRegistry.load(registry_path)
    known = [t.name for t in registry.custom()]
    found = scan(scenarios, registry)
    added = [t.to_spec() for t in found if t.count >= min_count]
    for spec in added:
        registry.add(spec)
    if added or not registry_path.exists():
        registry.save(registry_path)
    return ExtendResult(registry_path, added, known, found)


def atomic_write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def docs_markdown(scenarios: list[Scenario], registry: ToolRegistry) -> str:
    """Markdown documentation: every tool, its schema, usage count and up to 3 real examples from the data."""
    uses = usage(scenarios)
    total = sum(u.count for u in uses.values())
    out = [
        "# Tool documentation",
        "",
        f"Generated by `dndtrain tools docs` from {len(scenarios)} scenario file(s) with {total} tool call(s).",
        "The DM writes tool calls inline as `[name: arg1, arg2]`; each call gets one result line in the `# TOOLCALL`",
        "section that follows the DM turn (see `data/FORMAT.md`).",
        "",
        "| tool | kind | syntax | uses |",
        "|---|---|---|---|",
    ]
    for spec in registry:
        n = uses[spec.name].count if spec.name in uses else 0
        out.append(f"| `{spec.name}` | {'built-in' if spec.builtin else 'extension'} | `{spec.syntax()}` | {n} |")
    out.append("")
    for spec in registry:
        u = uses.get(spec.name)
        out += [f"## {spec.name}", "", f"{spec.description}. {'Built-in' if spec.builtin else 'Extension'} tool, "
                f"used {u.count if u else 0} time(s) in the data.", "", f"Syntax: `{spec.syntax()}`", ""]
        if spec.args:
            out += ["| # | argument | kind | meaning |", "|---|---|---|---|"]
            for i, a in enumerate(spec.args, start=1):
                meaning = a.description + (f" ({', '.join(a.choices)})" if a.choices else "")
                out.append(f"| {i} | {a.name} | {a.kind} | {meaning.replace('|', '/')} |")
            out.append("")
        if u and u.examples:
            out.append("Examples from the data:")
            out.append("")
            out += [f"- `{e.call}` ({e.path}:{e.line})" for e in u.examples]
        elif spec.examples:
            out.append("Examples (none in the data yet):")
            out.append("")
            out += [f"- `{e}`" for e in spec.examples[:MAX_EXAMPLES]]
        out.append("")
    unregistered = scan(scenarios, registry)
    if unregistered:
        out += ["## Unregistered tools in the data", "",
                "These are used in DM turns but not in the registry; `dndtrain tools extend` adds them.", ""]
        for t in unregistered:
            out.append(f"- `{t.name}`: {t.count} use(s), {t.arity} argument(s) ({', '.join(t.arg_kinds) or 'none'}), "
                       f"e.g. `{t.examples[0].call}` ({t.examples[0].path}:{t.examples[0].line})")
        out.append("")
    return "\n".join(out)


def write_docs(scenarios: list[Scenario], registry: ToolRegistry, out_path: str | Path) -> Path:
    """Write `docs_markdown` to out_path atomically; returns the path."""
    return atomic_write(Path(out_path), docs_markdown(scenarios, registry))

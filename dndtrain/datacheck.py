"""`dndtrain data check` and `dndtrain data stats`: lint the scenario corpus and describe it.

`check_paths` parses every scenario, validates every tool call of every DM turn against the file's party
(`dndtrain.rules`) and checks that each TOOLCALL result line looks like the result of its call (right prefix,
consistent arithmetic, HP and spell slots that follow from the earlier lines). It never raises for bad input: every
problem becomes a `file:line: level: message` line.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import d20

from dndtrain import srd
from dndtrain.game import CharacterState, GameState
from dndtrain.registry import ToolRegistry
from dndtrain.rules import errors, result_lines, scenario_calls, validate_call
from dndtrain.scenario import Scenario, ScenarioError, find_scenario_files, parse_file, read_text
from dndtrain.toolcalls import ToolCall, find_calls, find_malformed


@dataclass(frozen=True)
class CheckLine:
    path: str
    line: int
    level: str
    """`error` or `warning`."""
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.level}: {self.message}"


@dataclass
class CheckReport:
    lines: list[CheckLine] = field(default_factory=list)
    files_checked: int = 0

    @property
    def errors(self) -> int:
        return sum(1 for x in self.lines if x.level == "error")

    @property
    def warnings(self) -> int:
        return sum(1 for x in self.lines if x.level == "warning")

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def summary(self) -> str:
        return f"{self.files_checked} file(s) checked: {self.errors} error(s), {self.warnings} warning(s)"


# --- result-line checks ----------------------------------------------------------------------------------------------

_TEST_BODY = re.compile(r"^(\d+) ([+-]) (\d+)\((skill|ability|save)\) = \*(-?\d+)\*")
_DICE_GROUP = re.compile(r"(\d+)d(\d+|%)([a-z<>=0-9]*) \(([^()]*)\)")
_TOTAL = re.compile(r" = \*(-?\d+)\*$")
_HP_BODY = re.compile(r"^(\d+) ([+-]) (\d+) = \*(\d+)\*/(\d+)( \(unconscious\))?$")


def _names(call_name: str, char: CharacterState | None) -> list[str]:
    names = [call_name]
    if char is not None and char.name != call_name:
        names.append(char.name)
    return names


def _strip_prefix(line: str, prefixes: list[str]) -> str | None:
    for p in prefixes:
        if line.startswith(p):
            return line[len(p):]
    return None


def _test_problem(body: str, label_ok: tuple[str, ...]) -> str | None:
    m = _TEST_BODY.match(body)
    if not m:
        return f"expected 'F + M({'|'.join(label_ok)}) = *T*' with a d20 face F"
    face, sign, mod, label, total = int(m[1]), m[2], int(m[3]), m[4], int(m[5])
    if label not in label_ok:
        return f"the modifier should be labelled ({'|'.join(label_ok)}), not ({label})"
    if not 1 <= face <= 20:
        return f"d20 face {face} is outside 1-20"
    if face + (mod if sign == "+" else -mod) != total:
        return f"{face} {sign} {mod} is not {total}"
    return None


def _dice_problem_in_line(arg: str, body: str) -> str | None:
    """Does `1d20 (14) + 5 = *19*` fit the expression `d20+5` (same shape, faces in range, right total)?"""
    m = _TOTAL.search(body)
    if not m:
        return "expected the total as '= *N*' at the end"
    stated = int(m[1])
    rolled = body[: m.start()]
    try:
        expected_shape = str(d20.parse(arg))
    except Exception:  # validate_call already reports unparsable dice
        return None
    shape = _DICE_GROUP.sub(lambda g: f"{g[1]}d{g[2]}{g[3]}", rolled)
    if " ".join(shape.split()) != " ".join(expected_shape.split()):
        return f"the rolled dice '{shape}' do not match the expression '{expected_shape}'"
    for g in _DICE_GROUP.finditer(rolled):
        num, size, ops, values = int(g[1]), 100 if g[2] == "%" else int(g[2]), g[3], g[4]
        faces = [v.strip().strip("~").rstrip("!") for v in values.split(",") if v.strip()]
        if not all(f.isdigit() for f in faces):
            return f"dice values '({values})' should be whole numbers"
        if any(not 1 <= int(f) <= size for f in faces):
            return f"a value in ({values}) is outside 1-{size} for d{size}"
        if not re.search(r"[er]|mi|ma", ops) and len(faces) != num:
            return f"{num}d{size} should list {num} value(s), got {len(faces)}"

    def kept_sum(g: re.Match) -> str:
        kept = [v.strip().rstrip("!") for v in g[4].split(",") if v.strip() and not v.strip().startswith("~~")]
        return f"({sum(int(v) for v in kept) if kept else 0})"

    try:
        total = d20.roll(_DICE_GROUP.sub(kept_sum, rolled)).total
    except Exception:  # set operations and the like: shape and faces were checked, skip the arithmetic
        return None
    if int(total) != stated:
        return f"the dice and modifiers add up to {int(total)}, not {stated}"
    return None


def result_problem(call: ToolCall, line: str, state: GameState) -> str | None:
    """Why `line` does not look like the result of `call` (None if it does). Updates `state` from the line (HP,
    spell slots), so later lines are checked against what the earlier ones said."""
    name = call.name
    a = call.args
    if name == "roll":
        low = a[0].lower()
        body = _strip_prefix(line, [f"{a[0]}: ", f"{low}: "])
        if body is None:
            return f"expected it to start with '{a[0]}:'"
        if low in srd.SKILLS or low in srd.ABILITIES:
            return _test_problem(body, ("skill",) if low in srd.SKILLS else ("ability",))
        return _dice_problem_in_line(a[0], body)
    char = None
    if name in ("health", "inventory", "spellcast"):
        char = _state_char(state, a[0])
    elif name in ("check", "save"):
        char = _state_char(state, a[1])
    if name == "check":
        what = a[0].lower()
        body = _strip_prefix(line, [f"{what} ({n}): " for n in _names(a[1], char)])
        if body is None:
            return f"expected it to start with '{what} ({a[1]}):'"
        return _test_problem(body, ("skill",) if what in srd.SKILLS else ("ability",))
    if name == "save":
        ability = a[0].lower()
        body = _strip_prefix(line, [f"{ability} save ({n}): " for n in _names(a[1], char)])
        if body is None:
            return f"expected it to start with '{ability} save ({a[1]}):'"
        m = re.search(r" vs DC (\d+): \*(success|failure)\*$", body)
        if not m:
            return f"expected it to end with 'vs DC {a[2]}: *success*' or '*failure*'"
        if int(m[1]) != int(a[2]):
            return f"the line says DC {m[1]} but the call says DC {a[2]}"
        problem = _test_problem(body[: m.start()], ("save",))
        if problem:
            return problem
        total = int(_TEST_BODY.match(body)[5])  # type: ignore[index]
        if (total >= int(a[2])) != (m[2] == "success"):
            return f"a total of {total} vs DC {a[2]} is a {'success' if total >= int(a[2]) else 'failure'}, not a {m[2]}"
        return None
    if name == "health":
        body = _strip_prefix(line, [f"{n} HP: " for n in _names(a[0], char)])
        if body is None:
            return f"expected it to start with '{a[0]} HP:'"
        m = _HP_BODY.match(body)
        if not m:
            return "expected 'cur - N = *new*/max' (with ' (unconscious)' at 0)"
        cur, sign, n, new, mx = int(m[1]), m[2], int(m[3]), int(m[4]), int(m[5])
        change = int(a[1])
        problem = None
        if (sign == "-") != (change < 0) or n != abs(change):
            problem = f"the line applies {sign}{n} but the call says {a[1]}"
        elif new != max(0, min(mx, cur + change)):
            problem = f"{cur} {sign} {n} clamped to 0..{mx} is {max(0, min(mx, cur + change))}, not {new}"
        elif bool(m[6]) != (new == 0):
            problem = "'(unconscious)' goes on the line exactly when HP drops to 0"
        elif char is not None and mx != char.max_hp:
            problem = f"{char.name}'s max HP is {char.max_hp}, not {mx}"
        elif char is not None and cur != char.hp:
            problem = f"{char.name} has {char.hp} HP at this point, not {cur}"
        if char is not None:
            char.hp = min(new, char.max_hp)
        return problem
    if name == "inventory":
        verb = {"add": "added", "remove": "removed", "use": "used"}.get(a[1], a[1])
        wanted = [f"{n} inventory: {verb} {a[2]}" for n in _names(a[0], char)]
        return None if line in wanted else f"expected '{wanted[-1]}'"
    if name == "spellcast":
        spell, slot = a[1].lower(), int(a[2])
        names = _names(a[0], char)
        if slot == 0:
            wanted = [f"{n} casts {spell} (cantrip)" for n in names]
            return None if line.lower() in [w.lower() for w in wanted] else f"expected '{wanted[-1]}'"
        body = _strip_prefix(line.lower(), [f"{n.lower()} casts {spell} (level {slot} slot): " for n in names])
        if body is None:
            return f"expected it to start with '{names[-1]} casts {spell} (level {slot} slot):'"
        m = re.fullmatch(rf"(\d+) level-{slot} slot(s?) left", body)
        if not m:
            return f"expected it to end with 'N level-{slot} slot(s) left'"
        left = int(m[1])
        if (left == 1) == bool(m[2]):
            return f"write '{left} level-{slot} slot{'' if left == 1 else 's'} left'"
        problem = None
        if char is not None and slot in char.max_slots:
            expected = char.slots.get(slot, 0) - 1
            if expected < 0:
                problem = f"{char.name} has no level-{slot} slots left at this point"
            elif left != expected:
                problem = f"{char.name} should have {expected} level-{slot} slot{'' if expected == 1 else 's'} left, not {left}"
            char.slots[slot] = left
        return problem
    return None  # extension tools: any result line


def _state_char(state: GameState, name: str) -> CharacterState | None:
    low = name.strip().lower()
    if low == "player":
        return state.characters[0] if state.characters else None
    return next((c for c in state.characters if c.name.lower() == low), None)


# --- checking files --------------------------------------------------------------------------------------------------

MAX_ROLLS_MATCHED = 10
"""Damage is matched against sums of at most this many earlier rolls of the exchange (2^10 subsets)."""


def damage_was_rolled(amount: int, totals: list[int]) -> bool:
    """Whether `amount` of damage can come from the exchange's earlier roll totals: one total or the sum of several
    (two hits), or half of one (a save for half, resistance) or double (vulnerability)."""
    recent = totals[-MAX_ROLLS_MATCHED:]
    sums = {0}
    for t in recent:
        sums |= {s + t for s in sums}
    sums.discard(0)
    return any(amount in (s, s // 2, 2 * s) for s in sums)


def _damage(call: ToolCall, party_names: set[str]) -> int | None:
    """The damage a `health` call deals to a party member (a positive number), else None."""
    if call.name != "health" or len(call.args) != 2 or call.args[0].strip().lower() not in party_names:
        return None
    try:
        change = int(call.args[1].replace(" ", ""))
    except ValueError:
        return None
    return -change if change < 0 else None


def check_scenario(sc: Scenario, registry: ToolRegistry, file_lines: list[str] | None = None) -> list[CheckLine]:
    """Findings for one parsed scenario (tool calls, result lines, party)."""
    out: list[CheckLine] = []
    path = sc.path

    def add(line: int, level: str, message: str) -> None:
        out.append(CheckLine(path, line, level, message))

    if not sc.party:
        add(sc.system_line, "warning", "SYSTEM has no Party list, so character names cannot be checked")
    for c in sc.party:
        if c.char_class.capitalize() not in srd.CLASSES:
            add(sc.system_line, "warning", f"{c.name}: class '{c.char_class}' is not one of the 12 SRD classes")
    state = GameState.from_scenario(sc, registry)
    names = frozenset(registry.names())
    located = scenario_calls(sc, file_lines)
    by_turn: dict[int, list] = {}
    for lc in located:
        by_turn.setdefault(lc.turn_index, []).append(lc)
    party_names = {c.name.lower() for c in sc.party}
    rolled: list[int] = []  # totals of the `roll` results since the last USER turn
    for i, turn in enumerate(sc.turns):
        if turn.role == "user":
            rolled = []
            if find_calls(turn.text):
                add(turn.line, "warning", "tool call in a USER turn; only the DM calls tools")
        if turn.role != "dm":
            continue
        for frag in find_malformed(turn.text, names):
            add(turn.line, "error", f"malformed tool call '{frag}' (write '[name: arg1, arg2]')")
        calls = by_turn.get(i, [])
        results = result_lines(sc.turns[i + 1], file_lines) if calls and i + 1 < len(sc.turns) else []
        this_turn: list[int] = []
        for k, lc in enumerate(calls):
            findings = validate_call(lc.call, registry, sc.party)
            for f in findings:
                add(lc.line, f.level, f"{lc.call.raw}: {f.message}")
            if errors(findings):
                continue
            damage = _damage(lc.call, party_names)
            if damage is not None and not damage_was_rolled(damage, rolled):
                add(lc.line, "warning", f"{lc.call.raw}: no roll since the player's message adds up to {damage}; "
                    "roll the damage first ([roll: 1d8+2]) and apply its total in the next DM turn")
            if k >= len(results):
                continue
            rline, rtext = results[k]
            try:
                problem = result_problem(lc.call, rtext, state)
            except (ValueError, IndexError, TypeError) as exc:  # a defensive net; validate_call passed
                problem = f"cannot check it ({exc})"
            if problem:
                add(rline, "warning", f"result line does not fit {lc.call}: {problem}")
            elif lc.call.name == "roll" and (total := _TOTAL.search(rtext)):
                this_turn.append(int(total.group(1)))
        rolled += this_turn  # a call cannot use a result of its own turn
    return out


def check_paths(roots, registry: ToolRegistry) -> CheckReport:
    """Check every scenario file under each of roots (folders or files; one path or a list). Never raises for bad
    files: each problem is a report line. A file named twice (or inside two given folders) is checked once."""
    report = CheckReport()
    seen: set[Path] = set()
    for root in [roots] if isinstance(roots, (str, Path)) else roots:
        _check_root(Path(root), registry, report, seen)
    return report


def _check_root(root: Path, registry: ToolRegistry, report: CheckReport, seen: set[Path]) -> None:
    if not root.exists():
        report.lines.append(CheckLine(str(root), 0, "error", "does not exist"))
        return
    try:
        files = find_scenario_files(root)
    except OSError as exc:
        report.lines.append(CheckLine(str(root), 0, "error", f"cannot list scenario files: {exc.strerror or exc}"))
        return
    if not files:
        report.lines.append(CheckLine(str(root), 0, "error", "no scenario files (*.md) found"))
        return
    base = root if root.is_dir() else root.parent
    for f in files:
        if f.resolve() in seen:
            continue
        seen.add(f.resolve())
        report.files_checked += 1
        try:
            sc = parse_file(f, base)
            lines = read_text(f).split("\n")
            report.lines += check_scenario(sc, registry, lines)
        except ScenarioError as exc:
            report.lines.append(CheckLine(exc.path, exc.line, "error", exc.message))
        except Exception as exc:  # noqa: BLE001 - one bad file must never stop the check
            report.lines.append(CheckLine(str(f), 0, "error", f"cannot check file: {type(exc).__name__}: {exc}"))


# --- corpus statistics -----------------------------------------------------------------------------------------------

def _summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "mean": 0.0, "p95": 0, "max": 0}
    ordered = sorted(values)
    rank = max(1, math.ceil(0.95 * len(ordered)))
    return {"min": ordered[0], "mean": round(statistics.fmean(ordered), 1), "p95": ordered[rank - 1], "max": ordered[-1]}


def _scenario_text(sc: Scenario) -> str:
    parts = [f"{k}: {v}" for k, v in sc.system.items()]
    parts += [f"- {c.name} ({c.race} {c.char_class}, Level {c.level}, HP: {c.hp}/{c.max_hp})" for c in sc.party]
    parts += [t.text for t in sc.turns]
    return "\n".join(parts)


CONTEXTS = {"user": "after a player message", "toolcall": "after a tool result"}
"""What a DM turn follows -> its label in `data stats`. A batch of new scenes shifts what the model does in each
context towards the batch's own rates there, so compare a batch's rates with the corpus's before training on it."""


def first_call_shares(counts: dict[str, int]) -> str:
    """'no call 45%, roll 22%, ...' for one context of `first_call_by_context`."""
    total = sum(counts.values())
    return ", ".join(f"{name} {n / total:.0%}" for name, n in counts.items()) if total else "none"


def corpus_stats(
    scenarios: list[Scenario], registry: ToolRegistry, count_tokens: Callable[[str], int] | None = None
) -> dict[str, Any]:
    """Corpus numbers for `data stats`, the chart and data/README.md. Lengths are in tokens when `count_tokens` is
    given, else in whitespace-separated words."""
    measure = count_tokens or (lambda text: len(text.split()))
    categories: dict[str, dict[str, int]] = {}
    calls = Counter({name: 0 for name in registry.names()})
    per_turn = Counter()
    classes, levels, sizes, worlds = Counter(), Counter(), Counter(), Counter()
    file_lengths, turn_lengths = [], []
    by_context = {context: Counter() for context in CONTEXTS.values()}
    for sc in scenarios:
        cat = categories.setdefault(sc.category or "(none)", {"files": 0, "turns": 0, "dm_turns": 0})
        cat["files"] += 1
        cat["turns"] += len(sc.turns)
        cat["dm_turns"] += len(sc.dm_turns)
        file_lengths.append(measure(_scenario_text(sc)))
        for i, turn in sc.dm_turns:
            found = find_calls(turn.text)
            per_turn[min(len(found), 2)] += 1
            if i and sc.turns[i - 1].role in CONTEXTS:
                by_context[CONTEXTS[sc.turns[i - 1].role]][found[0].name if found else "no call"] += 1
            calls.update(c.name for c in found)
            turn_lengths.append(measure(turn.text))
        for c in sc.party:
            classes[c.char_class or "(none)"] += 1
            levels[c.level] += 1
        sizes[len(sc.party)] += 1
        worlds[sc.system.get("World", "") or "(none)"] += 1
    dm_turns = sum(per_turn.values())
    return {
        "files": len(scenarios),
        "turns": sum(len(sc.turns) for sc in scenarios),
        "dm_turns": dm_turns,
        "categories": dict(sorted(categories.items())),
        "calls_total": sum(calls.values()),
        "calls_per_tool": dict(sorted(calls.items(), key=lambda kv: (-kv[1], kv[0]))),
        "dm_turns_no_call": per_turn[0],
        "dm_turns_no_call_share": round(per_turn[0] / dm_turns, 3) if dm_turns else 0.0,
        "dm_turns_one_call": per_turn[1],
        "dm_turns_multi_call": per_turn[2],
        "first_call_by_context": {
            context: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for context, c in by_context.items()
        },
        "length_unit": "tokens" if count_tokens else "words",
        "file_length": _summary(file_lengths),
        "dm_turn_length": _summary(turn_lengths),
        "classes": dict(sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))),
        "levels": dict(sorted(levels.items())),
        "party_sizes": dict(sorted(sizes.items())),
        "worlds": dict(sorted(worlds.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def stats_chart(stats: dict[str, Any], png_path: str | Path) -> Path:
    """Bar charts of calls per tool and files per category (matplotlib, Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    tools = stats.get("calls_per_tool", {})
    ax1.bar(list(tools), list(tools.values()), color="#8c2d19")
    ax1.set_title(f"Tool calls per tool ({stats.get('calls_total', 0)} total)")
    ax1.tick_params(axis="x", rotation=45)
    cats = stats.get("categories", {})
    ax2.bar(list(cats), [v["files"] for v in cats.values()], color="#2d5f8c")
    ax2.set_title(f"Scenario files per category ({stats.get('files', 0)} total)")
    fig.tight_layout()
    fig.savefig(png_path)
    return png_path


def stats_markdown(stats: dict[str, Any]) -> str:
    """A markdown block (tables) for data/README.md between the stats markers."""
    unit = stats.get("length_unit", "words")
    lines = [
        f"{stats['files']} scenario files, {stats['turns']} turns, {stats['dm_turns']} DM turns, "
        f"{stats['calls_total']} tool calls.",
        "",
        "| category | files | turns | DM turns |",
        "|---|---|---|---|",
    ]
    for cat, v in stats["categories"].items():
        lines.append(f"| {cat} | {v['files']} | {v['turns']} | {v['dm_turns']} |")
    lines += ["", "| tool | calls |", "|---|---|"]
    lines += [f"| `{t}` | {n} |" for t, n in stats["calls_per_tool"].items()]
    share = stats["dm_turns_no_call_share"]
    lines += [
        "",
        "| DM turns | count |",
        "|---|---|",
        f"| no tool call | {stats['dm_turns_no_call']} ({share:.0%}) |",
        f"| one tool call | {stats['dm_turns_one_call']} |",
        f"| two or more tool calls | {stats['dm_turns_multi_call']} |",
        "",
        "| DM turn | count | first call in the turn |",
        "|---|---|---|",
    ]
    for context, counts in stats["first_call_by_context"].items():
        lines.append(f"| {context} | {sum(counts.values())} | {first_call_shares(counts)} |")
    lines += [
        "",
        f"| length ({unit}) | min | mean | p95 | max |",
        "|---|---|---|---|---|",
    ]
    for key, label in (("file_length", "per file"), ("dm_turn_length", "per DM turn")):
        s = stats[key]
        lines.append(f"| {label} | {s['min']} | {s['mean']} | {s['p95']} | {s['max']} |")

    def counts(title: str, d: dict) -> list[str]:
        return ["", f"| {title} | count |", "|---|---|"] + [f"| {k} | {n} |" for k, n in d.items()]

    lines += counts("class", stats["classes"])
    lines += counts("level", stats["levels"])
    lines += counts("party size", stats["party_sizes"])
    lines += counts("world", stats["worlds"])
    return "\n".join(lines)

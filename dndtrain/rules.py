"""5e validation of one tool call: is it a known tool, with the right arguments, legal under the SRD rules?

`validate_call` returns findings instead of raising: an `error` means the call cannot be executed (or teaches the model
something wrong), a `warning` means it is legal but unusual (a Fighter casting a spell, a cantrip at a slot level).
The executor (`dndtrain.game`) refuses calls with errors; the data checker (`dndtrain.datacheck`) prints both.
"""

from __future__ import annotations

import difflib
import random
import re
from dataclasses import dataclass

import d20

from dndtrain import srd
from dndtrain.registry import ToolRegistry, ToolSpec
from dndtrain.scenario import Character, Scenario, Turn
from dndtrain.toolcalls import ToolCall, find_calls

MAX_DICE = 100
"""Most dice one expression may roll (before explosions)."""
MAX_SIDES = 1000
MAX_ROLLS = 200
"""Most dice one expression may roll including rerolls and explosions (d20's RollContext limit)."""
MAX_DICE_EXPR_CHARS = 60
MAX_HEALTH_CHANGE = 1000
TYPICAL_HEALTH_CHANGE = 200
MAX_ITEM_CHARS = 80
_INT = re.compile(r"^[+-]?\d{1,9}$")
_WORDS = re.compile(r"^[A-Za-z][A-Za-z '/-]*$")


@dataclass(frozen=True)
class Finding:
    level: str
    """`error` or `warning`."""
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


def _err(msg: str) -> Finding:
    return Finding("error", msg)


def _warn(msg: str) -> Finding:
    return Finding("warning", msg)


def _hint(word: str, options) -> str:
    close = difflib.get_close_matches(word.lower(), list(options), n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --- dice ------------------------------------------------------------------------------------------------------------

def _walk(node):
    yield node
    for child in getattr(node, "children", []) or []:
        yield from _walk(child)


def dice_problem(expr: str) -> str | None:
    """Why a dice expression cannot be rolled (syntax, too many dice, absurd sides), or None if it is fine.

    The expression is parsed by d20 and then trial-rolled (with the global `random` state saved and restored), so
    run-time errors such as division by zero or endless explosions are caught too.
    """
    expr = expr.strip()
    if not expr:
        return "empty dice expression"
    if len(expr) > MAX_DICE_EXPR_CHARS:
        return f"dice expression is {len(expr)} characters long (limit {MAX_DICE_EXPR_CHARS})"
    try:
        ast = d20.parse(expr)
    except d20.RollSyntaxError:
        return f"'{expr}' is not a valid dice expression (examples: d20+5, 2d6+3, 2d20kh1+4)"
    except (d20.RollError, RecursionError, ValueError) as exc:
        return f"'{expr}' is not a valid dice expression ({exc})"
    total = 0
    for node in _walk(ast):
        if type(node).__name__ == "Dice":
            size = 100 if node.size == "%" else node.size
            try:
                num, size = int(node.num), int(size)
            except (TypeError, ValueError):
                return f"'{expr}': dice counts and sides must be whole numbers"
            if num < 1:
                return f"'{expr}': roll at least one die"
            if size < 1:
                return f"'{expr}': a die needs at least 1 side"
            if size > MAX_SIDES:
                return f"'{expr}': d{size} has too many sides (limit d{MAX_SIDES})"
            total += num
            if total > MAX_DICE:
                return f"'{expr}' rolls too many dice (limit {MAX_DICE})"
    try:
        roll_dice(expr, random.Random(0))
    except d20.TooManyRolls:
        return f"'{expr}' rolls too many dice (rerolls/explosions past {MAX_ROLLS})"
    except (d20.RollError, ArithmeticError, RecursionError, ValueError) as exc:
        return f"'{expr}' cannot be rolled: {exc}"
    return None


class _ResultStringifier(d20.MarkdownStringifier):
    """d20's markdown result, minus the bold on min/max faces, with the total as `*N*` (FORMAT.md's lines)."""

    def _str_expression(self, node):
        return f"{self._stringify(node.roll)} = *{int(node.total)}*"

    def _str_die(self, node):
        return ", ".join(self._stringify(v) for v in node.values)


@dataclass(frozen=True)
class DiceRoll:
    text: str
    """d20's result text in FORMAT.md style: `1d20 (14) + 5 = *19*`."""
    total: int


def roll_dice(expr: str, rng: random.Random) -> DiceRoll:
    """Roll a dice expression with d20, reproducibly for a given `rng`.

    d20 draws from Python's global `random`; its state is saved, seeded from `rng`, and restored afterwards, so the
    caller's global random stream is untouched. Raises d20's errors (and ArithmeticError); callers check
    `dice_problem` first.
    """
    saved = random.getstate()
    try:
        random.seed(rng.getrandbits(64))
        roller = d20.Roller(context=d20.RollContext(max_rolls=MAX_ROLLS))
        result = roller.roll(expr, stringifier=_ResultStringifier())
        return DiceRoll(result.result, int(result.total))  # d20 evaluates lazily: force errors out here
    finally:
        random.setstate(saved)


# --- argument checks -------------------------------------------------------------------------------------------------

def _lower_note(value: str, what: str) -> list[Finding]:
    return [_warn(f"write {what} names lowercase: '{value.lower()}' not '{value}'")] if value != value.lower() else []


def check_skill_or_ability(value: str, allow_skills: bool = True) -> list[Finding]:
    low = value.lower()
    if low in srd.ABILITIES or (allow_skills and low in srd.SKILLS):
        return _lower_note(value, "skill and ability")
    if low in srd.ABILITY_ABBREVIATIONS:
        return [_err(f"write the ability in full: '{srd.ABILITY_ABBREVIATIONS[low]}' not '{value}'")]
    if allow_skills:
        return [_err(f"unknown skill or ability '{value}'{_hint(low, list(srd.SKILLS) + list(srd.ABILITIES))}")]
    if low in srd.SKILLS:
        return [_err(f"saving throws use an ability, not a skill: '{value}' (use one of {', '.join(srd.ABILITIES)})")]
    return [_err(f"unknown ability '{value}'{_hint(low, srd.ABILITIES)} (use one of {', '.join(srd.ABILITIES)})")]


def find_character(name: str, party: list[Character]) -> Character | None:
    """The party member called `name` (case-insensitive); `player` is the first member."""
    low = name.strip().lower()
    if low == "player":
        return party[0] if party else None
    return next((c for c in party if c.name.lower() == low), None)


def check_character(name: str, party: list[Character]) -> list[Finding]:
    if not name:
        return [_err("character name is empty")]
    if not party or name.lower() == "player":
        return []
    c = find_character(name, party)
    if c is None:
        names = [p.name for p in party]
        close = difflib.get_close_matches(name.lower(), [n.lower() for n in names], n=1, cutoff=0.75)
        hint = f" (did you mean '{names[[n.lower() for n in names].index(close[0])]}'?)" if close else ""
        return [_err(f"'{name}' is not in the party ({', '.join(names)}, or player){hint}")]
    if c.name != name:
        return [_warn(f"write the name exactly as in the party list: '{c.name}' not '{name}'")]
    return []


def check_int(value: str, what: str) -> tuple[int | None, list[Finding]]:
    if not _INT.match(value):
        return None, [_err(f"{what} must be a whole number, got '{value}'")]
    return int(value), []


def _check_roll(arg: str) -> list[Finding]:
    low = arg.lower()
    if low in srd.SKILLS or low in srd.ABILITIES:
        return _lower_note(arg, "skill and ability")
    if _WORDS.match(arg) and not re.fullmatch(r"(?i)\d*d(\d+|%)", arg):
        return check_skill_or_ability(arg)
    problem = dice_problem(arg)
    if problem:
        return [_err(problem)]
    if not re.search(r"(?i)d\s*(\d|%)", arg):
        return [_warn(f"roll '{arg}' has no dice")]
    return []


def _check_health(args: tuple[str, ...], party: list[Character]) -> list[Finding]:
    out = check_character(args[0], party)
    n, errs = check_int(args[1], "health change")
    if errs:
        return out + errs
    assert n is not None
    if n == 0:
        out.append(_err("health change must not be 0"))
    elif abs(n) > MAX_HEALTH_CHANGE:
        out.append(_err(f"health change {n} is larger than {MAX_HEALTH_CHANGE}"))
    elif abs(n) > TYPICAL_HEALTH_CHANGE:
        out.append(_warn(f"health change {n} is larger than {TYPICAL_HEALTH_CHANGE}"))
    if n > 0 and not args[1].startswith("+"):
        out.append(_warn(f"write healing with a sign: '+{n}'"))
    return out


def _check_inventory(args: tuple[str, ...], party: list[Character]) -> list[Finding]:
    out = check_character(args[0], party)
    action, item = args[1], args[2]
    if action not in ("add", "remove", "use"):
        out.append(_err(f"inventory action must be add, remove or use, got '{action}'"))
    if not item:
        out.append(_err("inventory item is empty"))
    elif len(item) > MAX_ITEM_CHARS:
        out.append(_err(f"inventory item is {len(item)} characters long (limit {MAX_ITEM_CHARS})"))
    return out


def _check_spellcast(args: tuple[str, ...], party: list[Character]) -> list[Finding]:
    out = check_character(args[0], party)
    spell, slot_text = args[1], args[2]
    slot, errs = check_int(slot_text, "slot level")
    if errs:
        return out + errs
    assert slot is not None
    if not 0 <= slot <= 9:
        return out + [_err(f"slot level {slot} is outside 0-9")]
    low = spell.lower()
    out += _lower_note(spell, "spell")
    base = srd.KNOWN_SPELLS.get(low)
    if base is None:
        out.append(_warn(f"unknown spell '{spell}' (not in the SRD spell list){_hint(low, srd.KNOWN_SPELLS)}"))
    elif base == 0 and slot > 0:
        out.append(_warn(f"{low} is a cantrip; cast it at slot level 0"))
    elif slot < base:
        out.append(_err(f"{low} is a level-{base} spell and cannot be cast with a level-{slot} slot"))
    char = find_character(args[0], party)
    if char is not None:
        info = srd.CLASSES.get(char.char_class.capitalize())
        slots = srd.slots_for(char.char_class, char.level)
        if info is not None and info.casting == srd.NONE:
            out.append(_warn(f"{char.name} is a {info.name}, a class that casts no spells"))
        elif slots is not None and slot > 0 and slot not in slots:
            have = ", ".join(str(k) for k in sorted(slots)) or "none"
            out.append(_warn(
                f"{char.name} (level {char.level} {char.char_class}) has no level-{slot} spell slots (slot levels: {have})"
            ))
    return out


def _check_check(args: tuple[str, ...], party: list[Character]) -> list[Finding]:
    return check_skill_or_ability(args[0]) + check_character(args[1], party)


def _check_save(args: tuple[str, ...], party: list[Character]) -> list[Finding]:
    out = check_skill_or_ability(args[0], allow_skills=False) + check_character(args[1], party)
    dc, errs = check_int(args[2], "DC")
    if errs:
        return out + errs
    assert dc is not None
    if not 1 <= dc <= 30:
        out.append(_err(f"DC {dc} is outside 1-30"))
    elif dc < 5:
        out.append(_warn(f"DC {dc} is below 5 (DCs are normally 5-30)"))
    return out


_CHECKERS = {
    "roll": lambda args, party: _check_roll(args[0]),
    "health": _check_health,
    "inventory": _check_inventory,
    "spellcast": _check_spellcast,
    "check": _check_check,
    "save": _check_save,
}


def validate_call(call: ToolCall, registry: ToolRegistry, party: list[Character]) -> list[Finding]:
    """Every problem with one call. Characters must be in `party` (or `player`); an empty party allows any name."""
    spec: ToolSpec | None = registry.get(call.name)
    if spec is None:
        return [_err(f"unknown tool '{call.name}' (known: {', '.join(registry.names())}){_hint(call.name, registry.names())}")]
    if len(call.args) != spec.arity:
        plural = "s" if spec.arity != 1 else ""
        return [_err(f"{spec.name} takes {spec.arity} argument{plural} ({', '.join(a.hint() for a in spec.args)}), got {len(call.args)} in {call}")]
    for i, (arg, a) in enumerate(zip(call.args, spec.args), start=1):
        if not arg:
            return [_err(f"{spec.name}: argument {i} ({a.name}) is empty")]
    checker = _CHECKERS.get(spec.name) if spec.builtin else None
    return checker(call.args, party) if checker else []


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == "error"]


# --- locating calls in a scenario ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LocatedCall:
    call: ToolCall
    line: int
    """1-based line in the scenario file."""
    turn_index: int
    """Index into `scenario.turns` of the DM turn."""


def _turn_lines(turn: Turn, file_lines: list[str] | None) -> tuple[int, list[str]]:
    """(line number of the turn's first content line, the content lines) — exact when the file's lines are known."""
    first = turn.line + 1
    if file_lines:
        i = turn.line  # 0-based index of the line after the heading
        while i < len(file_lines) and not file_lines[i].strip():
            i += 1
        first = i + 1
    return first, turn.text.split("\n")


def call_line(turn: Turn, call: ToolCall, file_lines: list[str] | None = None) -> int:
    first, _ = _turn_lines(turn, file_lines)
    return first + turn.text[: call.start].count("\n")


def scenario_calls(scenario: Scenario, file_lines: list[str] | None = None) -> list[LocatedCall]:
    """Every tool call in every DM turn, with its file line."""
    out = []
    for i, turn in scenario.dm_turns:
        for call in find_calls(turn.text):
            out.append(LocatedCall(call, call_line(turn, call, file_lines), i))
    return out


def result_lines(turn: Turn, file_lines: list[str] | None = None) -> list[tuple[int, str]]:
    """The non-empty lines of a TOOLCALL turn with their file line numbers."""
    first, lines = _turn_lines(turn, file_lines)
    return [(first + k, text.strip()) for k, text in enumerate(lines) if text.strip()]

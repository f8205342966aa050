"""Executing tool calls against a small game state, producing FORMAT.md's TOOLCALL result lines.

`execute` validates the call (`dndtrain.rules`), applies it to the `GameState` (HP, inventory, spell slots) and returns
the exact result line, e.g. `d20+5: 1d20 (14) + 5 = *19*`. Dice expressions are rolled by d20; the d20 face of
checks and saves is drawn from the given `random.Random`, so a seeded rng gives reproducible lines.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import d20

from dndtrain import srd
from dndtrain.registry import ToolRegistry
from dndtrain.rules import dice_problem, errors, roll_dice, validate_call
from dndtrain.scenario import Character, Scenario
from dndtrain.toolcalls import ToolCall


class ToolError(ValueError):
    """A call that cannot be executed (invalid, or impossible in the current state). The message says why."""


@dataclass
class CharacterState:
    name: str
    char_class: str = ""
    level: int = 1
    hp: int = 10
    max_hp: int = 10
    race: str = ""
    bonuses: dict[str, int] = field(default_factory=dict)
    """Stated modifiers, lowercase keys (`stealth`, `dex save`)."""
    inventory: list[str] = field(default_factory=list)
    inventory_known: bool = False
    """True when the scenario listed the character's inventory; only then is using a missing item an error."""
    slots: dict[int, int] = field(default_factory=dict)
    """Remaining spell slots {slot level: count}."""
    max_slots: dict[int, int] = field(default_factory=dict)

    def to_character(self) -> Character:
        return Character(
            name=self.name, race=self.race, char_class=self.char_class, level=self.level, hp=self.hp,
            max_hp=self.max_hp, bonuses=dict(self.bonuses), inventory=list(self.inventory),
        )


def character_inventory(char: Character) -> list[str]:
    """The items of a party line. `Inventory: rope, torch` is split on commas by the parser, so the fields after
    an `Inventory:` field (kept in `extra`) are items too."""
    if not char.inventory:
        return []
    items = list(char.inventory)
    items += [e for e in char.extra if ":" not in e]
    return items


def _state_from_character(char: Character) -> CharacterState:
    slots = srd.slots_for(char.char_class, char.level)
    if slots is None:  # a class outside the SRD's 12: be lenient and give it a full caster's slots
        slots = {i + 1: n for i, n in enumerate(srd.FULL_CASTER_SLOTS[max(1, min(20, char.level))])}
    items = character_inventory(char)
    return CharacterState(
        name=char.name, char_class=char.char_class, level=char.level, hp=char.hp, max_hp=char.max_hp,
        race=char.race, bonuses=dict(char.bonuses), inventory=items, inventory_known=bool(items),
        slots=dict(slots), max_slots=dict(slots),
    )


def default_party() -> list[Character]:
    """A party for play without a scenario (the FORMAT.md examples' characters)."""
    return [
        Character("Thordak", "Dragonborn", "Fighter", 5, 45, 45,
                  inventory=["longsword", "shield", "rope", "torch", "potion of healing"]),
        Character("Elara", "Elf", "Wizard", 5, 28, 28,
                  inventory=["spellbook", "component pouch", "dagger", "potion of healing"]),
        Character("Lyra", "Halfling", "Rogue", 3, 21, 21, bonuses={"stealth": 7},
                  inventory=["shortbow", "dagger", "thieves' tools", "rope", "potion of healing"]),
        Character("Brother Aldric", "Human", "Cleric", 5, 38, 38,
                  inventory=["mace", "shield", "holy symbol", "healer's kit", "holy water"]),
    ]


@dataclass
class GameState:
    characters: list[CharacterState] = field(default_factory=list)
    registry: ToolRegistry = field(default_factory=ToolRegistry.builtin)

    @classmethod
    def from_party(cls, party: list[Character], registry: ToolRegistry | None = None) -> "GameState":
        return cls([_state_from_character(c) for c in party], registry or ToolRegistry.builtin())

    @classmethod
    def from_scenario(cls, scenario: Scenario, registry: ToolRegistry | None = None) -> "GameState":
        return cls.from_party(scenario.party, registry)

    @classmethod
    def default(cls, registry: ToolRegistry | None = None) -> "GameState":
        return cls.from_party(default_party(), registry)

    @property
    def party(self) -> list[Character]:
        return [c.to_character() for c in self.characters]

    def get(self, name: str) -> CharacterState:
        """The character called `name` (case-insensitive; `player` is the first). With an empty party, any name
        creates a level-1 character on first use."""
        low = name.strip().lower()
        if low == "player" and self.characters:
            return self.characters[0]
        for c in self.characters:
            if c.name.lower() == low:
                return c
        if self.characters:
            raise ToolError(f"'{name}' is not in the party ({', '.join(c.name for c in self.characters)})")
        c = _state_from_character(Character(name=name.strip()))
        self.characters.append(c)
        return c


# --- modifiers -------------------------------------------------------------------------------------------------------

def ability_modifier(char: CharacterState, ability: str) -> int:
    """Stated (`Str +3`, `strength +3`) or guessed from the class: primary +3 (+4 from level 4, +5 from level 8)."""
    abbr = next(k for k, v in srd.ABILITY_ABBREVIATIONS.items() if v == ability)
    for key in (ability, abbr):
        if key in char.bonuses:
            return char.bonuses[key]
    info = srd.CLASSES.get(char.char_class.capitalize())
    if info is None:
        return 0
    mod = info.ability_guess[srd.ABILITIES.index(ability)]
    if ability == info.primary:
        mod += (char.level >= 4) + (char.level >= 8)
    return mod


def skill_modifier(char: CharacterState, skill: str) -> int:
    if skill in char.bonuses:
        return char.bonuses[skill]
    mod = ability_modifier(char, srd.SKILLS[skill])
    info = srd.CLASSES.get(char.char_class.capitalize())
    if info is not None and skill in info.skills:
        mod += srd.proficiency_bonus(char.level)
    return mod


def save_modifier(char: CharacterState, ability: str) -> int:
    abbr = next(k for k, v in srd.ABILITY_ABBREVIATIONS.items() if v == ability)
    for key in (f"{ability} save", f"{abbr} save", f"{ability} saving throw"):
        if key in char.bonuses:
            return char.bonuses[key]
    mod = ability_modifier(char, ability)
    info = srd.CLASSES.get(char.char_class.capitalize())
    if info is not None and ability in info.saves:
        mod += srd.proficiency_bonus(char.level)
    return mod


def _signed(face: int, mod: int, label: str) -> str:
    sign = "-" if mod < 0 else "+"
    return f"{face} {sign} {abs(mod)}({label})"


def _d20(rng: random.Random) -> int:
    return rng.randint(1, 20)


def _test(char: CharacterState, what: str, rng: random.Random) -> tuple[str, int]:
    """A skill or ability check: ('12 + 7(skill)', total)."""
    face = _d20(rng)
    if what in srd.SKILLS:
        mod, label = skill_modifier(char, what), "skill"
    else:
        mod, label = ability_modifier(char, what), "ability"
    return _signed(face, mod, label), face + mod


# --- execution -------------------------------------------------------------------------------------------------------

def _roll(call: ToolCall, state: GameState, rng: random.Random) -> str:
    arg = call.args[0]
    low = arg.lower()
    if low in srd.SKILLS or low in srd.ABILITIES:
        char = state.get("player")
        text, total = _test(char, low, rng)
        return f"{low}: {text} = *{total}*"
    problem = dice_problem(arg)
    if problem:
        raise ToolError(problem)
    try:
        result = roll_dice(arg, rng)
    except d20.TooManyRolls:
        raise ToolError(f"'{arg}' rolled too many dice") from None
    except (d20.RollError, ArithmeticError, ValueError) as exc:
        raise ToolError(f"'{arg}' cannot be rolled: {exc}") from None
    return f"{arg}: {result.text}"


def _health(call: ToolCall, state: GameState) -> str:
    char = state.get(call.args[0])
    n = int(call.args[1])
    before = char.hp
    char.hp = max(0, min(char.max_hp, before + n))
    sign = "-" if n < 0 else "+"
    line = f"{char.name} HP: {before} {sign} {abs(n)} = *{char.hp}*/{char.max_hp}"
    return line + " (unconscious)" if char.hp == 0 else line


def _inventory(call: ToolCall, state: GameState) -> str:
    char = state.get(call.args[0])
    action, item = call.args[1], call.args[2]
    if action == "add":
        char.inventory.append(item)
        return f"{char.name} inventory: added {item}"
    held = next((i for i in char.inventory if i.lower() == item.lower()), None)
    if held is None and char.inventory_known:
        have = ", ".join(char.inventory) or "nothing"
        raise ToolError(f"{char.name} has no {item} to {action} (inventory: {have})")
    if held is not None:
        char.inventory.remove(held)
    return f"{char.name} inventory: {'removed' if action == 'remove' else 'used'} {item}"


def _spellcast(call: ToolCall, state: GameState) -> str:
    char = state.get(call.args[0])
    spell = call.args[1].lower()
    slot = int(call.args[2])
    base = srd.KNOWN_SPELLS.get(spell)
    if slot == 0:
        if base:
            raise ToolError(f"{spell} is a level-{base} spell; it needs a slot of level {base} or higher")
        return f"{char.name} casts {spell} (cantrip)"
    info = srd.CLASSES.get(char.char_class.capitalize())
    if info is not None and info.casting == srd.NONE:
        raise ToolError(f"{char.name} is a {info.name} and has no spell slots")
    if slot not in char.max_slots:
        have = ", ".join(str(k) for k in sorted(char.max_slots)) or "none"
        raise ToolError(f"{char.name} (level {char.level} {char.char_class}) has no level-{slot} spell slots (slot levels: {have})")
    if char.slots.get(slot, 0) <= 0:
        raise ToolError(f"{char.name} has no level-{slot} spell slots left")
    char.slots[slot] -= 1
    left = char.slots[slot]
    return f"{char.name} casts {spell} (level {slot} slot): {left} level-{slot} slot{'' if left == 1 else 's'} left"


def _check(call: ToolCall, state: GameState, rng: random.Random) -> str:
    what = call.args[0].lower()
    char = state.get(call.args[1])
    text, total = _test(char, what, rng)
    return f"{what} ({char.name}): {text} = *{total}*"


def _save(call: ToolCall, state: GameState, rng: random.Random) -> str:
    ability = call.args[0].lower()
    char = state.get(call.args[1])
    dc = int(call.args[2])
    face = _d20(rng)
    mod = save_modifier(char, ability)
    total = face + mod
    outcome = "success" if total >= dc else "failure"
    return f"{ability} save ({char.name}): {_signed(face, mod, 'save')} = *{total}* vs DC {dc}: *{outcome}*"


def execute(call: ToolCall, state: GameState, rng: random.Random | None = None) -> str:
    """Validate and apply one call; return its TOOLCALL result line. Raises ToolError (never anything else for a
    call built from user text)."""
    rng = rng if rng is not None else random.Random()
    problems = errors(validate_call(call, state.registry, state.party))
    if problems:
        raise ToolError("; ".join(f.message for f in problems))
    spec = state.registry.get(call.name)
    assert spec is not None  # validate_call reports unknown tools
    if not spec.builtin:
        return f"{call.name}: {', '.join(call.args)} = *ok*"
    if call.name == "roll":
        return _roll(call, state, rng)
    if call.name == "health":
        return _health(call, state)
    if call.name == "inventory":
        return _inventory(call, state)
    if call.name == "spellcast":
        return _spellcast(call, state)
    if call.name == "check":
        return _check(call, state, rng)
    if call.name == "save":
        return _save(call, state, rng)
    raise ToolError(f"no executor for built-in tool '{call.name}'")

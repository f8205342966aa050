"""5e validation of single tool calls."""

import pytest

from dndtrain.registry import ArgSpec, ToolRegistry, ToolSpec
from dndtrain.rules import dice_problem, validate_call
from dndtrain.scenario import Character
from dndtrain.toolcalls import find_calls

PARTY = [
    Character("Thordak", "Dragonborn", "Fighter", 5, 45, 45),
    Character("Elara", "Elf", "Wizard", 5, 28, 28),
    Character("Lyra", "Halfling", "Rogue", 3, 21, 21, bonuses={"stealth": 7}),
    Character("Sir Aldric", "Human", "Paladin", 5, 44, 44),
    Character("Vex", "Tiefling", "Warlock", 5, 38, 38),
    Character("Pip", "Gnome", "Wizard", 1, 8, 8),
]
REG = ToolRegistry.builtin()


def check(text, party=PARTY, registry=REG):
    (call,) = find_calls(text)
    return [(f.level, f.message) for f in validate_call(call, registry, party)]


def levels(text, party=PARTY):
    return [lvl for lvl, _ in check(text, party)]


@pytest.mark.parametrize("text", [
    "[roll: d20+5]", "[roll: 2d6+3]", "[roll: 8d6]", "[roll: perception]", "[roll: strength]",
    "[roll: 2d20kh1+4]", "[roll: 4d6kh3]", "[roll: 1d8+3]", "[roll: sleight of hand]",
    "[health: Thordak, -7]", "[health: Elara, +8]", "[health: player, -3]", "[health: Sir Aldric, -200]",
    "[inventory: Lyra, add, silver dagger]", "[inventory: Lyra, use, potion of healing]",
    "[inventory: Thordak, remove, rope]",
    "[spellcast: Elara, fireball, 3]", "[spellcast: Elara, fire bolt, 0]", "[spellcast: Elara, magic missile, 3]",
    "[spellcast: Sir Aldric, bless, 1]", "[spellcast: Vex, hex, 3]", "[spellcast: Vex, eldritch blast, 0]",
    "[check: stealth, Lyra]", "[check: strength, Thordak]", "[check: animal handling, Elara]",
    "[save: dexterity, Thordak, 15]", "[save: wisdom, Elara, 30]", "[save: charisma, Lyra, 5]",
])
def test_format_examples_are_clean(text):
    assert check(text) == []


def test_unknown_tool_and_wrong_arity_are_errors():
    assert check("[attack: goblin]") == [("error", "unknown tool 'attack' (known: roll, health, inventory, spellcast, check, save)")]
    (lvl, msg), = check("[roll: d20, d6]")
    assert lvl == "error" and "roll takes 1 argument" in msg and "got 2" in msg
    (lvl, msg), = check("[health: Thordak]")
    assert lvl == "error" and "takes 2 arguments" in msg
    assert levels("[save: dexterity, Thordak, ]") == ["error"]


@pytest.mark.parametrize("expr, fragment", [
    ("d20+", "not a valid dice expression"),
    ("2d6+3 fire", "not a valid dice expression"),
    ("101d6", "too many dice"),
    ("60d6+60d6", "too many dice"),
    ("1000000000d6", "too many dice"),
    ("1d1001", "too many sides"),
    ("1d0", "at least 1 side"),
    ("0d6", "at least one die"),
    ("1d6/0", "cannot be rolled"),
    ("1d1e1", "too many dice"),
    ("d20+" + "1" * 80, "characters long"),
])
def test_bad_dice_are_errors(expr, fragment):
    assert fragment in (dice_problem(expr) or "")
    (lvl, msg), = check(f"[roll: {expr}]")
    assert lvl == "error" and fragment in msg


def test_dice_without_dice_is_a_warning():
    assert levels("[roll: 5]") == ["warning"]


@pytest.mark.parametrize("text, level, fragment", [
    ("[roll: perceptoin]", "error", "did you mean 'perception'"),
    ("[check: luck, Lyra]", "error", "unknown skill or ability 'luck'"),
    ("[check: dex, Lyra]", "error", "write the ability in full: 'dexterity'"),
    ("[check: Stealth, Lyra]", "warning", "lowercase"),
    ("[save: stealth, Lyra, 12]", "error", "saving throws use an ability"),
    ("[save: luck, Lyra, 12]", "error", "unknown ability"),
])
def test_skills_and_abilities(text, level, fragment):
    (lvl, msg), = check(text)
    assert lvl == level and fragment in msg


@pytest.mark.parametrize("text, level, fragment", [
    ("[spellcast: Elara, wish spell of doom, 3]", "warning", "unknown spell"),
    ("[spellcast: Elara, fireball, 2]", "error", "level-3 spell and cannot be cast with a level-2 slot"),
    ("[spellcast: Elara, fireball, 0]", "error", "level-0 slot"),
    ("[spellcast: Elara, fireball, 10]", "error", "outside 0-9"),
    ("[spellcast: Elara, fireball, -1]", "error", "outside 0-9"),
    ("[spellcast: Elara, fireball, three]", "error", "whole number"),
    ("[spellcast: Elara, fire bolt, 1]", "warning", "cantrip"),
    ("[spellcast: Thordak, shield, 1]", "warning", "casts no spells"),
    ("[spellcast: Pip, fireball, 3]", "warning", "no level-3 spell slots"),
    ("[spellcast: Sir Aldric, aid, 3]", "warning", "no level-3 spell slots"),
    ("[spellcast: Vex, hex, 1]", "warning", "no level-1 spell slots"),
])
def test_spells(text, level, fragment):
    found = check(text)
    assert any(lvl == level and fragment in msg for lvl, msg in found), found


@pytest.mark.parametrize("dc, expected", [("15", []), ("5", []), ("4", ["warning"]), ("1", ["warning"]),
                                          ("0", ["error"]), ("31", ["error"]), ("hard", ["error"]), ("15.5", ["error"])])
def test_dc_range(dc, expected):
    assert levels(f"[save: wisdom, Elara, {dc}]") == expected


@pytest.mark.parametrize("n, expected", [("-7", []), ("+8", []), ("8", ["warning"]), ("0", ["error"]),
                                         ("-250", ["warning"]), ("-1001", ["error"]), ("+1000", ["warning"]),
                                         ("lots", ["error"]), ("-1d6", ["error"])])
def test_health_change(n, expected):
    assert levels(f"[health: Thordak, {n}]") == expected


def test_inventory_action_and_item():
    (lvl, msg), = check("[inventory: Lyra, steal, gem]")
    assert lvl == "error" and "add, remove or use" in msg
    assert levels("[inventory: Lyra, add, " + "x" * 81 + "]") == ["error"]


def test_characters_must_be_in_party():
    (lvl, msg), = check("[health: Bob, -3]")
    assert lvl == "error" and "'Bob' is not in the party" in msg
    (lvl, msg), = check("[check: stealth, Lyar]")
    assert "did you mean 'Lyra'" in msg
    assert check("[health: thordak, -3]") == [("warning", "write the name exactly as in the party list: 'Thordak' not 'thordak'")]
    assert check("[health: Player, -3]") == []
    assert check("[health: Bob, -3]", party=[]) == []


def test_extension_tools_get_an_arity_check_only():
    reg = ToolRegistry.builtin()
    reg.add(ToolSpec("light", "custom tool", [ArgSpec("text"), ArgSpec("number", "int")]))
    assert check("[light: torch, 60]", registry=reg) == []
    assert check("[light: anything at all, not a number]", registry=reg) == []
    (lvl, msg), = check("[light: torch]", registry=reg)
    assert lvl == "error" and "light takes 2 arguments" in msg

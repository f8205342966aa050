"""Executing tool calls: exact FORMAT.md result lines, state changes, reproducible dice, clear ToolErrors."""

import random
import re

import pytest

from dndtrain.game import GameState, ToolError, execute
from dndtrain.registry import ArgSpec, ToolRegistry, ToolSpec
from dndtrain.scenario import Character, parse_text
from dndtrain.toolcalls import find_calls


def call(text):
    (c,) = find_calls(text)
    return c


def run(text, state=None, seed=0):
    state = state or GameState.default()
    return execute(call(text), state, random.Random(seed))


def test_dice_lines_have_the_format_and_add_up():
    for seed in range(30):
        line = run("[roll: d20+5]", seed=seed)
        m = re.fullmatch(r"d20\+5: 1d20 \((\d+)\) \+ 5 = \*(\d+)\*", line)
        assert m, line
        assert 1 <= int(m[1]) <= 20 and int(m[2]) == int(m[1]) + 5
        line = run("[roll: 2d6+3]", seed=seed)
        m = re.fullmatch(r"2d6\+3: 2d6 \((\d), (\d)\) \+ 3 = \*(\d+)\*", line)
        assert m, line
        assert int(m[3]) == int(m[1]) + int(m[2]) + 3


def test_min_and_max_faces_are_not_bolded_and_dropped_dice_are_marked():
    assert run("[roll: 1d1+2]") == "1d1+2: 1d1 (1) + 2 = *3*"
    assert "**" not in "".join(run("[roll: 8d6]", seed=s) for s in range(20))
    line = run("[roll: 2d20kh1+4]", seed=3)
    assert re.fullmatch(r"2d20kh1\+4: 2d20kh1 \((~~\d+~~, \d+|\d+, ~~\d+~~)\) \+ 4 = \*\d+\*", line), line


def test_same_seed_same_lines_and_global_random_untouched():
    random.seed(1234)
    before = random.getstate()
    a = [run(t, seed=7) for t in ("[roll: 8d6]", "[check: stealth, Lyra]", "[save: dexterity, Thordak, 15]")]
    b = [run(t, seed=7) for t in ("[roll: 8d6]", "[check: stealth, Lyra]", "[save: dexterity, Thordak, 15]")]
    assert a == b
    assert random.getstate() == before
    assert len({run("[roll: 8d6]", seed=s) for s in range(10)}) > 1


def test_check_uses_stated_bonus():
    for seed in range(10):
        m = re.fullmatch(r"stealth \(Lyra\): (\d+) \+ 7\(skill\) = \*(\d+)\*", run("[check: stealth, Lyra]", seed=seed))
        assert m and 1 <= int(m[1]) <= 20 and int(m[2]) == int(m[1]) + 7


def test_check_guesses_modifiers_deterministically():
    lines = {run("[check: strength, Thordak]", seed=s).split(": ")[1].split(" = ")[0].split(" + ")[1] for s in range(10)}
    assert lines == {"4(ability)"}  # Fighter: strength is primary, +3, +1 from level 4
    assert re.fullmatch(r"perception: \d+ \+ \d\(skill\) = \*\d+\*", run("[roll: perception]"))
    assert re.fullmatch(r"strength: \d+ \+ 4\(ability\) = \*\d+\*", run("[roll: strength]"))


def test_save_line_and_outcome():
    for seed in range(20):
        line = run("[save: dexterity, Thordak, 15]", seed=seed)
        m = re.fullmatch(r"dexterity save \(Thordak\): (\d+) \+ (\d+)\(save\) = \*(\d+)\* vs DC 15: \*(success|failure)\*", line)
        assert m, line
        assert int(m[3]) == int(m[1]) + int(m[2])
        assert (m[4] == "success") == (int(m[3]) >= 15)


def test_health_lines_clamp_and_unconscious():
    st = GameState.default()
    assert run("[health: Thordak, -7]", st) == "Thordak HP: 45 - 7 = *38*/45"
    assert run("[health: Thordak, +20]", st) == "Thordak HP: 38 + 20 = *45*/45"
    assert run("[health: Elara, -30]", st) == "Elara HP: 28 - 30 = *0*/28 (unconscious)"
    assert run("[health: Elara, +8]", st) == "Elara HP: 0 + 8 = *8*/28"
    assert run("[health: player, -1]", st) == "Thordak HP: 45 - 1 = *44*/45"


def test_inventory():
    st = GameState.default()
    assert run("[inventory: Lyra, add, silver dagger]", st) == "Lyra inventory: added silver dagger"
    assert run("[inventory: Lyra, use, potion of healing]", st) == "Lyra inventory: used potion of healing"
    assert run("[inventory: Lyra, remove, silver dagger]", st) == "Lyra inventory: removed silver dagger"
    with pytest.raises(ToolError, match="Lyra has no potion of healing"):
        run("[inventory: Lyra, use, potion of healing]", st)
    with pytest.raises(ToolError, match="add, remove or use"):
        run("[inventory: Lyra, drop, rope]", st)


def test_inventory_from_scenario_party_line():
    sc = parse_text(
        "# SYSTEM\nRole: Dungeon Master\nParty:\n- Talia (Half-Elf Fighter, Level 5, HP: 44/44, Inventory: rapier, potion of healing)\n"
        "- Bran (Human Fighter, Level 2, HP: 20/20)\n\n# USER\nHi\n\n# DM\nHello.\n"
    )
    st = GameState.from_scenario(sc)
    assert run("[inventory: Talia, use, potion of healing]", st) == "Talia inventory: used potion of healing"
    with pytest.raises(ToolError):
        run("[inventory: Talia, use, potion of healing]", st)
    # no inventory listed: unknown, so using an item is allowed
    assert run("[inventory: Bran, use, torch]", st) == "Bran inventory: used torch"


def test_spellcast_slots():
    st = GameState.default()
    assert run("[spellcast: Elara, fireball, 3]", st) == "Elara casts fireball (level 3 slot): 1 level-3 slot left"
    assert run("[spellcast: Elara, fireball, 3]", st) == "Elara casts fireball (level 3 slot): 0 level-3 slots left"
    with pytest.raises(ToolError, match="no level-3 spell slots left"):
        run("[spellcast: Elara, fireball, 3]", st)
    assert run("[spellcast: Elara, magic missile, 1]", st) == "Elara casts magic missile (level 1 slot): 3 level-1 slots left"
    assert run("[spellcast: Elara, fire bolt, 0]", st) == "Elara casts fire bolt (cantrip)"
    with pytest.raises(ToolError, match="no level-4 spell slots"):
        run("[spellcast: Elara, fireball, 4]", st)
    with pytest.raises(ToolError, match="Fighter"):
        run("[spellcast: Thordak, shield, 1]", st)


def test_warlock_and_half_caster_slots():
    st = GameState.from_party([Character("Vex", "Tiefling", "Warlock", 5, 38, 38),
                               Character("Ser Kay", "Human", "Paladin", 2, 20, 20)])
    assert run("[spellcast: Vex, hex, 3]", st) == "Vex casts hex (level 3 slot): 1 level-3 slot left"
    with pytest.raises(ToolError):
        run("[spellcast: Vex, hex, 1]", st)
    assert run("[spellcast: Ser Kay, bless, 1]", st) == "Ser Kay casts bless (level 1 slot): 1 level-1 slot left"


@pytest.mark.parametrize("text", [
    "[roll: 1000d6]", "[roll: 1d100000]", "[roll: d20+]", "[roll: 1d6/0]", "[roll: 1d1e1]", "[attack: goblin]",
    "[health: Nobody, -3]", "[health: Thordak, 0]", "[save: dexterity, Thordak, 99]", "[check: luck, Lyra]",
    "[roll: 99999999999999999999999d6]", "[spellcast: Elara, fireball, 2]",
])
def test_invalid_calls_raise_tool_error_only(text):
    with pytest.raises(ToolError):
        run(text)


def test_extension_tool_generic_line():
    reg = ToolRegistry.builtin()
    reg.add(ToolSpec("light", "custom tool", [ArgSpec("text"), ArgSpec("number", "int")]))
    assert run("[light: torch, 60]", GameState.default(reg)) == "light: torch, 60 = *ok*"


def test_empty_party_creates_characters_on_use():
    st = GameState.from_party([])
    assert run("[health: Bob, -3]", st) == "Bob HP: 10 - 3 = *7*/10"
    assert [c.name for c in st.characters] == ["Bob"]

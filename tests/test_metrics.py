import random

import pytest

from dndtrain import metrics
from dndtrain.game import GameState
from dndtrain.registry import ToolRegistry
from dndtrain.scenario import Character

REG = ToolRegistry.builtin()
PARTY = [Character("Thordak", "Dragonborn", "Fighter", 5, 45, 45), Character("Elara", "Elf", "Wizard", 5, 28, 28)]
EXPECTED = "Thordak swings at the ogre. [roll: d20+7] [health: Thordak, -4]"


def score(generated, expected=EXPECTED, stopped=True):
    return metrics.score_example(expected, generated, REG, stopped, GameState.from_party(PARTY, REG), random.Random(1))


def test_perfect_generation_scores_one_everywhere():
    s = score("The axe falls! [roll: 1d20 + 7] [health: thordak, -4]")
    assert s.format_ok and s.tool_tp == 2 and s.tool_fp == 0 and s.tool_fn == 0
    assert s.args_matched == [True, True]  # 1d20 + 7 == d20+7, case-insensitive names
    assert s.executed == [None, None]
    assert s.response_ok and s.no_call_ok is None
    agg = metrics.aggregate([s])
    for key in ("format_validity", "tool_precision", "tool_recall", "tool_f1", "arg_accuracy", "executability",
                "response_ok"):
        assert agg[key] == 1.0, key
    assert agg["no_call_accuracy"] is None


def test_wrong_tool_is_a_false_positive_and_a_miss():
    s = score("The axe falls! [check: athletics, Thordak] [health: Thordak, -4]")
    assert (s.tool_tp, s.tool_fp, s.tool_fn) == (1, 1, 1)
    assert s.fp_by_tool == {"check": 1} and s.fn_by_tool == {"roll": 1}
    assert s.format_ok  # a wrong but well-formed call is still valid format
    tools = metrics.per_tool([s], REG.names())
    assert tools["health"]["f1"] == 1.0 and tools["roll"]["recall"] == 0.0 and tools["check"]["precision"] == 0.0
    agg = metrics.aggregate([s])
    assert agg["tool_precision"] == 0.5 and agg["tool_recall"] == 0.5 and agg["tool_f1"] == 0.5


def test_wrong_argument_counts_the_name_but_not_the_args():
    s = score("The axe falls! [roll: d20+7] [health: Thordak, -5]")
    assert (s.tool_tp, s.tool_fp, s.tool_fn) == (2, 0, 0)
    assert s.args_matched == [True, False]
    assert metrics.aggregate([s])["arg_accuracy"] == 0.5
    assert metrics.per_tool([s])["health"]["arg_accuracy"] == 0.0


def test_argument_normalisation():
    n = metrics.normalize_arg
    assert n("+5") == n("5") == "5"
    assert n("-07") == "-7"
    assert n("d20+5") == n("1d20+5") == n("1D20 + 5") == "1d20+5"
    assert n("2d20kh1+4") == "2d20kh1+4"
    assert n("  Sleight  of Hand ") == "sleight of hand"
    assert n("Fire Bolt") == "fire bolt"
    assert n("dexterity") == "dexterity"  # a word starting with d is not dice


def test_spurious_call_fails_no_call_accuracy():
    s = score("You sit by the fire. [roll: d20]", expected="The fire crackles; nobody speaks.")
    assert s.no_call_ok is False and s.tool_fp == 1
    quiet = score("Embers drift up into the dark.", expected="The fire crackles; nobody speaks.")
    assert quiet.no_call_ok is True
    agg = metrics.aggregate([s, quiet])
    assert agg["no_call_accuracy"] == 0.5 and agg["n_no_call_examples"] == 2
    assert agg["tool_precision"] == 0.0


def test_missing_call_is_a_miss_with_zero_recall():
    s = score("Thordak swings and the ogre staggers back.")
    assert (s.tool_tp, s.tool_fp, s.tool_fn) == (0, 0, 2)
    agg = metrics.aggregate([s])
    assert agg["tool_recall"] == 0.0 and agg["tool_f1"] == 0.0 and agg["arg_accuracy"] == 0.0
    assert agg["executability"] is None  # nothing generated, nothing to execute


def test_malformed_and_wrong_arity_calls_fail_format():
    unclosed = score("He swings. [roll: d20+7")
    assert not unclosed.format_ok and any("malformed" in p for p in unclosed.format_problems)
    no_colon = score("He swings. [roll d20+7]")
    assert not no_colon.format_ok
    arity = score("He swings. [health: Thordak]")
    assert not arity.format_ok and "takes 2" in arity.format_problems[0]
    unknown = score("He swings. [attack: Thordak, ogre]")
    assert not unknown.format_ok and "unknown tool" in unknown.format_problems[0]
    assert unknown.executed and unknown.executed[0]  # and it cannot execute
    assert metrics.aggregate([unclosed, no_colon, arity, score(EXPECTED)])["format_validity"] == 0.25


def test_executability_uses_the_game_state():
    s = score("Zap. [spellcast: Thordak, fireball, 3] [health: Nobody, -3] [roll: d20+7]")
    assert s.executed[0] and "no spell slots" in s.executed[0]  # Fighters cannot cast
    assert s.executed[1] and "not in the party" in s.executed[1]
    assert s.executed[2] is None
    assert metrics.aggregate([s])["executability"] == pytest.approx(1 / 3)


def test_role_marker_leak_is_detected():
    for leak in ("The ogre roars.<|im_end|>", "The ogre roars.\n<|im_start|>user\nI run", "Done.\nuser\nI attack",
                 "Done.\nassistant\nMore", "### user\nhello"):
        s = score(leak)
        assert s.role_markers, leak
        assert not s.response_ok
    assert score("The user of the wand, an assistant to the mage, waits.").role_markers == []


def test_repetition_loop_and_unfinished_reply():
    loop = score("I'm here to help you. " * 12, stopped=False)
    assert loop.loop and loop.repetition > 0.5 and not loop.response_ok
    chars = score("The ogre roars" + "!!!!!!!!" * 6)
    assert chars.loop
    prose = score("The ogre roars and lunges across the bridge, its club whistling over Thordak's head "
                  "while Elara ducks behind a crate and mutters the words of a spell she barely remembers.")
    assert not prose.loop and prose.response_ok
    cut = score("The ogre roars and", stopped=False)
    assert not cut.stopped_at_eot and not cut.response_ok
    empty = score("   ")
    assert not empty.non_empty
    agg = metrics.aggregate([loop, prose, cut, empty])
    assert agg["no_loop"] == 0.75
    assert agg["non_empty"] == 0.75 and agg["stopped_at_eot"] == 0.5


def test_prf_edge_cases():
    assert metrics.prf(0, 0, 0) == (1.0, 1.0, 1.0)
    assert metrics.prf(0, 0, 3) == (0.0, 0.0, 0.0)
    assert metrics.prf(2, 2, 0) == (0.5, 1.0, pytest.approx(2 / 3))
    assert metrics.aggregate([])["tool_f1"] is None
    assert metrics.fmt(None) == "n/a" and metrics.fmt(12.345, "perplexity") == "12.35"


def test_mistakes_groups_wrong_turns_by_context_reference_and_generation():
    after_tool, after_player = "after a tool result", "after a player message"
    items = [
        (after_tool, "a.md:3", score("The ogre reels. [roll: d20+7]", expected="The ogre falls.")),
        (after_tool, "b.md:9", score("[roll: 1d8+3] It staggers.", expected="It falls silent.")),
        (after_player, "c.md:1", score("[check: persuasion, Elara] He smiles.", expected='"Evening," he says.')),
        (after_tool, "d.md:5", score("[roll: d20+7] [health: Thordak, -4]")),  # right: not a mistake
        (after_tool, "e.md:7", score("[roll: d20+7]")),  # missed the health call
    ]
    out = metrics.mistakes(items)
    assert out[0] == {"context": after_tool, "expected": "no call", "generated": "roll", "turns": 2,
                      "examples": ["a.md:3", "b.md:9"]}
    rest = {(m["context"], m["expected"], m["generated"]): m["turns"] for m in out[1:]}
    assert rest == {(after_player, "no call", "check"): 1, (after_tool, "health + roll", "roll"): 1}
    assert metrics.mistakes(items, top=1) == out[:1]
    assert metrics.mistakes(items[3:4]) == []

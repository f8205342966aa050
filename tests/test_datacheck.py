"""Data check and corpus stats: clear report lines, never a traceback, whatever the files contain."""

import argparse
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dndtrain import cli_data
from dndtrain.datacheck import check_paths, corpus_stats, damage_was_rolled, stats_chart, stats_markdown
from dndtrain.registry import ToolRegistry
from dndtrain.scenario import ScenarioError, load_scenarios, parse_text

REG = ToolRegistry.builtin()

GOOD = """# SYSTEM
Role: Dungeon Master
World: Forgotten Realms
Location: A road
Party:
- Thordak (Dragonborn Fighter, Level 5, HP: 45/45)
- Elara (Elf Wizard, Level 5, HP: 28/28)

# USER
We walk on.

# DM
Goblins attack! [roll: d20+4] [roll: 1d6+4]

# TOOLCALL
d20+4: 1d20 (12) + 4 = *16*
1d6+4: 1d6 (3) + 4 = *7*

# DM
The goblin's blade bites. Elara? [health: Thordak, -7] [spellcast: Elara, fireball, 3] [save: dexterity, Thordak, 15]

# TOOLCALL
Thordak HP: 45 - 7 = *38*/45
Elara casts fireball (level 3 slot): 1 level-3 slot left
dexterity save (Thordak): 8 + 1(save) = *9* vs DC 15: *failure*

# DM
The fire washes over everyone.
"""


def write_scene(root: Path, rel: str, text: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def cli(argv):
    parser = argparse.ArgumentParser()
    cli_data.add_commands(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_clean_scenario_has_no_findings(tmp_path):
    write_scene(tmp_path, "combat/good.md", GOOD)
    report = check_paths(tmp_path, REG)
    assert report.files_checked == 1
    assert [str(x) for x in report.lines] == []
    assert report.summary() == "1 file(s) checked: 0 error(s), 0 warning(s)"


def test_bad_calls_and_result_lines_are_reported_with_lines(tmp_path):
    bad = (GOOD.replace("[health: Thordak, -7]", "[health: Thordakk, -7]")
           .replace("1 level-3 slot left", "2 level-3 slots left")
           .replace("(12) + 4 = *16*", "(12) + 4 = *17*")
           .replace("[save: dexterity, Thordak, 15]", "[save: dexterity, Thordak, 45]"))
    path = write_scene(tmp_path, "combat/bad.md", bad)
    lines = [str(x) for x in check_paths(tmp_path, REG).lines]
    assert f"{path}:20: error: [health: Thordakk, -7]: 'Thordakk' is not in the party (Thordak, Elara, or player) (did you mean 'Thordak'?)" in lines
    assert f"{path}:16: warning: result line does not fit [roll: d20+4]: the dice and modifiers add up to 16, not 17" in lines
    assert f"{path}:24: warning: result line does not fit [spellcast: Elara, fireball, 3]: Elara should have 1 level-3 slot left, not 2" in lines
    assert f"{path}:20: error: [save: dexterity, Thordak, 45]: DC 45 is outside 1-30" in lines
    assert len(lines) == 4


@pytest.mark.parametrize("old, new, fragment", [
    ("Thordak HP: 45 - 7 = *38*/45", "Elara HP: 28 - 7 = *21*/28", "expected it to start with 'Thordak HP:'"),
    ("Thordak HP: 45 - 7 = *38*/45", "Thordak HP: 40 - 7 = *33*/45", "Thordak has 45 HP at this point, not 40"),
    ("d20+4: 1d20 (12)", "d20+4: 1d20 (25)", "outside 1-20"),
    ("d20+4: 1d20 (12) + 4", "d20+4: 2d20 (12, 3) + 4", "do not match"),
    ("*9* vs DC 15: *failure*", "*9* vs DC 15: *success*", "is a failure, not a success"),
    ("Elara casts fireball", "Elara casts fire bolt", "expected it to start with 'Elara casts fireball (level 3 slot):'"),
])
def test_result_line_mismatches_warn(tmp_path, old, new, fragment):
    write_scene(tmp_path, "c/x.md", GOOD.replace(old, new))
    report = check_paths(tmp_path, REG)
    assert report.errors == 0
    assert any(fragment in x.message and x.level == "warning" for x in report.lines), [str(x) for x in report.lines]


def test_damage_must_be_rolled_before_health_applies_it(tmp_path):
    def warnings(text):
        write_scene(tmp_path, "c/x.md", text)
        return [str(x) for x in check_paths(tmp_path, REG).lines if "no roll since" in x.message]

    path = tmp_path / "c/x.md"
    assert warnings(GOOD) == []
    # the same turn as the roll cannot know its total
    same_turn = GOOD.replace("[roll: 1d6+4]", "[roll: 1d6+4] [health: Elara, -7]").replace(
        "+ 4 = *7*\n", "+ 4 = *7*\nElara HP: 28 - 7 = *21*/28\n")
    assert warnings(same_turn) == [
        f"{path}:13: warning: [health: Elara, -7]: no roll since the player's message adds up to 7; roll the damage "
        "first ([roll: 1d8+2]) and apply its total in the next DM turn"]
    # a number no roll produced (fixed damage after an attack roll)
    assert len(warnings(GOOD.replace("[health: Thordak, -7]", "[health: Thordak, -5]").replace(
        "45 - 7 = *38*", "45 - 5 = *40*"))) == 1
    # half (a save for half), healing and rolls before the player's message do not count / are not damage
    assert warnings(GOOD.replace("[health: Thordak, -7]", "[health: Thordak, -3]").replace(
        "45 - 7 = *38*", "45 - 3 = *42*")) == []
    assert warnings(GOOD.replace("[health: Thordak, -7]", "[health: Thordak, +5]").replace(
        "45 - 7 = *38*", "45 + 5 = *45*")) == []
    later = GOOD + "\n# USER\nI shrug it off.\n\n# DM\nIt stings. [health: Elara, -7]\n\n# TOOLCALL\nElara HP: 28 - 7 = *21*/28\n\n# DM\nYou press on.\n"
    assert len(warnings(later)) == 1


def test_damage_was_rolled_sums_halves_and_doubles():
    assert damage_was_rolled(7, [7])
    assert damage_was_rolled(13, [16, 7, 6])  # two hits
    assert damage_was_rolled(3, [7]) and damage_was_rolled(14, [7])
    assert not damage_was_rolled(5, [7, 16])
    assert not damage_was_rolled(5, [])


def test_malformed_calls_and_unknown_classes(tmp_path):
    text = GOOD.replace("The fire washes over everyone.", "The fire washes over everyone. [roll d20]").replace(
        "Elf Wizard", "Elf Artificer")
    write_scene(tmp_path, "c/x.md", text)
    msgs = [(x.level, x.message) for x in check_paths(tmp_path, REG).lines]
    assert ("error", "malformed tool call '[roll d20]' (write '[name: arg1, arg2]')") in msgs
    assert ("warning", "Elara: class 'Artificer' is not one of the 12 SRD classes") in msgs


@pytest.mark.parametrize("content, fragment", [
    (b"\x00\x01\x02binary", "binary file"),
    ("# SYSTEM\nRole: DM\n".encode("latin-1") + b"\xe9\xff", "not valid UTF-8"),
    (b"# SYSTEM\n" + b"x" * (300 * 1024), "limited to"),
    (b"hello", "text before the first section"),
    (b"", "no sections found"),
    (GOOD.replace("# DM\nThe fire", "# USER\nThe fire").encode(), "must end with a '# DM' turn"),
])
def test_unparsable_files_become_error_lines(tmp_path, content, fragment):
    write_scene(tmp_path, "c/bad.md", content)
    write_scene(tmp_path, "c/good.md", GOOD)
    report = check_paths(tmp_path, REG)
    assert report.files_checked == 2 and report.errors == 1
    (line,) = report.lines
    assert line.path.endswith("bad.md") and fragment in line.message


def test_odd_roots(tmp_path):
    (tmp_path / "dir.md").mkdir()
    assert [x.message for x in check_paths(tmp_path, REG).lines] == ["no scenario files (*.md) found"]
    assert [x.message for x in check_paths(tmp_path / "missing", REG).lines] == ["does not exist"]
    f = write_scene(tmp_path, "one.md", GOOD)
    assert check_paths(f, REG).files_checked == 1


@settings(max_examples=150, deadline=None, database=None)
@given(st.text(max_size=400))
def test_parse_text_only_raises_scenario_error(text):
    try:
        parse_text(text)
    except ScenarioError:
        pass


_DM_BITS = st.sampled_from([
    "[roll: d20+5]", "[roll: 999d999999]", "[roll: (((]", "[health: Thordak, -0]", "[health: Elara, x]",
    "[spellcast: Elara, fireball, 99]", "[spellcast: Thordak, , 3]", "[check: , ]", "[save: a, b, c, d]",
    "[inventory: Elara, use]", "[light: torch, 60]", "[roll: 1d1e1]", "[roll: 1d6/0]", "[ roll : perception ]",
    "[roll d20]", "[roll:", "text", "\n", "]", "[", "# DM", "# TOOLCALL", "# USER", "\x00", "é",
])


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.one_of(
        st.binary(max_size=300),
        st.lists(_DM_BITS, max_size=12).map(lambda bits: (GOOD.split("# USER")[0] + "# USER\nhi\n\n# DM\n"
                                                           + " ".join(bits)).encode("utf-8")),
        st.lists(st.one_of(_DM_BITS, st.text(max_size=10)), max_size=12).map(
            lambda bits: GOOD.replace("Goblins attack!", " ".join(bits)).encode("utf-8", "surrogatepass")),
    )
)
def test_check_paths_never_raises(raw):
    with tempfile.TemporaryDirectory() as d:
        write_scene(Path(d), "c/x.md", raw)
        report = check_paths(d, REG)
        assert report.files_checked == 1
        for line in report.lines:
            assert line.level in ("error", "warning") and str(line).startswith(str(Path(d)))


def test_corpus_stats_chart_and_markdown(tmp_path):
    write_scene(tmp_path / "s", "combat/a.md", GOOD)
    write_scene(tmp_path / "s", "roleplay/b.md", GOOD.split("# DM\nGoblins")[0] + "# DM\nA quiet night.\n")
    scenarios = load_scenarios(tmp_path / "s")
    stats = corpus_stats(scenarios, REG)
    assert stats["files"] == 2 and stats["dm_turns"] == 4
    assert stats["categories"]["combat"] == {"files": 1, "turns": 6, "dm_turns": 3}
    assert stats["calls_per_tool"]["roll"] == 2 and stats["calls_per_tool"]["inventory"] == 0
    assert (stats["dm_turns_no_call"], stats["dm_turns_one_call"], stats["dm_turns_multi_call"]) == (2, 0, 2)
    assert stats["dm_turns_no_call_share"] == 0.5
    assert stats["first_call_by_context"] == {
        "after a player message": {"no call": 1, "roll": 1},
        "after a tool result": {"health": 1, "no call": 1},
    }
    assert stats["classes"] == {"Fighter": 2, "Wizard": 2} and stats["levels"] == {5: 4}
    assert stats["party_sizes"] == {2: 2} and stats["worlds"] == {"Forgotten Realms": 2}
    assert stats["length_unit"] == "words" and stats["dm_turn_length"]["min"] == 3
    tok = corpus_stats(scenarios, REG, count_tokens=lambda t: 1000)
    assert tok["length_unit"] == "tokens" and tok["file_length"] == {"min": 1000, "mean": 1000.0, "p95": 1000, "max": 1000}
    png = stats_chart(stats, tmp_path / "out" / "stats.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = stats_markdown(stats)
    assert "| combat | 1 | 6 | 3 |" in md and "| `roll` | 2 |" in md and "| no tool call | 2 (50%) |" in md
    assert "| after a player message | 2 | no call 50%, roll 50% |" in md
    json.dumps(stats)


def test_cli_data_check_exit_codes(tmp_path, capsys):
    write_scene(tmp_path / "ok", "c/good.md", GOOD)
    assert cli(["data", "check", str(tmp_path / "ok"), "--registry", str(tmp_path / "none.json")]) == 0
    assert capsys.readouterr().out.strip() == "1 file(s) checked: 0 error(s), 0 warning(s)"
    cases = {
        "binary": b"\x00\x00\x89PNG",
        "latin1": "# SYSTEM\nRole: Ma\xeetre\n".encode("latin-1"),
        "huge": b"# SYSTEM\n" + b"a" * (2 * 1024 * 1024),
        "dice": GOOD.replace("[roll: d20+4]", "[roll: 100000000d100000000]").encode(),
    }
    for name, content in cases.items():
        root = tmp_path / name
        write_scene(root, "c/x.md", content)
        assert cli(["data", "check", str(root), "--registry", str(tmp_path / "none.json")]) == 1, name
        out = capsys.readouterr().out
        assert f"{root}" in out and ": error: " in out and "1 error(s)" in out, out
    assert cli(["data", "check", str(tmp_path / "missing")]) == 1
    (tmp_path / "bad.json").write_bytes(b"\xff")
    assert cli(["data", "check", str(tmp_path / "ok"), "--registry", str(tmp_path / "bad.json")]) == 1
    assert "error:" in capsys.readouterr().err


def test_cli_tools_exec_errors_return_1(tmp_path, capsys):
    assert cli(["tools", "exec", "[roll: d20+5]", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert cli(["tools", "exec", "[roll: d20+5]", "--seed", "1"]) == 0
    assert capsys.readouterr().out == first and first.startswith("d20+5: 1d20 (")
    for bad in ["[roll: 99999999999999d99999999999]", "[roll: 1d6/0]", "not a call", "[roll d20]",
                "[roll: " + "9" * 100000 + "]", "[health: Nobody, -5]", "\x00\xff"]:
        assert cli(["tools", "exec", bad]) == 1, bad
        assert capsys.readouterr().err.startswith("error: ")
    for content in (b"\x00binary", b"\xff\xfe", b"# SYSTEM\n" + b"z" * (1024 * 1024)):
        path = write_scene(tmp_path, "s.md", content)
        assert cli(["tools", "exec", "[roll: d20]", "--scenario", str(path)]) == 1
        assert "error:" in capsys.readouterr().err
    good = write_scene(tmp_path, "g.md", GOOD)
    assert cli(["tools", "exec", "[health: Elara, -3]", "--scenario", str(good)]) == 0
    assert capsys.readouterr().out.strip() == "Elara HP: 28 - 3 = *25*/28"


def test_cli_data_stats(tmp_path, capsys):
    write_scene(tmp_path / "s", "combat/a.md", GOOD)
    readme = tmp_path / "README.md"
    readme.write_text("# Data\n\n<!-- stats:start -->\nOLD-BLOCK-XYZ\n<!-- stats:end -->\ntail\n")
    png = tmp_path / "p.png"
    assert cli(["data", "stats", str(tmp_path / "s"), "--png", str(png), "--update-readme", str(readme)]) == 0
    out = capsys.readouterr().out
    assert "1 scenario files (combat 1)" in out and "first call after a tool result: health 50%, no call 50%" in out
    text = readme.read_text()
    assert "OLD-BLOCK-XYZ" not in text and "| combat | 1 | 6 | 3 |" in text and text.endswith("<!-- stats:end -->\ntail\n")
    assert png.exists()
    assert cli(["data", "stats", str(tmp_path / "s"), "--json", "--png", ""]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == 1
    readme.write_text("no markers")
    assert cli(["data", "stats", str(tmp_path / "s"), "--png", "", "--update-readme", str(readme)]) == 1
    write_scene(tmp_path / "s", "combat/bin.md", b"\x00\x01")
    assert cli(["data", "stats", str(tmp_path / "s"), "--png", ""]) == 1
    assert "binary file" in capsys.readouterr().err


def test_cli_data_check_several_paths(tmp_path, capsys):
    """Files and folders mix on one command line; a file named twice is checked once; one missing path fails."""
    good = write_scene(tmp_path / "a", "c/good.md", GOOD)
    write_scene(tmp_path / "b", "c/other.md", GOOD)
    none = ["--registry", str(tmp_path / "none.json")]
    assert cli(["data", "check", str(good), str(tmp_path / "b"), str(tmp_path / "a"), *none]) == 0
    assert capsys.readouterr().out.strip() == "2 file(s) checked: 0 error(s), 0 warning(s)"
    assert cli(["data", "check", str(good), str(tmp_path / "missing"), *none]) == 1
    out = capsys.readouterr().out
    assert str(tmp_path / "missing") in out and "does not exist" in out
    assert out.strip().endswith("1 file(s) checked: 1 error(s), 0 warning(s)")

"""Tool extension: a new tool in the data flows through scan -> extend -> registry -> validate/execute -> docs."""

import argparse
import json
import random

import pytest

from dndtrain import cli_data
from dndtrain.extension import extend, infer_kind, scan, write_docs
from dndtrain.game import GameState, execute
from dndtrain.registry import RegistryError, ToolRegistry
from dndtrain.rules import validate_call
from dndtrain.scenario import load_scenarios
from dndtrain.toolcalls import find_calls

HEADER = """# SYSTEM
Role: Dungeon Master
World: Forgotten Realms
Location: A dark cave
Party:
- Thordak (Dragonborn Fighter, Level 5, HP: 45/45)
- Elara (Elf Wizard, Level 5, HP: 28/28)
"""


def write_scene(folder, name, exchanges):
    """exchanges: list of (user text, dm text, [result lines], follow-up dm text or None)."""
    parts = [HEADER]
    for user, dm, results, follow in exchanges:
        parts += [f"# USER\n{user}\n", f"# DM\n{dm}\n"]
        if results:
            parts += ["# TOOLCALL\n" + "\n".join(results) + "\n", f"# DM\n{follow}\n"]
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


@pytest.fixture()
def corpus(tmp_path):
    root = tmp_path / "scenarios"
    write_scene(root / "exploration", "cave.md", [
        ("We light a torch.", "Thordak strikes flint. [light: torch, 60]", ["light: torch, 60 = *ok*"], "The cave glows."),
        ("Deeper.", "The torch gutters. [light: lantern, 30] [roll: d20+2]",
         ["light: lantern, 30 = *ok*", "d20+2: 1d20 (5) + 2 = *7*"], "Darkness presses in."),
    ])
    write_scene(root / "combat", "ambush.md", [
        ("Ready!", "Elara, a net! [mark: Elara, 3] [roll: 2d6]", ["mark: Elara, 3 = *ok*", "2d6: 2d6 (1, 2) = *3*"], "Ouch."),
        ("Again.", "Thordak too. [mark: Thordak, 2]", ["mark: Thordak, 2 = *ok*"], "Both marked."),
    ])
    return root


def test_scan_finds_new_tools_with_examples_and_kinds(corpus):
    found = {t.name: t for t in scan(load_scenarios(corpus), ToolRegistry.builtin())}
    assert set(found) == {"light", "mark"}
    light = found["light"]
    assert (light.count, light.arity, light.arg_kinds) == (2, 2, ["text", "int"])
    assert [e.call for e in light.examples] == ["[light: torch, 60]", "[light: lantern, 30]"]
    first = light.examples[0]
    assert first.path.endswith("cave.md")
    lines = (corpus / "exploration" / "cave.md").read_text().split("\n")
    assert "[light: torch, 60]" in lines[first.line - 1]
    assert "[light: lantern, 30]" in lines[light.examples[1].line - 1]
    assert found["mark"].arg_kinds == ["character", "int"]


def test_infer_kind():
    names = [frozenset({"elara", "player"})] * 3
    assert infer_kind(["-3", "+2", "4"], names) == "signed_int"
    assert infer_kind(["d20+5", "2d6", "3"], names) == "dice"
    assert infer_kind(["Elara", "player", "elara"], names) == "character"
    assert infer_kind(["torch", "60", "x"], names) == "text"


def test_extend_registers_tools_and_is_idempotent(corpus, tmp_path):
    reg_path = tmp_path / "out" / "tool_registry.json"
    scenarios = load_scenarios(corpus)
    result = extend(scenarios, reg_path)
    assert sorted(s.name for s in result.added) == ["light", "mark"]
    first = reg_path.read_bytes()
    data = json.loads(first)
    assert {t["name"]: t["builtin"] for t in data["tools"]}["light"] is False
    reg = ToolRegistry.load(reg_path)
    assert "light" in reg and reg.get("light").arity == 2
    assert any(line.startswith("[light: text, number]") for line in reg.prompt_lines())
    # the new tool validates and executes
    (c,) = find_calls("[light: torch, 60]")
    assert validate_call(c, reg, scenarios[0].party) == []
    assert execute(c, GameState.default(reg), random.Random(0)) == "light: torch, 60 = *ok*"
    (bad,) = find_calls("[light: torch]")
    assert [f.level for f in validate_call(bad, reg, [])] == ["error"]
    # idempotent
    again = extend(scenarios, reg_path)
    assert again.added == [] and sorted(again.known) == ["light", "mark"]
    assert reg_path.read_bytes() == first
    assert scan(scenarios, reg) == []


def test_extend_with_corrupt_registry_raises(corpus, tmp_path):
    reg_path = tmp_path / "tool_registry.json"
    reg_path.write_text("{oops")
    with pytest.raises(RegistryError):
        extend(load_scenarios(corpus), reg_path)


def test_write_docs_lists_every_tool_with_counts_and_examples(corpus, tmp_path):
    scenarios = load_scenarios(corpus)
    reg_path = tmp_path / "tool_registry.json"
    extend(scenarios, reg_path)
    out = write_docs(scenarios, ToolRegistry.load(reg_path), tmp_path / "docs" / "tools.md")
    text = out.read_text()
    for name in ("roll", "health", "inventory", "spellcast", "check", "save", "light", "mark"):
        assert f"## {name}\n" in text
    assert "| `roll` | built-in | `[roll: dice or skill]` | 2 |" in text
    assert "| `light` | extension | `[light: text, number]` | 2 |" in text
    assert "- `[light: torch, 60]` (" in text and "cave.md:" in text
    assert "Examples (none in the data yet)" in text  # e.g. health, unused here
    # before extending, docs list the unregistered tools
    text2 = write_docs(scenarios, ToolRegistry.builtin(), tmp_path / "d2.md").read_text()
    assert "## Unregistered tools in the data" in text2 and "`light`: 2 use(s)" in text2


def _cli(argv):
    parser = argparse.ArgumentParser()
    cli_data.add_commands(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_scan_extend_docs(corpus, tmp_path, capsys):
    reg = str(tmp_path / "r.json")
    assert _cli(["tools", "scan", str(corpus), "--registry", reg]) == 0
    assert "light: 2 call(s), 2 argument(s) (text, int)" in capsys.readouterr().out
    assert _cli(["tools", "extend", str(corpus), "--registry", reg]) == 0
    assert "added [light: text, number]" in capsys.readouterr().out
    assert _cli(["tools", "extend", str(corpus), "--registry", reg]) == 0
    assert "no new tools" in capsys.readouterr().out
    assert _cli(["tools", "docs", str(corpus), "--registry", reg, "--out", str(tmp_path / "doc.md")]) == 0
    assert (tmp_path / "doc.md").read_text().count("## light") == 1
    assert _cli(["tools", "exec", "[light: torch, 60]", "--registry", reg]) == 0
    assert capsys.readouterr().out.strip().endswith("light: torch, 60 = *ok*")
    (tmp_path / "bad.json").write_text("[[[")
    assert _cli(["tools", "extend", str(corpus), "--registry", str(tmp_path / "bad.json")]) == 1
    assert "error:" in capsys.readouterr().err

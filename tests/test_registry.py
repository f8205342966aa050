"""Tool registry: built-ins, prompt lines, JSON load/save and clear errors for bad files."""

import json

import pytest

from dndtrain.registry import ArgSpec, RegistryError, ToolRegistry, ToolSpec

BUILTINS = ["roll", "health", "inventory", "spellcast", "check", "save"]


def test_builtin_tools_and_arity():
    reg = ToolRegistry.builtin()
    assert reg.names() == BUILTINS
    assert {n: reg.get(n).arity for n in BUILTINS} == {
        "roll": 1, "health": 2, "inventory": 3, "spellcast": 3, "check": 2, "save": 3,
    }
    assert all(reg.get(n).builtin for n in BUILTINS)
    assert reg.get("inventory").args[1].choices == ("add", "remove", "use")


def test_get_is_case_insensitive_and_unknown_is_none():
    reg = ToolRegistry.builtin()
    assert reg.get("ROLL").name == "roll"
    assert reg.get("light") is None
    assert "Roll" in reg and "light" not in reg


def test_prompt_lines_are_short_syntax_lines():
    lines = ToolRegistry.builtin().prompt_lines()
    assert len(lines) == 6
    assert lines[0] == "[roll: dice or skill] roll dice"
    assert lines[2].startswith("[inventory: character, add|remove|use, item]")
    assert all(len(line) <= 95 for line in lines), lines


def test_load_missing_file_is_builtins_only(tmp_path):
    reg = ToolRegistry.load(tmp_path / "nope.json")
    assert reg.names() == BUILTINS
    assert reg.custom() == []


def test_save_load_roundtrip_keeps_custom_tools(tmp_path):
    reg = ToolRegistry.builtin()
    reg.add(ToolSpec("light", "custom tool", [ArgSpec("text"), ArgSpec("number", "int")], ["[light: torch, 60]"]))
    path = reg.save(tmp_path / "sub" / "tool_registry.json")
    assert [p.name for p in path.parent.iterdir()] == ["tool_registry.json"]  # no temp file left behind
    data = json.loads(path.read_text())
    assert [t["name"] for t in data["tools"]] == BUILTINS + ["light"]
    assert [t["builtin"] for t in data["tools"]] == [True] * 6 + [False]
    again = ToolRegistry.load(path)
    assert again.names() == BUILTINS + ["light"]
    light = again.get("light")
    assert (light.builtin, light.arity, light.args[1].kind) == (False, 2, "int")
    assert again.to_json() == reg.to_json()
    assert again.prompt_lines()[-1] == "[light: text, number] custom tool, e.g. [light: torch, 60]"


def test_builtin_entries_in_file_cannot_override_code(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"tools": [{"name": "roll", "description": "hacked", "args": []}]}))
    reg = ToolRegistry.load(path)
    assert reg.get("roll").arity == 1 and reg.get("roll").description == "roll dice"


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b'"just a string"', "'tools' list"),
        (b'{"tools": [{"name": "Bad Name"}]}', "lowercase identifier"),
        (b'{"tools": [{"name": "x", "args": [{"name": "a", "kind": "weird"}]}]}', "unknown kind"),
        (b'{"tools": [{"name": "x"}, {"name": "x"}]}', "listed twice"),
        (b'{"tools": [{"name": "x", "args": "nope"}]}', "args must be a list"),
        (b"[" * 100000 + b"]" * 100000, "registry"),
    ],
)
def test_corrupt_registry_raises_clear_error(tmp_path, content, fragment):
    path = tmp_path / "tool_registry.json"
    path.write_bytes(content)
    with pytest.raises(RegistryError) as exc:
        ToolRegistry.load(path)
    assert str(path) in str(exc.value)
    assert fragment in str(exc.value)


def test_directory_as_registry_is_an_error(tmp_path):
    with pytest.raises(RegistryError, match="directory"):
        ToolRegistry.load(tmp_path)

"""The tool registry: the six built-in D&D tools plus extension tools found in the data.

The registry is what the model is told about (one short line per tool in its system prompt, see `prompt_lines`), what
the validator checks calls against (`dndtrain.rules`) and what `dndtrain tools extend` grows. It is stored as JSON
(`trained_models/tool_registry.json`); built-in tools always come from this module, so the file only matters for
extension tools.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGISTRY_VERSION = 1
MAX_REGISTRY_BYTES = 1024 * 1024
MAX_TOOLS = 200
MAX_ARGS = 8
NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")

ARG_KINDS: dict[str, str] = {
    "dice_or_skill": "a dice expression (d20+5, 2d6+3, 2d20kh1+4) or a skill/ability name",
    "dice": "a dice expression such as 2d6+3",
    "character": "a party member's name or `player`",
    "signed_int": "a signed integer such as -7 or +8",
    "int": "a whole number",
    "action": "one of the listed choices",
    "spell": "a spell name, lowercase",
    "slot": "the spell slot level spent, 0 for a cantrip, 1-9",
    "skill_or_ability": "one of the 18 skills or 6 abilities, lowercase",
    "ability": "one of the 6 abilities, lowercase",
    "dc": "a difficulty class, 5-30",
    "text": "free text",
}
"""Argument kinds a tool schema may use, with their meaning."""


class RegistryError(ValueError):
    """The registry file is unreadable or malformed. The message names the file and the problem."""


@dataclass
class ArgSpec:
    name: str
    """Argument name as shown to the model (`character`, `slot level`)."""
    kind: str = "text"
    """One of ARG_KINDS: how the validator checks it (extension tools only get their arity checked)."""
    description: str = ""
    """One-line meaning for the documentation."""
    choices: tuple[str, ...] = ()
    """Allowed values for kind `action` (e.g. add, remove, use)."""

    def hint(self) -> str:
        """How the argument is written in a prompt line: `character` or `add|remove|use`."""
        return "|".join(self.choices) if self.choices else self.name

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind, "description": self.description}
        if self.choices:
            d["choices"] = list(self.choices)
        return d


@dataclass
class ToolSpec:
    name: str
    """Lowercase tool name as written in a call: `[name: ...]`."""
    description: str
    """A few words on what the tool does (goes into every training example, so keep it short)."""
    args: list[ArgSpec] = field(default_factory=list)
    """Positional arguments, in order."""
    examples: list[str] = field(default_factory=list)
    """Example calls such as `[roll: d20+5]`; the first one or two are shown in the prompt line."""
    builtin: bool = False
    """True for the six tools defined in code; False for extension tools from the registry file."""

    @property
    def arity(self) -> int:
        return len(self.args)

    def syntax(self) -> str:
        return f"[{self.name}: {', '.join(a.hint() for a in self.args)}]"

    def prompt_line(self) -> str:
        """`[name: args] description`: kept short, since it is part of every training example. Custom tools
        also show one real example call, because their inferred description says little."""
        line = f"{self.syntax()} {self.description}"
        return line if self.builtin or not self.examples else f"{line}, e.g. {self.examples[0]}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "args": [a.to_dict() for a in self.args],
            "examples": list(self.examples),
            "builtin": self.builtin,
        }


def builtin_tools() -> list[ToolSpec]:
    """The six built-in tools of FORMAT.md, freshly built (callers may mutate their copies)."""
    char = ArgSpec("character", "character", "a party member's name exactly as in the Party list, or `player`")
    return [
        ToolSpec(
            "roll", "roll dice",
            [ArgSpec("dice or skill", "dice_or_skill", "a dice expression or a skill/ability name (lowercase)")],
            ["[roll: d20+5]", "[roll: perception]"], True,
        ),
        ToolSpec(
            "health", "change HP",
            [char, ArgSpec("+/-N", "signed_int", "HP change: negative for damage, positive for healing")],
            ["[health: Thordak, -7]"], True,
        ),
        ToolSpec(
            "inventory", "change items",
            [char, ArgSpec("action", "action", "add, remove or use", ("add", "remove", "use")),
             ArgSpec("item", "text", "the item, lowercase free text")],
            ["[inventory: Lyra, add, rope]"], True,
        ),
        ToolSpec(
            "spellcast", "cast a spell",
            [char, ArgSpec("spell", "spell", "the spell's name, lowercase"),
             ArgSpec("slot level", "slot", "the slot level spent (0 for a cantrip)")],
            ["[spellcast: Elara, fireball, 3]"], True,
        ),
        ToolSpec(
            "check", "ability check",
            [ArgSpec("skill or ability", "skill_or_ability", "one of the 18 skills or 6 abilities"), char],
            ["[check: stealth, Lyra]"], True,
        ),
        ToolSpec(
            "save", "saving throw",
            [ArgSpec("ability", "ability", "one of the 6 abilities"), char,
             ArgSpec("DC", "dc", "difficulty class, 5-30")],
            ["[save: dexterity, Thordak, 15]"], True,
        ),
    ]


BUILTIN_NAMES: frozenset[str] = frozenset(("roll", "health", "inventory", "spellcast", "check", "save"))


def _spec_from_dict(d: Any, where: str) -> ToolSpec:
    if not isinstance(d, dict):
        raise RegistryError(f"{where}: each tool must be a JSON object")
    name = d.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RegistryError(f"{where}: tool name {name!r} must be a lowercase identifier (letters, digits, _)")
    desc = d.get("description", "")
    if not isinstance(desc, str) or len(desc) > 200:
        raise RegistryError(f"{where}: tool '{name}' description must be a string of at most 200 characters")
    raw_args = d.get("args", [])
    if not isinstance(raw_args, list) or len(raw_args) > MAX_ARGS:
        raise RegistryError(f"{where}: tool '{name}' args must be a list of at most {MAX_ARGS} argument objects")
    args = []
    for i, a in enumerate(raw_args, start=1):
        if not isinstance(a, dict) or not isinstance(a.get("name"), str) or not a["name"].strip():
            raise RegistryError(f"{where}: tool '{name}' argument {i} must be an object with a 'name'")
        kind = a.get("kind", "text")
        if kind not in ARG_KINDS:
            raise RegistryError(f"{where}: tool '{name}' argument {i} has unknown kind {kind!r} (known: {', '.join(ARG_KINDS)})")
        choices = a.get("choices", [])
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise RegistryError(f"{where}: tool '{name}' argument {i} choices must be a list of strings")
        descr = a.get("description", "")
        args.append(ArgSpec(a["name"].strip()[:40], kind, descr if isinstance(descr, str) else "", tuple(choices)))
    examples = d.get("examples", [])
    if not isinstance(examples, list) or not all(isinstance(e, str) for e in examples):
        raise RegistryError(f"{where}: tool '{name}' examples must be a list of strings")
    return ToolSpec(name, desc, args, examples[:10], bool(d.get("builtin", False)))


class ToolRegistry:
    """An ordered set of tools: the built-ins first, then extension tools."""

    def __init__(self, tools: list[ToolSpec] | None = None):
        self._tools: dict[str, ToolSpec] = {}
        for t in tools or []:
            self.add(t)

    @classmethod
    def builtin(cls) -> "ToolRegistry":
        return cls(builtin_tools())

    @classmethod
    def load(cls, path: str | Path) -> "ToolRegistry":
        """Built-ins plus the extension tools in a registry JSON file. A missing file means built-ins only."""
        path = Path(path)
        reg = cls.builtin()
        if not path.exists():
            return reg
        try:
            if path.is_dir():
                raise RegistryError(f"{path}: is a directory, expected a tool registry JSON file")
            if path.stat().st_size > MAX_REGISTRY_BYTES:
                raise RegistryError(f"{path}: registry file is larger than {MAX_REGISTRY_BYTES} bytes")
            data = json.loads(path.read_bytes().decode("utf-8"))
        except RegistryError:
            raise
        except OSError as exc:
            raise RegistryError(f"{path}: cannot read tool registry: {exc.strerror or exc}") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise RegistryError(f"{path}: tool registry is not valid JSON ({exc}); fix it or delete it to use the built-in tools") from None
        if isinstance(data, list):
            tools = data
        elif isinstance(data, dict) and isinstance(data.get("tools"), list):
            tools = data["tools"]
        else:
            raise RegistryError(f"{path}: expected a JSON object with a 'tools' list")
        if len(tools) > MAX_TOOLS:
            raise RegistryError(f"{path}: more than {MAX_TOOLS} tools")
        for i, d in enumerate(tools, start=1):
            spec = _spec_from_dict(d, f"{path}: tool {i}")
            if spec.name in BUILTIN_NAMES:
                continue  # built-ins always come from code
            if spec.name in reg:
                raise RegistryError(f"{path}: tool '{spec.name}' is listed twice")
            spec.builtin = False
            reg.add(spec)
        return reg

    def save(self, path: str | Path) -> Path:
        """Write the registry JSON atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_json())
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path

    def add(self, spec: ToolSpec) -> None:
        if not NAME_RE.match(spec.name):
            raise RegistryError(f"tool name {spec.name!r} must be a lowercase identifier")
        self._tools[spec.name] = spec

    def names(self) -> list[str]:
        return list(self._tools)

    def get(self, name: str) -> ToolSpec | None:
        return self._tools.get(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._tools

    def __iter__(self):
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def custom(self) -> list[ToolSpec]:
        return [t for t in self._tools.values() if not t.builtin]

    def prompt_lines(self) -> list[str]:
        """One short line per tool for the model's system prompt."""
        return [t.prompt_line() for t in self._tools.values()]

    def to_dict(self) -> dict[str, Any]:
        return {"version": REGISTRY_VERSION, "tools": [t.to_dict() for t in self._tools.values()]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

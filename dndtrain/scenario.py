"""Stage 1: parse scenario markdown files into `Scenario` objects.

A scenario file has `# SYSTEM`, `# USER`, `# DM` and `# TOOLCALL` sections (see `data/FORMAT.md`). Parsing never
raises anything but `ScenarioError`, which names the file and line, so the CLI can print it and exit 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from dndtrain.toolcalls import find_calls

SECTION_NAMES = ("SYSTEM", "USER", "DM", "TOOLCALL")
MAX_FILE_BYTES = 256 * 1024  # a scene is a few KB; anything this big is not a scene
MAX_TURNS = 64
_HEADING = re.compile(r"^#\s+([A-Za-z_]+)\s*$")
_PARTY_LINE = re.compile(
    r"^\s*[-*]\s*(?P<name>[^()]+?)\s*\((?P<body>[^()]*)\)\s*$"
)
_LEVEL = re.compile(r"\blevel\s*(\d+)\b", re.I)
_HP = re.compile(r"\bHP\s*:?\s*(\d+)\s*/\s*(\d+)", re.I)
_BONUS = re.compile(r"^([A-Za-z][A-Za-z ]*?)\s*([+-]\d+)$")

CLASSES = (
    "Barbarian", "Bard", "Cleric", "Druid", "Fighter", "Monk",
    "Paladin", "Ranger", "Rogue", "Sorcerer", "Warlock", "Wizard",
)


class ScenarioError(ValueError):
    """A scenario file is malformed. `str()` is `file:line: message`."""

    def __init__(self, path: str | Path, line: int, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        super().__init__(f"{self.path}:{line}: {message}")


@dataclass
class Character:
    """One party member from the SYSTEM section's Party list."""

    name: str
    race: str = ""
    char_class: str = ""
    level: int = 1
    hp: int = 10
    max_hp: int = 10
    bonuses: dict[str, int] = field(default_factory=dict)
    """Stated modifiers such as `Stealth +7` (keys lowercase)."""
    inventory: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    """Any other comma-separated fields, kept verbatim."""


@dataclass
class Turn:
    """One section after SYSTEM: role is `user`, `dm` or `toolcall`."""

    role: str
    text: str
    line: int
    """1-based line of the section heading."""


@dataclass
class Scenario:
    path: str
    category: str
    system: dict[str, str]
    """Key/value lines of SYSTEM (Role, World, Location, ...), without Party."""
    party: list[Character]
    turns: list[Turn]
    system_line: int = 1

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @property
    def dm_turns(self) -> list[tuple[int, Turn]]:
        return [(i, t) for i, t in enumerate(self.turns) if t.role == "dm"]


def read_text(path: Path) -> str:
    """Read a scenario file as UTF-8 text, turning every failure into a ScenarioError."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ScenarioError(path, 0, f"cannot read file: {exc.strerror or exc}") from None
    if size > MAX_FILE_BYTES:
        raise ScenarioError(path, 0, f"file is {size} bytes; scenario files are limited to {MAX_FILE_BYTES}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ScenarioError(path, 0, f"cannot read file: {exc.strerror or exc}") from None
    if b"\x00" in raw:
        raise ScenarioError(path, 0, "binary file (contains NUL bytes), expected UTF-8 markdown")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ScenarioError(path, line, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_party_line(text: str, path: str | Path, line: int) -> Character:
    m = _PARTY_LINE.match(text)
    if not m:
        raise ScenarioError(path, line, f"party line should look like '- Name (Race Class, Level N, HP: cur/max)', got {text.strip()!r}")
    name = m["name"].strip()
    fields = [f.strip() for f in m["body"].split(",") if f.strip()]
    char = Character(name=name)
    for f in fields:
        if lm := _LEVEL.fullmatch(f.strip()) or (_LEVEL.search(f) if f.lower().startswith("level") else None):
            char.level = int(lm.group(1))
        elif hm := _HP.search(f):
            char.hp, char.max_hp = int(hm.group(1)), int(hm.group(2))
        elif f.lower().startswith("inventory:"):
            char.inventory = [i.strip() for i in f.split(":", 1)[1].split(";") if i.strip()]
        elif bm := _BONUS.match(f):
            char.bonuses[bm.group(1).strip().lower()] = int(bm.group(2))
        elif not char.char_class:
            words = f.split()
            cls = next((w for w in words if w.capitalize() in CLASSES), None)
            if cls is None:
                char.race, char.char_class = " ".join(words[:-1]), words[-1] if words else ""
            else:
                char.char_class = cls.capitalize()
                char.race = " ".join(w for w in words if w != cls)
        else:
            char.extra.append(f)
    if not 1 <= char.level <= 20:
        raise ScenarioError(path, line, f"{name}: level {char.level} is outside 1-20")
    if char.max_hp <= 0 or char.max_hp > 1000 or char.hp > char.max_hp:
        raise ScenarioError(path, line, f"{name}: HP {char.hp}/{char.max_hp} is not valid")
    return char


def _parse_system(lines: list[tuple[int, str]], path: Path) -> tuple[dict[str, str], list[Character]]:
    system: dict[str, str] = {}
    party: list[Character] = []
    in_party = False
    for ln, text in lines:
        if not text.strip():
            continue
        if in_party and re.match(r"^\s*[-*]\s", text):
            party.append(parse_party_line(text, path, ln))
            if len(party) > 12:
                raise ScenarioError(path, ln, "party has more than 12 members")
            continue
        if ":" not in text:
            raise ScenarioError(path, ln, f"SYSTEM lines should be 'Key: value', got {text.strip()!r}")
        key, value = (s.strip() for s in text.split(":", 1))
        if key.lower() == "party":
            in_party = True
            if value:
                raise ScenarioError(path, ln, "list party members on their own '- Name (...)' lines under 'Party:'")
            continue
        in_party = False
        system[key] = value
    names = [c.name.lower() for c in party]
    if len(set(names)) != len(names):
        raise ScenarioError(path, lines[0][0] if lines else 1, "party member names must be unique")
    return system, party


def parse_text(text: str, path: str | Path = "<text>", category: str = "") -> Scenario:
    """Parse scenario markdown. Raises ScenarioError with the offending line."""
    path = Path(path)
    sections: list[tuple[str, int, list[tuple[int, str]]]] = []
    in_fence = False
    for ln, line in enumerate(text.split("\n"), start=1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        m = None if in_fence else _HEADING.match(line)
        if m:
            name = m.group(1).upper()
            if name not in SECTION_NAMES:
                raise ScenarioError(path, ln, f"unknown section '# {m.group(1)}' (expected one of {', '.join('# ' + s for s in SECTION_NAMES)})")
            sections.append((name, ln, []))
        elif sections:
            sections[-1][2].append((ln, line))
        elif line.strip():
            raise ScenarioError(path, ln, "text before the first section; a scenario starts with '# SYSTEM'")
    if not sections:
        raise ScenarioError(path, 1, "no sections found; a scenario starts with '# SYSTEM'")
    if sections[0][0] != "SYSTEM":
        raise ScenarioError(path, sections[0][1], "the first section must be '# SYSTEM'")
    system, party = _parse_system(sections[0][2], path)
    if "Role" not in system and not party:
        raise ScenarioError(path, sections[0][1], "SYSTEM section is empty (expected Role, World, Location and Party)")
    turns: list[Turn] = []
    prev = "SYSTEM"
    pending_calls = 0
    for name, ln, body in sections[1:]:
        content = "\n".join(t for _, t in body).strip()
        if name == "SYSTEM":
            raise ScenarioError(path, ln, "only one '# SYSTEM' section is allowed")
        if not content:
            raise ScenarioError(path, ln, f"'# {name}' section is empty")
        if name == "USER" and prev == "USER":
            raise ScenarioError(path, ln, "two '# USER' sections in a row; the DM must answer in between")
        if name == "USER" and pending_calls:
            raise ScenarioError(path, ln, "the previous DM turn makes tool calls, so '# TOOLCALL' must follow it, not '# USER'")
        if name == "DM" and prev == "SYSTEM":
            raise ScenarioError(path, ln, "the first turn after SYSTEM must be '# USER'")
        if name == "DM" and prev == "DM":
            raise ScenarioError(path, ln, "two '# DM' sections in a row; merge them or add '# TOOLCALL' results between")
        if name == "DM" and pending_calls:
            raise ScenarioError(path, ln, "the previous DM turn makes tool calls, so '# TOOLCALL' must come before the next '# DM'")
        if name == "TOOLCALL":
            if prev != "DM":
                raise ScenarioError(path, ln, "'# TOOLCALL' must follow a '# DM' turn that makes tool calls")
            if not pending_calls:
                raise ScenarioError(path, ln, "'# TOOLCALL' follows a DM turn with no tool calls")
            results = [t for t in content.split("\n") if t.strip()]
            if len(results) != pending_calls:
                raise ScenarioError(path, ln, f"'# TOOLCALL' has {len(results)} result line(s) but the DM turn made {pending_calls} call(s)")
            pending_calls = 0
        if name == "DM":
            pending_calls = len(find_calls(content))
        turns.append(Turn(role={"USER": "user", "DM": "dm", "TOOLCALL": "toolcall"}[name], text=content, line=ln))
        if len(turns) > MAX_TURNS:
            raise ScenarioError(path, ln, f"more than {MAX_TURNS} turns in one scenario")
        prev = name
    if not turns:
        raise ScenarioError(path, sections[0][1], "no turns after SYSTEM; add '# USER' and '# DM' sections")
    if prev != "DM":
        raise ScenarioError(path, sections[-1][1], f"the scenario must end with a '# DM' turn, not '# {prev}'")
    if pending_calls:
        raise ScenarioError(path, sections[-1][1], "the last DM turn makes tool calls but no '# TOOLCALL' results and DM follow-up come after it")
    return Scenario(path=str(path), category=category, system=system, party=party, turns=turns, system_line=sections[0][1])


def parse_file(path: str | Path, root: str | Path | None = None) -> Scenario:
    path = Path(path)
    category = ""
    if root is not None:
        rel = path.relative_to(root)
        category = rel.parts[0] if len(rel.parts) > 1 else ""
    return parse_text(read_text(path), path, category)


def find_scenario_files(root: str | Path) -> list[Path]:
    """All `*.md` scenario files under root, sorted, skipping README/FORMAT docs."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.md") if p.is_file() and p.name.upper() not in ("README.MD", "FORMAT.MD"))


def load_scenarios(root: str | Path) -> list[Scenario]:
    """Parse every scenario under root. Raises ScenarioError on the first bad file, or if there are none."""
    root = Path(root)
    if not root.exists():
        raise ScenarioError(root, 0, "scenario folder does not exist")
    files = find_scenario_files(root)
    if not files:
        raise ScenarioError(root, 0, "no scenario files (*.md) found")
    base = root if root.is_dir() else root.parent
    return [parse_file(f, base) for f in files]

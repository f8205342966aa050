"""Inline tool-call syntax: `[name: arg1, arg2, ...]` inside DM text.

This module only finds and splits calls; what a call means (schemas, 5e rules, execution) lives in
`dndtrain.registry`, `dndtrain.rules` and `dndtrain.game`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_CALL_CHARS = 200
CALL_RE = re.compile(r"\[\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*([^\[\]\n]{0,%d}?)\s*\]" % MAX_CALL_CHARS)
# Something that starts like a call but is not one: `[roll d20]`, `[roll: d20+5` (unclosed), `[ : x]`.
_CALLISH = re.compile(r"\[\s*([A-Za-z_][A-Za-z0-9_]*)\s*(:|\s+[^\]\n]*\]|$|\n)")


@dataclass(frozen=True)
class ToolCall:
    name: str
    args: tuple[str, ...]
    raw: str
    start: int = 0

    def __str__(self) -> str:
        return f"[{self.name}: {', '.join(self.args)}]"


def split_args(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",")) if text.strip() else ()


def find_calls(text: str) -> list[ToolCall]:
    """Every well-formed `[name: args]` call in text, in order. Names are lowercased."""
    return [
        ToolCall(m.group(1).lower(), split_args(m.group(2)), m.group(0), m.start())
        for m in CALL_RE.finditer(text)
    ]


def find_malformed(text: str, tool_names: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Fragments that look like an attempted tool call but do not parse.

    A `[` counts as an attempt when the word after it is a known tool name or is followed by a colon.
    """
    taken = [(m.start(), m.end()) for m in CALL_RE.finditer(text)]
    bad = []
    for m in _CALLISH.finditer(text):
        if any(s <= m.start() < e for s, e in taken):
            continue
        word = m.group(1).lower()
        if m.group(2) == ":" or word in tool_names:
            end = text.find("]", m.start())
            nl = text.find("\n", m.start())
            stop = min(x for x in (end + 1 if end >= 0 else len(text), nl if nl >= 0 else len(text), m.start() + 60))
            bad.append(text[m.start():stop])
    return bad


def strip_calls(text: str) -> str:
    """Text with all well-formed calls removed (for comparing narration)."""
    return re.sub(r"[ \t]{2,}", " ", re.sub(r"[ \t]+\n", "\n", CALL_RE.sub("", text))).strip()

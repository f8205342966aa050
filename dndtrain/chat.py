"""Stage 2: render scenarios as chat conversations and tokenize them with an assistant-only loss mask.

One function, `system_prompt`, renders the system message for training, validation, export configs and play, so
the model always sees the same instructions (field notes: a prompt that differs at inference loses the tool calls).
"""

from __future__ import annotations

from dataclasses import dataclass

from dndtrain.scenario import Character, Scenario

ROLE_MAP = {"user": "user", "dm": "assistant", "toolcall": "tool"}
INSTRUCTIONS = (
    "You are the Dungeon Master of a D&D 5e game. Narrate in a few vivid sentences. When dice or the game state "
    "matter, begin your turn with the tool calls, then narrate; their results come back as a tool message. Talk and "
    "description need no tool."
)
DEFAULT_SYSTEM = {"World": "Forgotten Realms", "Location": "a roadside inn"}


def character_line(c: Character) -> str:
    who = " ".join(x for x in (c.race, c.char_class) if x)
    parts = [who] if who else []
    parts += [f"Level {c.level}", f"HP: {c.hp}/{c.max_hp}"]
    parts += [f"{k.title()} {v:+d}" for k, v in c.bonuses.items()]
    if c.inventory:
        parts.append("Inventory: " + "; ".join(c.inventory))
    parts += c.extra
    return f"- {c.name} ({', '.join(parts)})"


def system_prompt(system: dict[str, str], party: list[Character], tool_lines: list[str]) -> str:
    lines = [INSTRUCTIONS, "Tools:"] + tool_lines
    for key, value in system.items():
        if key.lower() != "role":
            lines.append(f"{key}: {value}")
    if party:
        lines.append("Party:")
        lines += [character_line(c) for c in party]
    return "\n".join(lines)


def default_tool_lines(registry=None) -> list[str]:
    """Prompt lines for the tools in the registry (built-ins when none is given)."""
    from dndtrain.registry import ToolRegistry

    return (registry or ToolRegistry.builtin()).prompt_lines()


def dm_text(text: str) -> str:
    """A DM turn as the model learns to write it: its tool calls first, then the narration.

    The call-or-narrate decision is then the turn's first token, conditioned directly on the message it answers
    (a player's action or a tool result) instead of on narration the model wrote itself.
    """
    from dndtrain.toolcalls import find_calls, strip_calls

    calls = [c.raw for c in find_calls(text)]
    if not calls:
        return text.strip()
    narration = strip_calls(text)
    return " ".join(calls) + (" " + narration if narration else "")


def scenario_messages(scenario: Scenario, tool_lines: list[str]) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt(scenario.system, scenario.party, tool_lines)}]
    messages += [{"role": ROLE_MAP[t.role], "content": dm_text(t.text) if t.role == "dm" else t.text}
                 for t in scenario.turns]
    return messages


DECISION_WEIGHT = 4.0
"""Loss weight of the tokens that carry the tool decision: every tool-call token and each DM turn's end-of-turn
token (ending a turn instead of calling a tool is the "no call" decision). Narration tokens weigh 1."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    """-100 everywhere except the tokens of assistant (DM) turns, including their end-of-turn token."""
    weights: list[float] = None
    """Per-token loss weight (0 where labels are -100, DECISION_WEIGHT on tool calls and end-of-turn, else 1)."""
    dropped_exchanges: int = 0


class RenderError(ValueError):
    pass


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict[str, str]], eot: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant turn (content + end-of-turn token)."""
    full = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if not full.startswith(prefix) or not full.startswith(upto):
            raise RenderError("the chat template does not render conversations prefix-consistently; cannot mask the loss")
        end = upto.find(eot, len(prefix) + len(m["content"]))
        end = len(upto) if end < 0 else end + len(eot)
        spans.append((len(prefix), end))
    return full, spans


def tokenize_messages(tokenizer, messages: list[dict[str, str]], eot: str,
                      decision_weight: float = DECISION_WEIGHT) -> Example:
    from dndtrain.toolcalls import CALL_RE

    text, spans = assistant_spans(tokenizer, messages, eot)
    calls = [m for s, e in spans for m in CALL_RE.finditer(text, s, e)]
    # The decision points: the turn's first token (call or narrate), each call, the token after each call (another
    # call, narration or end of turn) and the end-of-turn. Weighting both sides of every choice alike keeps the
    # weighted loss from favouring "call" over "narrate".
    decisions = [(m.start(), m.end()) for m in calls] + [(m.end(), m.end() + 1) for m in calls]
    decisions += [(s, s + 1) for s, e in spans]
    decisions += [(e - len(eot), e) for s, e in spans if text.startswith(eot, e - len(eot))]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels, weights = [], []
    for tok_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = any(s <= start < e for s, e in spans)
        labels.append(tok_id if inside else -100)
        # A token counts as a decision token when it overlaps a call (" [" starts inside a call) or the end-of-turn.
        decisive = inside and any(start < e and max(end, start + 1) > s for s, e in decisions)
        weights.append(0.0 if not inside else (decision_weight if decisive else 1.0))
    return Example(list(enc["input_ids"]), labels, weights)


def _exchange_starts(messages: list[dict[str, str]]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "user"]


def build_example(tokenizer, messages: list[dict[str, str]], eot: str, max_len: int) -> Example:
    """Tokenize; when too long, drop the earliest exchanges (keeping the system prompt), then cut the tail."""
    dropped = 0
    while True:
        ex = tokenize_messages(tokenizer, messages, eot)
        starts = _exchange_starts(messages)
        if len(ex.input_ids) <= max_len or len(starts) <= 1:
            break
        messages = messages[:1] + messages[starts[1]:]
        dropped += 1
    if len(ex.input_ids) > max_len:
        ex = Example(ex.input_ids[:max_len], ex.labels[:max_len], ex.weights[:max_len])
    ex.dropped_exchanges = dropped
    return ex


def generation_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """Text to generate the next assistant turn from."""
    return _render(tokenizer, messages, add_generation_prompt=True)

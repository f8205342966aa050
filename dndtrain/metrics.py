"""Scoring one generated DM turn against the reference turn, and aggregating scores over a validation set.

Modelled on BFCL (tool-name and argument accuracy, irrelevance detection: no call where none is needed) and FIREBALL
(does the generated command actually execute against the game state). Everything here is a pure function over
strings, `ToolRegistry` and `GameState`; the model side lives in `dndtrain.generate` and `dndtrain.validate`.

Per example (`score_example`):
- format: no malformed call fragments, every call names a registry tool with the right number of arguments
- tool names: true/false positives and misses, treating the calls of a turn as a multiset of names
- arguments: expected calls matched by a generated call with the same name and equal normalised arguments
- no-call: when the reference turn makes no call, did the model make none?
- executability: generated calls that `game.execute` accepts against the scenario's game state
- response: non-empty, stopped at end-of-turn, no leaked role markers, no repetition loop
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from dndtrain.registry import ToolRegistry
from dndtrain.toolcalls import ToolCall, find_calls, find_malformed

# Things a chat model prints when it runs past its own turn: special tokens, role headers, the fallback template's `### `.
ROLE_MARKER_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>|^(?:assistant|user|system|tool)[ \t]*\n|^### ", re.M)
_SIGNED_INT = re.compile(r"^[+-]?\d+$")
_DICE_CHARS = re.compile(r"^[0-9d+\-*/()khlro%!<>=.]+$")
_CHUNK_LOOP = re.compile(r"(.{6,}?)\1{3,}", re.S)
LOOP_NGRAM = 4
LOOP_SHARE = 0.3
"""A text is a repetition loop when at least this share of its word 4-grams are repeats (or a chunk repeats 4 times)."""

METRIC_LABELS: dict[str, str] = {
    "format_validity": "format validity",
    "tool_precision": "tool-name precision",
    "tool_recall": "tool-name recall",
    "tool_f1": "tool-name F1 (micro)",
    "arg_accuracy": "argument accuracy",
    "no_call_accuracy": "no-call accuracy",
    "executability": "executability",
    "non_empty": "non-empty",
    "stopped_at_eot": "stopped at end of turn",
    "no_role_leak": "no role-marker leak",
    "no_loop": "no repetition loop",
    "response_ok": "response checks (all)",
    "perplexity": "reference perplexity",
}
"""Aggregate metrics in report order. All are shares in [0, 1] where higher is better, except perplexity."""


# --- normalisation ---------------------------------------------------------------------------------------------------

def normalize_arg(value: str) -> str:
    """Canonical form of one argument: lowercase, single spaces, `+5` == `5`, `d20+5` == `1d20+5`, `d20 + 5` == `d20+5`."""
    v = " ".join(value.strip().lower().split())
    if _SIGNED_INT.match(v):
        return str(int(v))
    compact = v.replace(" ", "")
    if "d" in compact and _DICE_CHARS.match(compact):
        return re.sub(r"(?<![0-9)])d(?=[0-9%])", "1d", compact)
    return v


def normalize_call(call: ToolCall) -> tuple[str, tuple[str, ...]]:
    return call.name.lower(), tuple(normalize_arg(a) for a in call.args)


# --- small checks ----------------------------------------------------------------------------------------------------

def format_problems(text: str, calls: list[ToolCall], registry: ToolRegistry) -> list[str]:
    """Malformed call fragments, unknown tools and wrong arities in a generated turn."""
    problems = [f"malformed call: {frag!r}" for frag in find_malformed(text, frozenset(registry.names()))]
    for c in calls:
        spec = registry.get(c.name)
        if spec is None:
            problems.append(f"unknown tool: {c.raw}")
        elif len(c.args) != spec.arity:
            problems.append(f"{c.name} takes {spec.arity} argument(s), got {len(c.args)}: {c.raw}")
    return problems


def role_markers(text: str) -> list[str]:
    """Leaked chat-template markers (`<|im_start|>`, `<|im_end|>`, a line `assistant`, `### `)."""
    return [m.group(0).strip() or m.group(0) for m in ROLE_MARKER_RE.finditer(text)]


def repetition_share(text: str, n: int = LOOP_NGRAM) -> float:
    """Share of the word n-grams of text that repeat an earlier n-gram (0 = none, near 1 = one phrase over and over)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def is_loop(text: str) -> bool:
    words = text.split()
    if len(words) >= LOOP_NGRAM + 8 and repetition_share(text) >= LOOP_SHARE:
        return True
    return bool(_CHUNK_LOOP.search(text[:4000]))


def name_counts(expected: list[ToolCall], generated: list[ToolCall]) -> tuple[int, int, int]:
    """(true positives, false positives, misses) of tool names, as multisets."""
    e = Counter(c.name for c in expected)
    g = Counter(c.name for c in generated)
    tp = sum((e & g).values())
    return tp, sum(g.values()) - tp, sum(e.values()) - tp


def matched_args(expected: list[ToolCall], generated: list[ToolCall]) -> list[bool]:
    """For each expected call: is there a (not yet used) generated call with the same name and normalised args?"""
    pool = Counter(normalize_call(c) for c in generated)
    out = []
    for c in expected:
        key = normalize_call(c)
        if pool[key] > 0:
            pool[key] -= 1
            out.append(True)
        else:
            out.append(False)
    return out


def execute_calls(calls: list[ToolCall], state, rng: random.Random) -> list[str | None]:
    """Run calls in order against `state` (a `GameState`); None where accepted, else the error message."""
    from dndtrain.game import ToolError, execute

    out: list[str | None] = []
    for c in calls:
        try:
            execute(c, state, rng)
            out.append(None)
        except ToolError as exc:
            out.append(str(exc))
    return out


# --- one example -----------------------------------------------------------------------------------------------------

@dataclass
class ExampleScore:
    expected_calls: list[str]
    generated_calls: list[str]
    format_ok: bool
    format_problems: list[str]
    tool_tp: int
    tool_fp: int
    tool_fn: int
    tp_by_tool: dict[str, int]
    fp_by_tool: dict[str, int]
    fn_by_tool: dict[str, int]
    args_matched: list[bool]
    """Per expected call: matched with equal normalised arguments."""
    args_matched_by_tool: dict[str, int]
    no_call_ok: bool | None
    """None when the reference turn makes calls; else whether the model made none."""
    executed: list[str | None] | None
    """Per generated call: None if `game.execute` accepted it, else the error. None when not checked."""
    non_empty: bool
    stopped_at_eot: bool
    role_markers: list[str]
    repetition: float
    loop: bool

    @property
    def response_ok(self) -> bool:
        return self.non_empty and self.stopped_at_eot and not self.role_markers and not self.loop

    @property
    def n_executable(self) -> int:
        return sum(1 for e in self.executed or [] if e is None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["response_ok"] = self.response_ok
        return d


def _by_name(calls: list[ToolCall]) -> Counter:
    return Counter(c.name for c in calls)


def score_example(
    expected_text: str,
    generated_text: str,
    registry: ToolRegistry,
    stopped_at_eot: bool = True,
    state=None,
    rng: random.Random | None = None,
) -> ExampleScore:
    """Score one generated DM turn. `state` (a fresh `GameState`) enables the executability check."""
    expected = find_calls(expected_text)
    generated = find_calls(generated_text)
    tp, fp, fn = name_counts(expected, generated)
    e, g = _by_name(expected), _by_name(generated)
    both = e & g
    matched = matched_args(expected, generated)
    by_tool_matched: Counter = Counter()
    for c, ok in zip(expected, matched):
        if ok:
            by_tool_matched[c.name] += 1
    problems = format_problems(generated_text, generated, registry)
    executed = None
    if state is not None:
        executed = execute_calls(generated, state, rng if rng is not None else random.Random(0))
    return ExampleScore(
        expected_calls=[str(c) for c in expected],
        generated_calls=[str(c) for c in generated],
        format_ok=not problems,
        format_problems=problems,
        tool_tp=tp, tool_fp=fp, tool_fn=fn,
        tp_by_tool=dict(both), fp_by_tool=dict(g - both), fn_by_tool=dict(e - both),
        args_matched=matched,
        args_matched_by_tool=dict(by_tool_matched),
        no_call_ok=None if expected else not generated,
        executed=executed,
        non_empty=bool(generated_text.strip()),
        stopped_at_eot=bool(stopped_at_eot),
        role_markers=role_markers(generated_text),
        repetition=round(repetition_share(generated_text), 4),
        loop=is_loop(generated_text),
    )


# --- aggregation -----------------------------------------------------------------------------------------------------

def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall, F1. Nothing expected and nothing predicted counts as perfect; predicting nothing when
    something was expected gives precision 0 (not undefined)."""
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f1


def _share(flags: Iterable[bool]) -> float | None:
    flags = list(flags)
    return sum(1 for f in flags if f) / len(flags) if flags else None


def aggregate(scores: list[ExampleScore]) -> dict[str, Any]:
    """Aggregate metrics (see METRIC_LABELS) plus counts. Shares with nothing to count are None."""
    tp = sum(s.tool_tp for s in scores)
    fp = sum(s.tool_fp for s in scores)
    fn = sum(s.tool_fn for s in scores)
    p, r, f1 = prf(tp, fp, fn) if scores else (None, None, None)
    all_matched = [m for s in scores for m in s.args_matched]
    executed = [e is None for s in scores for e in (s.executed or [])]
    checked = any(s.executed is not None for s in scores)
    no_call = [s.no_call_ok for s in scores if s.no_call_ok is not None]
    return {
        "format_validity": _share(s.format_ok for s in scores),
        "tool_precision": p,
        "tool_recall": r,
        "tool_f1": f1,
        "arg_accuracy": _share(all_matched),
        "no_call_accuracy": _share(no_call),
        "executability": _share(executed) if checked else None,
        "non_empty": _share(s.non_empty for s in scores),
        "stopped_at_eot": _share(s.stopped_at_eot for s in scores),
        "no_role_leak": _share(not s.role_markers for s in scores),
        "no_loop": _share(not s.loop for s in scores),
        "response_ok": _share(s.response_ok for s in scores),
        "n_examples": len(scores),
        "n_expected_calls": tp + fn,
        "n_generated_calls": tp + fp,
        "n_no_call_examples": len(no_call),
        "n_executable_calls": sum(executed),
    }


def per_tool(scores: list[ExampleScore], tools: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Precision/recall/F1 and argument accuracy per tool name (every name in `tools`, plus any name seen)."""
    tp: Counter = Counter()
    fp: Counter = Counter()
    fn: Counter = Counter()
    args: Counter = Counter()
    for s in scores:
        tp.update(s.tp_by_tool)
        fp.update(s.fp_by_tool)
        fn.update(s.fn_by_tool)
        args.update(s.args_matched_by_tool)
    names = list(dict.fromkeys(list(tools) + sorted(set(tp) | set(fp) | set(fn))))
    out = {}
    for name in names:
        p, r, f1 = prf(tp[name], fp[name], fn[name])
        n_exp = tp[name] + fn[name]
        out[name] = {
            "n_expected": n_exp, "n_generated": tp[name] + fp[name], "tp": tp[name], "fp": fp[name], "fn": fn[name],
            "precision": p, "recall": r, "f1": f1,
            "arg_accuracy": args[name] / n_exp if n_exp else None,
        }
    return out


def _names_label(names: Counter) -> str:
    return " + ".join(sorted(names.elements())) if names else "no call"


def mistakes(items: Iterable[tuple[str, str, ExampleScore]], top: int = 8) -> list[dict[str, Any]]:
    """The most frequent tool-name mistakes: `items` are (context, where, score) per turn; turns whose generated tool
    names differ from the reference's (as multisets) are grouped by (context, reference names, generated names).
    Each group: context, expected (e.g. "health" or "no call"), generated, turns, and up to 3 `where` examples."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for context, where, s in items:
        if not (s.fp_by_tool or s.fn_by_tool):
            continue
        expected = Counter(s.tp_by_tool) + Counter(s.fn_by_tool)
        generated = Counter(s.tp_by_tool) + Counter(s.fp_by_tool)
        key = (context, _names_label(expected), _names_label(generated))
        groups.setdefault(key, []).append(where)
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:top]
    return [{"context": c, "expected": e, "generated": g, "turns": len(w), "examples": w[:3]}
            for (c, e, g), w in ranked]


def fmt(value: float | None, metric: str = "") -> str:
    """A metric value for tables: shares as 0.000, perplexity as 12.3, missing as n/a."""
    if value is None:
        return "n/a"
    if metric == "perplexity":
        return f"{value:.2f}"
    return f"{value:.3f}"

"""Stage 4: score the trained model (and the untrained base, side by side) on held-out scenario turns.

For every DM turn of the held-out scenario files (recorded in the model's `split.json`), the model sees the same
system prompt as in training plus the conversation up to that turn and writes the turn greedily. The reply is scored
against the reference turn (`dndtrain.metrics`: format validity, tool-name precision/recall/F1, argument accuracy,
no-call accuracy, executability, response checks) and the reference turn's perplexity is measured.

Outputs (each written to a temp path and renamed into place):
- `trained_models/validation_results.json`: aggregates for trained and base, per-tool metrics, every example
- `trained_models/validation_report.md`: tables, a few generations, links to the charts
- `trained_models/validation_charts/`: per-tool F1 (base vs trained) and the training loss curve
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dndtrain import metrics
from dndtrain.config import ValidateConfig
from dndtrain.paths import Paths
from dndtrain.stages import StageError, require

SPLIT_FILE = "split.json"
REPORT_EXAMPLES = 4
SUMMARY_METRICS = [
    "format_validity", "tool_precision", "tool_recall", "tool_f1", "arg_accuracy", "no_call_accuracy",
    "executability", "response_ok", "perplexity",
]


@dataclass
class Example:
    file: str
    """Scenario file, relative to the scenario folder."""
    turn: int
    """Index into the scenario's turns of the DM turn."""
    dm_turn: int
    """0-based ordinal among the scenario's DM turns."""
    messages: list[dict]
    """System prompt + conversation up to (not including) the DM turn."""
    expected: str
    scenario: Any
    conversation: list[dict] = field(default_factory=list)
    """The whole scenario as messages (for the reference perplexity of every DM turn in one pass)."""


@dataclass
class ValidationResult:
    model: Path
    base_model: Path | None
    n_examples: int
    n_files: int
    trained: dict[str, Any]
    base: dict[str, Any] | None
    per_tool: dict[str, Any]
    results_path: Path
    report_path: Path
    charts: list[Path] = field(default_factory=list)
    wall_time_s: float = 0.0
    examples: list[dict] = field(default_factory=list)
    by_context: dict[str, Any] = field(default_factory=dict)
    """{"trained": {context: aggregate}, "base": ... or None}: the scores split by what the DM turn answers."""
    mistakes: list[dict] = field(default_factory=list)
    """The trained model's most frequent tool-name mistakes (`metrics.mistakes`): what to write more scenes about."""

    def table(self) -> list[tuple[str, str, str]]:
        rows = []
        for key in SUMMARY_METRICS:
            base = metrics.fmt(self.base.get(key), key) if self.base else "-"
            rows.append((metrics.METRIC_LABELS[key], base, metrics.fmt(self.trained.get(key), key)))
        return rows

    def summary(self) -> str:
        rows = [("metric", "base", "trained")] + self.table()
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [
            f"Validated {self.model.name} on {self.n_examples} DM turns from {self.n_files} scenario files "
            f"in {self.wall_time_s / 60:.1f} min"
            + (f" (base: {self.base_model.name}{', cached generations' if self.base.get('cached') else ''})"
               if self.base_model and self.base else " (no base comparison)") + ".",
        ]
        for i, r in enumerate(rows):
            lines.append(f"  {r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}")
            if i == 0:
                lines.append(f"  {'-' * w[0]}  {'-' * w[1]}  {'-' * w[2]}")
        for ctx, agg in (self.by_context.get("trained") or {}).items():
            lines.append(f"  {ctx}: {agg['n_examples']} turns, tool-name F1 {metrics.fmt(agg['tool_f1'])}, "
                         f"no-call accuracy {metrics.fmt(agg['no_call_accuracy'])}")
        for m in self.mistakes[:3]:
            lines.append(f"  common mistake, {m['context']}: reference {m['expected']}, model {m['generated']} "
                         f"({m['turns']} turns)")
        lines.append(f"Report: {self.report_path}")
        lines.append(f"Results: {self.results_path}")
        return "\n".join(lines)

    def threshold_failures(self, min_f1: float | None = None, min_format: float | None = None,
                           min_no_call: float | None = None) -> list[str]:
        """Human-readable failures of the trained model's scores against the given minimums (none given: none)."""
        out = []
        checks = [("tool_f1", min_f1, "--min-f1"), ("format_validity", min_format, "--min-format"),
                  ("no_call_accuracy", min_no_call, "--min-no-call")]
        for key, minimum, flag in checks:
            if minimum is None:
                continue
            value = self.trained.get(key)
            label = metrics.METRIC_LABELS[key]
            if value is None:
                out.append(f"{label} could not be measured on these {self.n_examples} turns ({flag} {minimum:g})")
            elif value < minimum:
                out.append(f"{label} {value:.3f} < {minimum:g} ({flag})")
        return out


# --- examples --------------------------------------------------------------------------------------------------------

def _read_split(path: Path) -> list[str] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("split"), dict):  # training_metadata.json
        data = data["split"]
    holdout = data.get("holdout") if isinstance(data, dict) else None
    return [h for h in holdout if isinstance(h, str)] if isinstance(holdout, list) else None


def heldout_files(model: Path, paths: Paths) -> list[str]:
    """The held-out scenario files (relative to `paths.scenarios`) recorded for this model: its own `split.json`,
    else the trained model's, else `training_metadata.json`'s."""
    candidates = []
    if model.is_dir():
        candidates.append(model / SPLIT_FILE)
    candidates += [paths.model_dir / SPLIT_FILE, paths.training_metadata]
    for c in candidates:
        if c.is_file():
            files = _read_split(c)
            if files is None:
                raise StageError(f"{c}: no held-out split recorded; retrain with `npm run train` or pass --scenarios DIR")
            if not files:
                raise StageError(
                    f"{c}: the training run held out no scenarios (train.holdout_fraction = 0); "
                    f"pass --scenarios DIR to validate on other scenario files"
                )
            return files
    raise StageError(f"no held-out split found for {model} (looked for {SPLIT_FILE} and {paths.training_metadata}); "
                     f"run `npm run train` first or pass --scenarios DIR")


def load_examples(files: list[Path], root: Path, tool_lines: list[str], limit: int, log=print) -> tuple[list[Example], int]:
    from dndtrain.chat import scenario_messages
    from dndtrain.scenario import parse_file

    examples: list[Example] = []
    used = 0
    for f in files:
        if limit and len(examples) >= limit:
            break
        s = parse_file(f, root)
        rel = f.relative_to(root).as_posix() if f.is_relative_to(root) else f.as_posix()
        msgs = scenario_messages(s, tool_lines)
        used += 1
        for k, (i, turn) in enumerate(s.dm_turns):
            if limit and len(examples) >= limit:
                break
            examples.append(Example(rel, i, k, msgs[: i + 1], turn.text, s, msgs))
    return examples, used


def _last(messages: list[dict], role: str | None = None) -> dict | None:
    for m in reversed(messages):
        if role is None or m["role"] == role:
            return m
    return None


# --- scoring ---------------------------------------------------------------------------------------------------------

CONTEXTS = ("after a player message", "after a tool result")
"""What a DM turn answers. Calls after a player's message mostly follow from what the player does; follow-up calls after
tool results (damage after a hit, `health` after damage, loot after a search) depend more on the DM's judgement."""


def context_of(e: Example) -> str:
    return CONTEXTS[1] if e.messages and e.messages[-1]["role"] == "tool" else CONTEXTS[0]


def example_seed(file: str, turn: int) -> int:
    return zlib.crc32(f"{file}:{turn}".encode())


def generate_outputs(gen, examples: list[Example], cfg: ValidateConfig, label: str) -> dict[str, Any]:
    """Every example's generated DM turn, plus the reference NLL per (file, DM turn) where the backend can score."""
    from tqdm import tqdm

    t0 = time.time()
    files = list(dict.fromkeys(e.file for e in examples))
    convs = {e.file: e.conversation for e in examples}
    with tqdm(total=len(examples), desc=f"{label:<7}", unit="turn", dynamic_ncols=True) as bar:
        outs, scored = gen.generate_and_score([e.messages for e in examples],
                                              [convs[f] for f in files] if gen.supports_nll else [],
                                              cfg.max_new_tokens, progress=bar.update)
    return {
        "outputs": [{"text": o.text, "stopped_at_eot": o.stopped_at_eot, "n_tokens": o.n_tokens} for o in outs],
        "nll": {f: [list(v) for v in per_turn] for f, per_turn in zip(files, scored) if per_turn is not None},
        "time_s": round(time.time() - t0, 1),
    }


def score_outputs(examples: list[Example], generated: dict[str, Any], registry) -> dict[str, Any]:
    """Score generated turns (see `generate_outputs`): aggregate, per-tool and per-example data."""
    from dndtrain.game import GameState

    outs = generated["outputs"]
    nll = {(f, k): v for f, per_turn in generated["nll"].items() for k, v in enumerate(per_turn)}
    scores, rows = [], []
    for e, out in zip(examples, outs):
        state = GameState.from_scenario(e.scenario, registry)
        s = metrics.score_example(e.expected, out["text"], registry, out["stopped_at_eot"], state,
                                  random.Random(example_seed(e.file, e.turn)))
        scores.append(s)
        ref = nll.get((e.file, e.dm_turn))
        rows.append({
            **out, "ref_nll": round(ref[0], 4) if ref else None, "ref_tokens": ref[1] if ref else None,
            "metrics": s.to_dict(),
        })
    agg = metrics.aggregate(scores)
    by_context = {
        label: metrics.aggregate([s for e, s in zip(examples, scores) if context_of(e) == label])
        for label in CONTEXTS if any(context_of(e) == label for e in examples)
    }
    used = [nll[(e.file, e.dm_turn)] for e in examples if (e.file, e.dm_turn) in nll]
    total_tokens = sum(n for _, n in used)
    agg["perplexity"] = math.exp(sum(v for v, _ in used) / total_tokens) if total_tokens else None
    agg["mean_tokens"] = sum(o["n_tokens"] for o in outs) / len(outs) if outs else None
    agg["time_s"] = generated.get("time_s")
    wrong = metrics.mistakes((context_of(e), f"{e.file}:{e.scenario.turns[e.turn].line}", s)
                             for e, s in zip(examples, scores))
    return {"aggregate": agg, "per_tool": metrics.per_tool(scores, registry.names()), "by_context": by_context,
            "mistakes": wrong, "rows": rows}


def score_generator(gen, examples: list[Example], cfg: ValidateConfig, registry, label: str, log=print) -> dict[str, Any]:
    """Generate every example's DM turn with `gen` and score it."""
    generated = generate_outputs(gen, examples, cfg, label)
    log(f"{label}: {len(examples)} turns in {generated['time_s']:.0f} s")
    return score_outputs(examples, generated, registry)


# --- base model cache -------------------------------------------------------------------------------------------------
# The untrained base model gives the same replies to the same prompts every time, so its generations are kept and
# reused while the base model files, the prompts (held-out turns, system prompt, tools) and the settings are unchanged.

BASE_CACHE_NAME = "validation_base_cache.json"
BASE_CACHE_VERSION = 1


def base_cache_path(paths: Paths) -> Path:
    return paths.output / BASE_CACHE_NAME


def base_cache_key(base: Path, examples: list[Example], cfg: ValidateConfig) -> str:
    import hashlib

    import torch
    import transformers

    files = []
    for f in sorted(Path(base).iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".jinja"):
            st = f.stat()
            files.append([f.name, st.st_size, st.st_mtime_ns])
    payload = {
        "version": BASE_CACHE_VERSION, "base": str(base), "files": files, "max_new_tokens": cfg.max_new_tokens,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "examples": [[e.file, e.turn, e.messages] for e in examples],
        "conversations": {e.file: e.conversation for e in examples},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_base_cache(path: Path, key: str, n: int) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    generated = data.get("generated")
    if not isinstance(generated, dict) or len(generated.get("outputs") or []) != n or not isinstance(generated.get("nll"), dict):
        return None
    return generated


# --- output ----------------------------------------------------------------------------------------------------------

def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def plot_tool_f1(per_tool: dict[str, Any], png: Path) -> Path | None:
    trained = per_tool.get("trained") or {}
    base = per_tool.get("base") or {}
    names = [n for n, v in trained.items() if v["n_expected"] or v["n_generated"] or (base.get(n) or {}).get("n_generated")]
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 3.6))
    xs = list(range(len(names)))
    width = 0.38 if base else 0.6
    if base:
        ax.bar([x - width / 2 for x in xs], [(base.get(n) or {}).get("f1", 0.0) for n in names], width,
               label="base", color="#b0b0b0")
        ax.bar([x + width / 2 for x in xs], [trained[n]["f1"] for n in names], width, label="trained", color="#3a6ea5")
    else:
        ax.bar(xs, [trained[n]["f1"] for n in names], width, label="trained", color="#3a6ea5")
    ax.set_xticks(xs)
    ax.set_xticklabels(names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("tool-name F1")
    ax.set_title("Tool-name F1 per tool")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def write_charts(paths: Paths, per_tool: dict[str, Any]) -> list[Path]:
    """Per-tool F1 chart and the training loss curve, written to a temp folder and renamed into place."""
    from dndtrain.train import plot_loss, replace_dir

    target = paths.validation_charts
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        made = []
        if plot_tool_f1(per_tool, tmp / "tool_f1.png"):
            made.append("tool_f1.png")
        history = []
        if paths.training_metadata.is_file():
            try:
                history = json.loads(paths.training_metadata.read_text()).get("loss_history") or []
            except (OSError, ValueError, AttributeError):
                history = []
        if history and plot_loss(history, tmp / "loss_curve.png"):
            made.append("loss_curve.png")
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return [target / m for m in made]


def _quote(text: str) -> str:
    text = text.strip() or "(empty)"
    return "```text\n" + text.replace("```", "ʼʼʼ") + "\n```"


def render_report(data: dict[str, Any], res: ValidationResult, report: Path) -> str:
    lines = [
        "# Validation report", "",
        f"- Model: `{data['model']}` ({data['model_kind']})",
        (f"- Base: `{data['base_model']}`" + (" (generations reused from the cache)" if res.base.get("cached") else ""))
        if data.get("base_model") and res.base else "- Base: not compared",
        f"- Examples: {data['n_examples']} DM turns from {len(data['scenarios'])} scenario files "
        f"(greedy, max {data['max_new_tokens']} new tokens)",
        f"- Wall time: {data['wall_time_s'] / 60:.1f} min", f"- Created: {data['created']}", "",
        "## Scores", "",
        "| metric | base | trained |", "|---|---:|---:|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in res.table()]
    t = res.trained
    lines += ["", f"Counts: {t['n_expected_calls']} expected calls, {t['n_generated_calls']} generated by the trained model "
              f"({t['n_executable_calls']} executable), {t['n_no_call_examples']} turns without a call.",
              "Shares are in [0, 1], higher is better; perplexity is of the reference DM turns (lower is better).", ""]
    contexts = data.get("by_context") or {}
    if contexts.get("trained"):
        lines += ["## By context", "",
                  "What the DM turn answers. Calls after a player's message mostly follow from the action; follow-up calls "
                  "after tool results depend more on the DM's judgement.", "",
                  "| context | turns | base tool F1 | trained tool F1 | base no-call | trained no-call |",
                  "|---|---:|---:|---:|---:|---:|"]
        for ctx, agg in contexts["trained"].items():
            b = (contexts.get("base") or {}).get(ctx) or {}
            lines.append(f"| {ctx} | {agg['n_examples']} | {metrics.fmt(b.get('tool_f1')) if b else '-'} | "
                         f"{metrics.fmt(agg['tool_f1'])} | {metrics.fmt(b.get('no_call_accuracy')) if b else '-'} | "
                         f"{metrics.fmt(agg['no_call_accuracy'])} |")
        lines.append("")
    if data.get("mistakes"):
        lines += ["## Most common mistakes", "",
                  "Turns where the trained model's tool names differ from the reference's, grouped. Scenes that show the "
                  "reference behaviour in these situations are what to add to the training data.", "",
                  "| context | reference | trained model | turns | e.g. |", "|---|---|---|---:|---|"]
        lines += [f"| {m['context']} | {m['expected']} | {m['generated']} | {m['turns']} | {'; '.join(m['examples'])} |"
                  for m in data["mistakes"]]
        lines.append("")
    lines += ["## Per tool (tool-name F1, argument accuracy)", "",
              "| tool | expected | base F1 | trained F1 | trained precision | trained recall | trained arg acc |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    base_tools = (data["per_tool"].get("base") or {})
    for name, v in data["per_tool"]["trained"].items():
        b = base_tools.get(name)
        if not (v["n_expected"] or v["n_generated"] or (b and b["n_generated"])):
            continue
        lines.append(f"| {name} | {v['n_expected']} | {metrics.fmt(b['f1']) if b else '-'} | {metrics.fmt(v['f1'])} | "
                     f"{metrics.fmt(v['precision'])} | {metrics.fmt(v['recall'])} | {metrics.fmt(v['arg_accuracy'])} |")
    if res.charts:
        lines += ["", "## Charts", ""]
        for c in res.charts:
            rel = os.path.relpath(c, report.parent)
            title = "Per-tool F1, base vs trained" if c.stem == "tool_f1" else "Training loss"
            lines.append(f"![{title}]({Path(rel).as_posix()})")
    lines += ["", "## Example generations", ""]
    for ex in pick_examples(data["examples"]):
        lines += [f"### {ex['file']} (turn {ex['turn']})", "", f"**Player:** {ex['last_user'] or '(none)'}", ""]
        if ex["context"]["role"] == "tool":
            lines += ["**Tool results before this turn:**", "", _quote(ex["context"]["content"]), ""]
        lines += ["**Reference DM:**", "", _quote(ex["expected"]), "", "**Trained:**", "", _quote(ex["trained"]["text"]), ""]
        if ex.get("base"):
            lines += ["**Base:**", "", _quote(ex["base"]["text"]), ""]
    return "\n".join(lines).rstrip() + "\n"


def pick_examples(examples: list[dict], n: int = REPORT_EXAMPLES) -> list[dict]:
    """A few examples from different files: half with expected calls, half without."""
    with_calls = [e for e in examples if e["expected_calls"]]
    without = [e for e in examples if not e["expected_calls"]]
    chosen: list[dict] = []
    seen: set[str] = set()
    for pool, k in ((with_calls, (n + 1) // 2), (without, n // 2)):
        got = 0
        for e in pool:
            if got >= k:
                break
            if e["file"] not in seen:
                chosen.append(e)
                seen.add(e["file"])
                got += 1
    for e in examples:  # top up from anything when a pool was short
        if len(chosen) >= n:
            break
        if e not in chosen:
            chosen.append(e)
    return chosen


# --- the stage -------------------------------------------------------------------------------------------------------

def validate(cfg: ValidateConfig, paths: Paths, model: Path | None = None, scenarios_dir: Path | None = None,
             log=print) -> ValidationResult:
    t0 = time.time()
    from dndtrain.chat import default_tool_lines
    from dndtrain.generate import load_generator, model_kind, recorded_base
    from dndtrain.registry import ToolRegistry
    from dndtrain.scenario import find_scenario_files
    from dndtrain.train import write_json_atomic

    from dndtrain.threads import set_openmp_waiting

    set_openmp_waiting()  # before torch is first imported
    if cfg.max_new_tokens < 1:
        raise StageError(f"validate.max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
    if cfg.limit < 0:
        raise StageError(f"validate.limit must be 0 (all) or a positive number, got {cfg.limit}")
    model = Path(model) if model else require(paths.model_dir, "trained model", "npm run train")
    threads = int(getattr(cfg, "threads", 0) or 0)  # honoured once ValidateConfig has a `threads` field
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    kind = model_kind(model)
    registry = ToolRegistry.load(paths.tool_registry)
    tool_lines = default_tool_lines(registry)

    if scenarios_dir is not None:
        root = Path(scenarios_dir)
        if not root.exists():
            raise StageError(f"scenario folder {root} does not exist")
        files = find_scenario_files(root)
        root = root if root.is_dir() else root.parent
        if not files:
            raise StageError(f"{root}: no scenario files (*.md) found")
    else:
        root = paths.scenarios
        rels = heldout_files(model, paths)
        files = [root / r for r in rels if (root / r).is_file()]
        missing = [r for r in rels if not (root / r).is_file()]
        if missing:
            log(f"warning: {len(missing)} held-out file(s) no longer exist and are skipped: {', '.join(missing[:3])}")
        if not files:
            raise StageError(f"none of the held-out scenario files exist under {root}; retrain with `npm run train` "
                             f"or pass --scenarios DIR")
    examples, n_files = load_examples(files, root, tool_lines, cfg.limit, log)
    if not examples:
        raise StageError("no DM turns to score in the selected scenario files")
    log(f"Scoring {len(examples)} DM turns from {n_files} scenario files with {model} "
        f"(greedy, up to {cfg.max_new_tokens} new tokens)")

    base_path = recorded_base(model) if cfg.compare_base else None
    if cfg.compare_base and base_path is None:
        log("No base model recorded for this model; scoring it alone.")

    gen = load_generator(model, log)
    try:
        trained = score_generator(gen, examples, cfg, registry, "trained", log)
    finally:
        gen.close()
        del gen
    base = None
    if base_path is not None:
        from dndtrain.basemodel import BaseModelError

        key = base_cache_key(base_path, examples, cfg)
        cached = load_base_cache(base_cache_path(paths), key, len(examples))
        if cached is not None:
            log(f"base: reusing the generations cached in {base_cache_path(paths).name} "
                f"(same base model, turns and settings)")
            base = score_outputs(examples, cached, registry)
            base["aggregate"]["cached"] = True
        else:
            try:
                gen = load_generator(base_path, log)
            except (StageError, BaseModelError, OSError) as exc:  # the comparison is optional; keep trained scores
                log(f"warning: cannot load the base model for comparison ({exc}); scoring the trained model only")
                base_path = None
            else:
                try:
                    generated = generate_outputs(gen, examples, cfg, "base")
                finally:
                    gen.close()
                    del gen
                log(f"base: {len(examples)} turns in {generated['time_s']:.0f} s")
                write_json_atomic(base_cache_path(paths), {"key": key, "generated": generated})
                base = score_outputs(examples, generated, registry)

    rows = []
    for k, e in enumerate(examples):
        user = _last(e.messages, "user")
        last = _last(e.messages) or {"role": "", "content": ""}
        row = {
            "file": e.file, "turn": e.turn, "dm_turn": e.dm_turn,
            "last_user": user["content"] if user else "",
            "context": {"role": last["role"], "content": last["content"] if last["role"] != "system" else ""},
            "expected": e.expected,
            "expected_calls": trained["rows"][k]["metrics"]["expected_calls"],
            "trained": trained["rows"][k],
        }
        if base:
            row["base"] = base["rows"][k]
        rows.append(row)
    wall = time.time() - t0
    data = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": str(model), "model_kind": kind,
        "base_model": str(base_path) if base_path else None,
        "scenarios": sorted({e.file for e in examples}),
        "scenario_root": str(root),
        "n_examples": len(examples), "limit": cfg.limit, "max_new_tokens": cfg.max_new_tokens,
        "tools": registry.names(),
        "wall_time_s": round(wall, 1),
        "trained": trained["aggregate"], "base": base["aggregate"] if base else None,
        "per_tool": {"trained": trained["per_tool"], "base": base["per_tool"] if base else None},
        "by_context": {"trained": trained["by_context"], "base": base["by_context"] if base else None},
        "mistakes": trained["mistakes"],
        "examples": rows,
    }
    res = ValidationResult(
        model=model, base_model=base_path, n_examples=len(examples), n_files=n_files,
        trained=trained["aggregate"], base=base["aggregate"] if base else None, per_tool=data["per_tool"],
        by_context=data["by_context"], mistakes=data["mistakes"],
        results_path=paths.validation_results, report_path=paths.validation_report, wall_time_s=wall, examples=rows,
    )
    res.charts = write_charts(paths, data["per_tool"])
    write_json_atomic(paths.validation_results, data)
    _atomic_text(paths.validation_report, render_report(data, res, paths.validation_report))
    res.wall_time_s = time.time() - t0
    return res

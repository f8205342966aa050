"""How predictable are the corpus's tool calls? Score a careful blind annotator the way `validate` scores the model.

The quality target of `dndtrain validate` (tool-name micro-F1 on held-out DM turns) can only be met if the reference
calls follow from what the model sees: the party, the player's message, earlier turns and tool results. This bench
measures that ceiling with an annotator (a person, or an LLM agent) who predicts each held-out DM turn's calls from the
same context, one turn at a time, without seeing the answer.

Usage:
  .venv/bin/python bench/annotator_ceiling.py items --out /tmp/blind [--parts 3] [--scenarios DIR]
      Writes one file per DM turn (`partP/item_NNN.md`: the scene up to the hidden DM turn) and `answers.json` (keep
      it away from the annotator). Without --scenarios the held-out split of the default training config is used.
      Consecutive items of a scene reveal earlier answers, so the annotator must commit each prediction (one JSON line
      `{"id": ..., "calls": ["[roll: d20+5]", ...]}` appended to a .jsonl file) before opening the next item.
  .venv/bin/python bench/annotator_ceiling.py score --answers /tmp/blind/answers.json PRED.jsonl [...]
      [--json bench/results/annotator-ceiling.json]
      A `validation_results.json` (from `dndtrain validate` on the held-out split) in place of PRED.jsonl scores the
      model's generations on the same table, for a side-by-side.
      Tool-name P/R/F1 (micro, multiset of names per turn, as in dndtrain.metrics), argument accuracy and no-call
      accuracy: overall, by context (turn answers a player message / a tool result) and per tool.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def heldout_files(root: Path) -> list[Path]:
    from dndtrain.config import TrainConfig
    from dndtrain.scenario import load_scenarios
    from dndtrain.train import split_scenarios

    cfg = TrainConfig()
    scenarios = root / "data" / "scenarios"  # the split hashes paths relative to the data folder, as `train` does
    _, holdout = split_scenarios(load_scenarios(scenarios), scenarios, cfg.holdout_fraction, cfg.seed)
    return [Path(s.path) for s in holdout]


def make_items(args) -> int:
    from dndtrain.scenario import find_scenario_files, parse_file
    from dndtrain.toolcalls import find_calls

    files = find_scenario_files(args.scenarios) if args.scenarios else heldout_files(ROOT)
    items, answers = [], {}
    for f in files:
        s = parse_file(f)
        head = Path(f).read_text(encoding="utf-8").split("\n# USER")[0].rstrip()
        rel = Path(f).resolve().relative_to(ROOT).as_posix() if Path(f).resolve().is_relative_to(ROOT) else str(f)
        shown = []
        for i, t in enumerate(s.turns):
            if t.role == "dm":
                key = f"{rel}#{i}"
                items.append((key, "\n\n".join([head] + shown)))
                answers[key] = {"calls": [c.raw for c in find_calls(t.text)], "after": s.turns[i - 1].role}
            shown.append(f"# {t.role.upper()}\n{t.text}")
    out = Path(args.out)
    for p in range(args.parts):
        part = out / f"part{p}"
        part.mkdir(parents=True, exist_ok=True)
        chunk = items[p * len(items) // args.parts:(p + 1) * len(items) // args.parts]
        for k, (key, ctx) in enumerate(chunk):
            (part / f"item_{k:03d}.md").write_text(
                f"ITEM ID: {key}\n\n{ctx}\n\n# DM\n<<< predict the tool calls of this DM turn >>>\n", encoding="utf-8")
    (out / "answers.json").write_text(json.dumps(answers, indent=1), encoding="utf-8")
    print(f"{len(items)} items from {len(files)} files in {args.parts} part(s) under {out}; answers in "
          f"{out / 'answers.json'}")
    return 0


def _prf(tp: int, fp: int, fn: int) -> dict:
    from dndtrain.metrics import prf

    p, r, f1 = prf(tp, fp, fn)
    return {"precision": round(p, 3), "recall": round(r, 3), "f1": round(f1, 3), "tp": tp, "fp": fp, "fn": fn}


def score(args) -> int:
    from dndtrain.metrics import matched_args, name_counts
    from dndtrain.toolcalls import find_calls

    answers = json.loads(Path(args.answers).read_text(encoding="utf-8"))
    preds: dict[str, list[str]] = {}
    for path in args.predictions:
        if path.endswith(".json"):  # a model's validation_results.json: score its generations the same way
            for ex in json.loads(Path(path).read_text(encoding="utf-8"))["examples"]:
                preds[f"data/scenarios/{ex['file']}#{ex['turn']}"] = ex["trained"]["metrics"]["generated_calls"]
            continue
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                preds[row["id"]] = row["calls"]
    missing = [k for k in answers if k not in preds]
    groups: dict[str, Counter] = defaultdict(Counter)
    tools: dict[str, Counter] = defaultdict(Counter)
    for key, ans in answers.items():
        if key not in preds:
            continue
        exp, gen = find_calls(" ".join(ans["calls"])), find_calls(" ".join(preds[key]))
        tp, fp, fn = name_counts(exp, gen)
        matched = matched_args(exp, gen)
        for g in ("all", "after " + {"user": "player message", "toolcall": "tool result"}.get(ans["after"], ans["after"])):
            c = groups[g]
            c.update(tp=tp, fp=fp, fn=fn, args_ok=sum(matched), args_n=len(matched), n=1)
            if not exp:
                c.update(nocall_n=1, nocall_ok=int(not gen))
        e, g = Counter(x.name for x in exp), Counter(x.name for x in gen)
        for name in set(e) | set(g):
            tools[name].update(tp=min(e[name], g[name]), fp=max(0, g[name] - e[name]), fn=max(0, e[name] - g[name]))
    result = {"n_scored": sum(1 for k in answers if k in preds), "n_missing": len(missing), "groups": {}, "per_tool": {}}
    for name, c in groups.items():
        result["groups"][name] = {
            "n_turns": c["n"], **_prf(c["tp"], c["fp"], c["fn"]),
            "arg_accuracy": round(c["args_ok"] / c["args_n"], 3) if c["args_n"] else None,
            "no_call_accuracy": round(c["nocall_ok"] / c["nocall_n"], 3) if c["nocall_n"] else None,
            "n_no_call_turns": c["nocall_n"],
        }
    for name, c in sorted(tools.items()):
        result["per_tool"][name] = _prf(c["tp"], c["fp"], c["fn"])
    print(f"{result['n_scored']} turns scored, {len(missing)} without a prediction")
    print(f"{'group':<26} {'turns':>5} {'P':>6} {'R':>6} {'F1':>6} {'args':>6} {'no-call':>8}")
    for name, g in sorted(result["groups"].items()):
        print(f"{name:<26} {g['n_turns']:>5} {g['precision']:>6.3f} {g['recall']:>6.3f} {g['f1']:>6.3f} "
              f"{g['arg_accuracy'] or 0:>6.3f} {g['no_call_accuracy'] or 0:>8.3f}")
    print("per tool F1: " + ", ".join(f"{k} {v['f1']:.2f}" for k, v in result["per_tool"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("items", help="write blind annotation items and the answers")
    a.add_argument("--out", required=True)
    a.add_argument("--parts", type=int, default=3)
    a.add_argument("--scenarios", type=Path, default=None)
    a.set_defaults(func=make_items)
    b = sub.add_parser("score", help="score annotator predictions (.jsonl) against the answers")
    b.add_argument("--answers", required=True)
    b.add_argument("predictions", nargs="+")
    b.add_argument("--json", default=None)
    b.set_defaults(func=score)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

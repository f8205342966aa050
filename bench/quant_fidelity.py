"""Does a quantized GGUF behave like the model it was made from? Compare validation runs turn by turn.

Tool F1 against the reference labels moves by +-0.03 between runs that differ only in numerics, because many turns
are close calls; that noise hides what quantization does. This bench compares each GGUF's generations with the
unquantized model's, on the same DM turns, so the labels play no part:
- call / no-call: both call a tool, or both do not
- tool names: the same multiset of tool names
- calls: the same calls after argument normalisation (`dndtrain.metrics.normalize_call`)
- text: the same generated text

Usage:
  .venv/bin/dndtrain validate --no-base                        # the HF model -> trained_models/validation_results.json
  cp trained_models/validation_results.json /tmp/hf.json
  .venv/bin/dndtrain validate --no-base --model trained_models/gguf/dnd_model-q4_k_m.gguf
  cp trained_models/validation_results.json /tmp/q4.json
  .venv/bin/python bench/quant_fidelity.py /tmp/hf.json /tmp/q4.json [more.json ...] [--json bench/results/x.json]

The first file is the reference. Every file must come from the same scenarios (turns are matched by file and turn).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _turns(path: Path) -> tuple[dict, dict[tuple[str, int], str]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return data, {(e["file"], e["turn"]): e["trained"]["text"] for e in data["examples"]}


def agreement(ref: dict[tuple[str, int], str], other: dict[tuple[str, int], str]) -> dict[str, float | int]:
    """Shares of the shared turns on which `other` decides like `ref` (see the module docstring)."""
    from dndtrain.metrics import normalize_call
    from dndtrain.toolcalls import find_calls

    keys = sorted(ref.keys() & other.keys())
    if not keys:
        raise SystemExit("no turns in common: the files come from different scenarios")
    same = Counter()
    for k in keys:
        a, b = find_calls(ref[k]), find_calls(other[k])
        same["call_decision"] += bool(a) == bool(b)
        same["tool_names"] += Counter(c.name for c in a) == Counter(c.name for c in b)
        same["calls"] += Counter(map(normalize_call, a)) == Counter(map(normalize_call, b))
        same["text"] += ref[k] == other[k]
    out: dict[str, float | int] = {k: same[k] / len(keys) for k in ("call_decision", "tool_names", "calls", "text")}
    out["turns"] = len(keys)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reference", type=Path, help="validation_results.json of the unquantized model")
    ap.add_argument("others", type=Path, nargs="+", help="validation_results.json of each GGUF")
    ap.add_argument("--json", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    ref_data, ref = _turns(args.reference)
    rows = []
    print(f"reference: {args.reference} ({ref_data.get('model_kind')}, {len(ref)} turns)")
    print(f"{'file':<40} {'call/no-call':>12} {'tool names':>10} {'calls':>6} {'text':>6}   tool F1 / recall / no-call")
    for path in args.others:
        data, other = _turns(path)
        agr = agreement(ref, other)
        t = data["trained"]
        print(f"{str(path)[-40:]:<40} {agr['call_decision']:>12.3f} {agr['tool_names']:>10.3f} {agr['calls']:>6.3f} "
              f"{agr['text']:>6.3f}   {t['tool_f1']:.3f} / {t['tool_recall']:.3f} / {t['no_call_accuracy']:.3f}")
        rows.append({"file": str(path), "model": data.get("model"), "agreement": agr,
                     "scores": {k: t[k] for k in ("tool_f1", "tool_recall", "no_call_accuracy", "arg_accuracy")}})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"reference": str(args.reference), "model": ref_data.get("model"),
                                         "scores": {k: ref_data["trained"][k] for k in
                                                    ("tool_f1", "tool_recall", "no_call_accuracy", "arg_accuracy")},
                                         "rows": rows}, indent=2) + "\n", encoding="utf-8")
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

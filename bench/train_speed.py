"""Training throughput on the real default model: tokens/s for a few optimizer steps per precision mode.

Usage:  .venv/bin/python bench/train_speed.py [--steps 8] [--modes bf16,fp32] [--cache on,off] [--grad-accum 1,2]
                                              [--attention repeat_kv,sdpa] [--batch-size 1] [--rounds 2]

Uses the shipped scenarios and a throwaway output folder. Modes run one after another in the same process
environment; the machines are noisy, so compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--modes", default="bf16,fp32")
    ap.add_argument("--batch-size", type=int, default=1, help="scenarios per optimizer step (default: as TrainConfig)")
    ap.add_argument("--grad-accum", default="1", help="micro-batches per step to compare, e.g. 1,2 (same scenes in the "
                    "same order: the sampler groups by the examples per optimizer step)")
    ap.add_argument("--cache", default="on", help="frozen-layer cache settings to compare, e.g. on,off")
    ap.add_argument("--attention", default="repeat_kv", help="training attention to compare: repeat_kv (the default, "
                    "see train.use_repeat_kv_attention) and/or sdpa (transformers' own, grouped-query on batches of one)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole comparison (interleaved) to see the noise")
    args = ap.parse_args(argv)
    import dndtrain.train as train_module
    from dndtrain.config import TrainConfig
    from dndtrain.paths import Paths
    from dndtrain.train import train

    rows = []
    switch = train_module.use_repeat_kv_attention
    variants = [(m, c, a, att) for m in args.modes.split(",") for c in args.cache.split(",")
                for a in args.grad_accum.split(",") for att in args.attention.split(",")]
    for mode, cache, accum, attention in variants * args.rounds:
        train_module.use_repeat_kv_attention = switch if attention == "repeat_kv" else (lambda model: False)
        with tempfile.TemporaryDirectory() as tmp:
            # batch_size x grad_accum examples per optimizer step; --batch-size is the total per step
            accum = int(accum)
            cfg = TrainConfig(max_steps=args.steps, precision=mode, batch_size=max(1, args.batch_size // accum),
                              gradient_accumulation_steps=accum, save_steps=10**6, logging_steps=1,
                              cache_frozen_layers=cache)
            r = train(cfg, Paths.make(ROOT, output=tmp), log=lambda *a: None)
            rows.append({"precision": mode, "attention": attention, "cache": cache, "micro_batch": cfg.batch_size,
                         "grad_accum": accum,
                         "steps": r.steps, "train_s": round(r.train_time_s, 1),
                         "cache_s": round(r.cache_time_s, 1),
                         "s_per_step": round((r.train_time_s - r.cache_time_s) / max(r.steps, 1), 2),
                         "tokens_per_s": round(r.tokens_per_s, 1), "peak_rss_mb": round(r.peak_rss_mb)})
            print(rows[-1], flush=True)
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

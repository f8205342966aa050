"""Benchmark the default pipeline end to end: wall time of each npm step, training tokens/s, GGUF size, decode tok/s.

Usage:  .venv/bin/python bench/pipeline_bench.py [--steps train,validate,convert,deploy,test] [--out bench/results]

Runs the real commands (`npm run train`, ...) in this checkout, so it overwrites trained_models/ and assets/models/.
Timings depend on the machine and on whatever else runs on it; compare numbers from one run, one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["train", "validate", "convert", "deploy", "test"]


def run_step(step: str) -> dict:
    script = "train" if step == "train" else f"train:{step}"
    t = time.time()
    proc = subprocess.run(["npm", "run", "--silent", script], cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-8:]
    return {"step": step, "command": f"npm run {script}", "rc": proc.returncode, "wall_s": round(wall, 1), "tail": tail}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
               "cpus": os.cpu_count(), "steps": []}
    for step in args.steps.split(","):
        r = run_step(step)
        results["steps"].append(r)
        print(f"{r['command']:<26} rc={r['rc']}  {r['wall_s']:>7.1f} s", flush=True)
        if r["rc"] != 0:
            print("\n".join(r["tail"]), file=sys.stderr)
            break
    out = ROOT / "trained_models"
    meta = out / "training_metadata.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        results["training"] = {k: m.get(k) for k in ("steps", "train_time_s", "wall_time_s", "tokens_per_s",
                                                     "peak_rss_mb", "final_loss", "precision", "train_tokens")}
    for gguf in sorted((out / "gguf").glob("*.gguf")):
        results.setdefault("gguf_mb", {})[gguf.name] = round(gguf.stat().st_size / 1e6, 1)
    integ = out / "integration_test_results.json"
    if integ.is_file():
        results["runtime"] = {k: v for k, v in json.loads(integ.read_text()).items() if "tok" in k or k == "passed"}
    val = out / "validation_results.json"
    if val.is_file():
        v = json.loads(val.read_text())
        results["validation"] = {k: v.get(k) for k in ("trained", "base") if k in v}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    dest = Path(args.out) / f"pipeline-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    dest.write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps({k: v for k, v in results.items() if k != "steps"}, indent=2, default=str))
    print(f"written: {dest}")
    return 0 if all(s["rc"] == 0 for s in results["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())

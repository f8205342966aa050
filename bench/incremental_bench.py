"""Benchmark incremental training on the real trained model: which learning rate learns 5 new scenes without
forgetting the old held-out ones?

Usage:  .venv/bin/python bench/incremental_bench.py [--lrs 2e-5@3,5e-5@3,2e-4@3] [--steps 20] [--limit 0] [--threads 0]
                                                   [--src .] [--out bench/results]
        (`LR@R` runs learning rate LR with replay ratio R; --limit 0 scores every held-out turn)

Works in a temp COPY of the project (data folder + trained_models/dnd_model + training_metadata.json + registry), so
the real trained_models/ and data/ are never touched. Five new scenario files (below, written to data/FORMAT.md and
checked with `data check`) are added to the copy. Then, once for the starting model and once per learning rate
(each run starts again from the starting model via `versions.rollback`):
- loss on the new files: mean NLL of their DM tokens (the training loss), adapter on the base model, no generation
- old held-out scores: `validate` (greedy, `--limit` DM turns, no base comparison) on copies of the starting model's
  held-out files only, so before and after see exactly the same turns
- incremental run time (`incremental.incremental_train`, `[incremental]` settings with the given lr)
A learning rate passes when the new files' loss drops and no held-out share (tool F1, format, no-call, argument
accuracy) falls by more than 2 points. Timings depend on the machine and whatever else runs on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_DROP = 0.02
SCORE_KEYS = ("tool_f1", "format_validity", "no_call_accuracy", "arg_accuracy", "executability", "perplexity")

NEW_SCENES = {
    "combat/bench_new_ogre_at_the_millpond.md": """
        # SYSTEM
        Role: Dungeon Master
        World: Forgotten Realms
        Location: A flooded millpond outside Phandalin, under a grey drizzle
        Party:
        - Kaelen (Half-Orc Barbarian, Level 5, HP: 55/55)
        - Ysolde (Human Sorcerer, Level 5, HP: 32/32)

        # USER
        Kaelen wades in and brings his greataxe down on the ogre.

        # DM
        The ogre is still pulling a drowned sheep out of the sluice when Kaelen comes roaring through the reeds. [roll: d20+7]

        # TOOLCALL
        d20+7: 1d20 (11) + 7 = *18*

        # DM
        Eighteen bites deep into the ogre's thigh, and the brute bellows loud enough to scatter the crows from the mill roof. [roll: 1d12+4]

        # TOOLCALL
        1d12+4: 1d12 (9) + 4 = *13*

        # DM
        Thirteen damage. The ogre swings its tree-trunk club back at Kaelen in a wide, furious arc. [roll: d20+6]

        # TOOLCALL
        d20+6: 1d20 (16) + 6 = *22*

        # DM
        Twenty-two cracks into Kaelen's ribs and knocks him back a step into the mud. [health: Kaelen, -13]

        # TOOLCALL
        Kaelen HP: 55 - 13 = *42*/55

        # DM
        Kaelen spits out pond water and grins through the pain; the ogre is already limping on its bleeding leg.

        # USER
        Ysolde lets loose a scorching ray at its face.

        # DM
        Three lances of fire leap from Ysolde's fingertips and hiss through the rain. [spellcast: Ysolde, scorching ray, 2] [roll: 6d6]

        # TOOLCALL
        Ysolde casts scorching ray (level 2 slot): 2 level-2 slots left
        6d6: 6d6 (4, 2, 6, 3, 5, 1) = *21*

        # DM
        Twenty-one points of fire sear the ogre's face and chest. It drops the club, topples backwards into the millpond with a tremendous splash, and does not come up again.
        """,
    "combat/bench_new_kobold_warren.md": """
        # SYSTEM
        Role: Dungeon Master
        World: Greyhawk
        Location: A kobold warren beneath the Cairn Hills, low tunnels stinking of tallow
        Party:
        - Pip (Gnome Rogue, Level 2, HP: 16/16, Stealth +7)
        - Aldous (Human Cleric, Level 2, HP: 19/19)

        # USER
        Pip creeps ahead to see what's around the bend.

        # DM
        Pip tucks in low and slips along the sooty wall toward the flicker of candlelight. [check: stealth, Pip]

        # TOOLCALL
        stealth (Pip): 13 + 7(skill) = *20*

        # DM
        Twenty: not a single pebble shifts. Around the bend three kobolds squabble over a dented helmet, their spears leaning against a crate of stolen candles.

        # USER
        Aldous follows, but I want to know if there are traps on the way.

        # DM
        Aldous shuffles after the gnome and his boot catches a tripwire strung at ankle height. A net of rusty fishhooks drops from the ceiling. [save: dexterity, Aldous, 12]

        # TOOLCALL
        dexterity save (Aldous): 7 + 0(save) = *7* vs DC 12: *failure*

        # DM
        Seven is not enough: the hooks snag his cloak and bite into his shoulders. [health: Aldous, -4]

        # TOOLCALL
        Aldous HP: 19 - 4 = *15*/19

        # DM
        The kobolds stop arguing at once, and three pairs of yellow eyes turn toward the jingling net and the cursing priest inside it.
        """,
    "exploration/bench_new_lighthouse_archive.md": """
        # SYSTEM
        Role: Dungeon Master
        World: Exandria
        Location: The abandoned lighthouse at Port Damali, its lamp room full of salt-stained books
        Party:
        - Imre (Elf Wizard, Level 6, HP: 34/34)
        - Talia (Human Paladin, Level 6, HP: 52/52)

        # USER
        Imre searches the shelves for the keeper's logbook.

        # DM
        Gulls scream outside the cracked windows as Imre runs a finger along the swollen spines. [check: investigation, Imre]

        # TOOLCALL
        investigation (Imre): 15 + 6(skill) = *21*

        # DM
        Twenty-one finds it behind a false panel: the keeper's log, its last entry written in a shaking hand about lights moving under the water.

        # USER
        Talia pockets the logbook and we look out over the bay.

        # DM
        Talia slides the book into her satchel. [inventory: Talia, add, lighthouse keeper's log]

        # TOOLCALL
        Talia inventory: added lighthouse keeper's log

        # DM
        Far out past the reef a pale green glow pulses once beneath the waves, then fades, just as the log described.
        """,
    "exploration/bench_new_frozen_pass.md": """
        # SYSTEM
        Role: Dungeon Master
        World: Forgotten Realms
        Location: The Ice Spire pass above Icewind Dale, in a howling blizzard
        Party:
        - Bjorn (Human Fighter, Level 3, HP: 31/31)
        - Sefa (Halfling Druid, Level 3, HP: 22/22)

        # USER
        We keep climbing. How bad is the weather getting?

        # DM
        The wind screams through the pass, and the snow comes sideways, stinging like sand. Ahead, the trail narrows to a ledge no wider than a cart.

        # USER
        Bjorn ropes himself to Sefa and leads the way across the ledge.

        # DM
        Bjorn knots the rope around his waist and edges onto the ice, one gauntlet pressed to the rock. [check: athletics, Bjorn]

        # TOOLCALL
        athletics (Bjorn): 6 + 5(skill) = *11*

        # DM
        Eleven is barely enough; his boot skids and he slams against the cliff face, but the rope holds. [health: Bjorn, -3]

        # TOOLCALL
        Bjorn HP: 31 - 3 = *28*/31

        # DM
        Sefa braces behind him, and together you inch across until the ledge widens into a sheltered hollow out of the wind.
        """,
    "roleplay/bench_new_fortune_teller.md": """
        # SYSTEM
        Role: Dungeon Master
        World: Eberron
        Location: A fortune teller's tent at the Sharn lightning-rail fair
        Party:
        - Corvin (Tiefling Warlock, Level 4, HP: 30/30)

        # USER
        Corvin sits down and asks the fortune teller what she sees in his future.

        # DM
        Madame Vashti turns over three cards with long silver nails: the Tower, the Eye, and a blank card she frowns at. "Someone has paid to hide your path from me," she murmurs.

        # USER
        I try to read whether she's lying to me.

        # DM
        Corvin watches her hands and the flicker at the corner of her mouth. [check: insight, Corvin]

        # TOOLCALL
        insight (Corvin): 16 + 1(skill) = *17*

        # DM
        Seventeen tells you she is frightened, not lying. Her eyes keep darting to a man in a grey coat loitering by the tent flap.
        """,
}


# --- measurements ----------------------------------------------------------------------------------------------------

def new_file_loss(model_dir: Path, files: list[Path], data_dir: Path, registry_path: Path) -> dict:
    """Mean NLL of the DM tokens (the training loss) of `files` under the adapter in `model_dir`."""
    import torch
    from peft import PeftModel

    from dndtrain.basemodel import load_model, load_tokenizer
    from dndtrain.chat import build_example, default_tool_lines, scenario_messages
    from dndtrain.registry import ToolRegistry
    from dndtrain.scenario import parse_file

    made_by = json.loads((model_dir / "dndtrain_config.json").read_text())
    base = made_by["base_model_path"]
    tok = load_tokenizer(model_dir)
    model = PeftModel.from_pretrained(load_model(base), str(model_dir))
    model.eval()
    tool_lines = default_tool_lines(ToolRegistry.load(registry_path))
    total, n = 0.0, 0
    per_file = {}
    with torch.no_grad():
        for f in files:
            s = parse_file(f, data_dir)
            ex = build_example(tok, scenario_messages(s, tool_lines), made_by["end_of_turn"],
                               made_by["train"]["max_seq_length"])
            ids = torch.tensor([ex.input_ids])
            labels = torch.tensor([ex.labels])
            logits = model(input_ids=ids).logits[0, :-1].float()
            tgt = labels[0, 1:]
            mask = tgt != -100
            nll = torch.nn.functional.cross_entropy(logits[mask], tgt[mask], reduction="sum").item()
            per_file[f.name] = round(nll / int(mask.sum()), 4)
            total += nll
            n += int(mask.sum())
    del model
    return {"loss": round(total / n, 4), "tokens": n, "per_file": per_file}


def held_out_scores(paths, holdout_dir: Path, limit: int, max_new_tokens: int) -> dict:
    from dndtrain.config import ValidateConfig
    from dndtrain.validate import validate

    res = validate(ValidateConfig(limit=limit, compare_base=False, max_new_tokens=max_new_tokens), paths,
                   scenarios_dir=holdout_dir, log=lambda *a: None)
    agg = res.trained
    # The counts give the resolution of each share: one greedy turn flipping moves no-call accuracy by
    # 1 / n_no_call_examples, tool F1 by about 1 / n_expected_calls.
    counts = {k: agg.get(k) for k in ("n_expected_calls", "n_no_call_examples")}
    return {**{k: agg.get(k) for k in SCORE_KEYS}, **counts, "n_examples": res.n_examples,
            "time_s": round(res.wall_time_s, 1)}


# --- setup -----------------------------------------------------------------------------------------------------------

def make_copy(src: Path, tmp: Path) -> "Paths":  # noqa: F821
    from dndtrain.paths import Paths

    srcp = Paths.make(src)
    for need in (srcp.model_dir / "adapter_model.safetensors", srcp.training_metadata):
        if not need.is_file():
            sys.exit(f"error: {need} not found; train the default model first (`npm run train`)")
    p = Paths.make(tmp)
    shutil.copytree(srcp.scenarios, p.scenarios)
    shutil.copytree(srcp.model_dir, p.model_dir)
    shutil.copy2(srcp.training_metadata, p.training_metadata)
    if srcp.tool_registry.is_file():
        shutil.copy2(srcp.tool_registry, p.tool_registry)
    # training_metadata.json names the model folder it describes: point it at the copy.
    meta = json.loads(p.training_metadata.read_text())
    meta["model_dir"] = str(p.model_dir)
    p.training_metadata.write_text(json.dumps(meta, indent=2))
    for rel, text in NEW_SCENES.items():
        f = p.scenarios / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return p


def check_new_scenes(p) -> None:
    from dndtrain.datacheck import check_paths
    from dndtrain.registry import ToolRegistry

    registry = ToolRegistry.load(p.tool_registry)
    for rel in NEW_SCENES:
        report = check_paths(p.scenarios / rel, registry)
        if report.errors:
            sys.exit("error: a benchmark scene does not pass `data check`:\n" + "\n".join(map(str, report.lines)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", default="2e-5@3,5e-5@3,2e-4@3",
                    help="comma-separated learning rates to try; `LR@R` also sets the replay ratio R for that run")
    ap.add_argument("--steps", type=int, default=20, help="incremental steps per run (default 20)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--replay", type=float, default=None, help="replay ratio (default: the config default)")
    ap.add_argument("--limit", type=int, default=0,
                    help="held-out DM turns scored (default 0 = all; a small limit is too noisy for the 2-point rule)")
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--src", default=str(ROOT), help="project whose trained model is measured (default: this checkout)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import torch

    from dndtrain import versions
    from dndtrain.config import Config
    from dndtrain.incremental import incremental_train

    if args.threads:
        torch.set_num_threads(args.threads)
    quiet = lambda *a: None  # noqa: E731
    tmp = Path(tempfile.mkdtemp(prefix="dndtrain-incbench-"))
    try:
        p = make_copy(Path(args.src), tmp / "proj")
        check_new_scenes(p)
        split = json.loads((p.model_dir / "split.json").read_text())
        holdout_dir = tmp / "old_holdout"
        for rel in split["holdout"]:
            (holdout_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p.scenarios / rel, holdout_dir / rel)
        new_files = [p.scenarios / rel for rel in NEW_SCENES]
        start = versions.record_version(p, log=quiet)
        meta = json.loads(p.training_metadata.read_text())
        results = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "source": str(args.src),
            "start_model": {"steps": meta.get("steps"), "final_loss": meta.get("final_loss"),
                            "train_files": len(split["train"]), "holdout_files": len(split["holdout"])},
            "steps": args.steps, "limit": args.limit, "new_files": sorted(NEW_SCENES), "runs": [],
        }
        print(f"start model: {meta.get('steps')} steps, final loss {meta.get('final_loss')}, "
              f"{len(split['holdout'])} held-out files; scoring {args.limit} held-out DM turns", flush=True)
        t = time.time()
        results["before"] = {"new_loss": new_file_loss(p.model_dir, new_files, p.scenarios, p.tool_registry),
                             "held_out": held_out_scores(p, holdout_dir, args.limit, args.max_new_tokens)}
        b = results["before"]
        print(f"before: new-file loss {b['new_loss']['loss']:.3f}; held-out " + _fmt(b["held_out"])
              + f" ({time.time() - t:.0f} s)", flush=True)

        for spec in [x.strip() for x in args.lrs.split(",") if x.strip()]:
            lr_s, _, replay_s = spec.partition("@")
            lr = float(lr_s)
            versions.rollback(p, start.name, log=quiet)
            cfg = Config()
            cfg.train.threads = args.threads
            cfg.incremental = dataclasses.replace(cfg.incremental, learning_rate=lr, max_steps=args.steps,
                                                  warmup_steps=args.warmup)
            if replay_s or args.replay is not None:
                cfg.incremental.replay_ratio = float(replay_s) if replay_s else args.replay
            t = time.time()
            res = incremental_train(cfg, p, log=quiet)
            run_s = time.time() - t
            if res is None:
                sys.exit("error: the incremental run found nothing to train")
            after_loss = new_file_loss(p.model_dir, new_files, p.scenarios, p.tool_registry)
            after = held_out_scores(p, holdout_dir, args.limit, args.max_new_tokens)
            deltas = {k: (after[k] - b["held_out"][k]) if _num(after[k]) and _num(b["held_out"][k]) else None
                      for k in SCORE_KEYS}
            worst = min((deltas[k] for k in ("tool_f1", "format_validity", "no_call_accuracy", "arg_accuracy")
                         if deltas[k] is not None), default=0.0)
            run = {
                "learning_rate": lr, "replay_ratio": cfg.incremental.replay_ratio, "incremental_s": round(run_s, 1), "train_files": len(res.new_files) + len(res.replay_files),
                "new_trained": res.new_files, "held_out_new": res.held_out_new, "final_train_loss": res.final_loss,
                "new_loss": after_loss, "held_out": after, "held_out_delta": deltas,
                "new_loss_drop": round(b["new_loss"]["loss"] - after_loss["loss"], 4),
                "passes": (b["new_loss"]["loss"] - after_loss["loss"]) > 0 and worst >= -MAX_DROP - 1e-9,
            }
            results["runs"].append(run)
            print(f"lr {lr:g}, replay {cfg.incremental.replay_ratio:g}: {run_s:.0f} s incremental ({run['train_files']} files); new-file loss "
                  f"{b['new_loss']['loss']:.3f} -> {after_loss['loss']:.3f}; held-out " + _fmt(after)
                  + f"; {'PASS' if run['passes'] else 'fail'}", flush=True)

        ok = [r for r in results["runs"] if r["passes"]]
        best = max(ok, key=lambda r: r["new_loss_drop"]) if ok else None
        results["recommended"] = ({"learning_rate": best["learning_rate"], "replay_ratio": best["replay_ratio"]}
                                  if best else None)
        print(f"recommended: incremental.learning_rate = {best['learning_rate']:g}, replay_ratio = "
              f"{best['replay_ratio']:g}" if best else "no setting passed", flush=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        dest = out / f"incremental-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
        dest.write_text(json.dumps(results, indent=2, default=str))
        print(f"written: {dest}")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fmt(s: dict) -> str:
    f = lambda v: f"{v:.3f}" if _num(v) else "n/a"  # noqa: E731
    return (f"F1 {f(s['tool_f1'])}, format {f(s['format_validity'])}, no-call {f(s['no_call_accuracy'])}, "
            f"args {f(s['arg_accuracy'])}, ppl {f(s['perplexity'])} on {s['n_examples']} turns")


if __name__ == "__main__":
    sys.exit(main())

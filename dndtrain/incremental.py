"""Incremental training: continue the current adapter on new and changed scenario files, with model versions.

    dndtrain incremental check [--json]            added / changed / removed scenario files since the current version
    dndtrain incremental train [--max-steps N] [--resume]
    dndtrain incremental versions [--json]         table of versions (date, files, steps, loss, validation scores)
    dndtrain incremental rollback vN               make vN the current model again
    dndtrain incremental cleanup [--keep N]        remove old versions (never the current one)
    dndtrain incremental record                    record the current model as a version if it is not one yet
    dndtrain incremental attach                    copy validation_results.json's scores into the current version
    dndtrain incremental compare [--max-drop X] [--against vN]
                                                   current version's scores vs its parent's: exit 0 ok, 1 regressed,
                                                   3 not comparable (a side has no scores)

How `train` works:
1. The current model (`trained_models/dnd_model`) is recorded as a version if it is not one yet (the backup).
2. Files added or changed since that version's data manifest are trained on, mixed with `replay_ratio` old training
   files per new file (seeded sample, against forgetting). Held-out files are never trained on: the previous model's
   held-out split stays held out, and per category just enough added files join it to keep the held-out share at
   `train.holdout_fraction` (so validation keeps measuring the same old files, plus a few new ones).
3. `train.train` continues from the current adapter with `[incremental]` learning rate / steps / warmup, writing
   checkpoints to `trained_models/incremental_checkpoints/` and the new model into a staging folder.
4. The finished model is swapped into `trained_models/dnd_model` (rename) and recorded as a new version (kind
   `incremental`, parent = the previous version).
An interrupted run (Ctrl-C, kill) never touches the current model; `--resume` continues from the last checkpoint with
the same file selection and settings (kept in `incremental_checkpoints/run.json`).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dndtrain.paths import Paths
from dndtrain.stages import StageError, require

RUN_FILE = "run.json"
STAGING_NAME = ".incremental-staging"
PLAN_FORMAT = 1


def incremental_checkpoints(paths: Paths) -> Path:
    """Checkpoints of an incremental run (separate from full training's, so `--resume` never mixes them up).
    TODO(lead): move to `Paths.incremental_checkpoints`."""
    return paths.output / "incremental_checkpoints"


class _RunPaths(Paths):
    """`paths` with the checkpoints of `train.train` redirected to the incremental checkpoint folder."""

    @property
    def checkpoints(self) -> Path:
        return incremental_checkpoints(self)


# --- data changes ----------------------------------------------------------------------------------------------------

@dataclass
class DataChanges:
    reference: str
    """What the data is compared with: a version name, or `training_metadata.json`."""
    added: list[str]
    changed: list[str]
    removed: list[str]
    files: int
    """Scenario files in the data folder now."""
    data_dir: Path
    current_version: str | None = None
    has_scores: bool = False
    """Whether the current version has validation scores attached."""
    interrupted: bool = False
    """An interrupted incremental run can be resumed (`dndtrain incremental train --resume`)."""

    @property
    def count(self) -> int:
        return len(self.added) + len(self.changed) + len(self.removed)

    def summary(self) -> str:
        if not self.count:
            text = f"No changes: {self.files} scenario files, all as in {self.reference}."
        else:
            text = (f"{len(self.added)} added, {len(self.changed)} changed, {len(self.removed)} removed scenario files "
                    f"since {self.reference} ({self.files} files now); `dndtrain incremental train` trains on them")
        if self.interrupted:
            text += " (an interrupted run can continue: `dndtrain incremental train --resume`)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "current_version": self.current_version, "has_scores": self.has_scores,
                "interrupted": self.interrupted,
                "changes": self.count, "files": self.files, "data_dir": str(self.data_dir),
                "added": self.added, "changed": self.changed, "removed": self.removed}


def _reference_manifest(paths: Paths) -> tuple[str, dict[str, str]]:
    from dndtrain import versions

    require(paths.model_dir, "trained model", "npm run train")
    cur = versions.current_version(paths)
    if cur is not None and versions.is_recorded(paths):
        return cur.name, cur.info.get("data_manifest") or {}
    try:
        meta = json.loads(paths.training_metadata.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    if isinstance(meta, dict) and isinstance(meta.get("data_manifest"), dict):
        return paths.training_metadata.name, meta["data_manifest"]
    if cur is not None:
        return cur.name, cur.info.get("data_manifest") or {}
    raise StageError(f"no data manifest for the model in {paths.model_dir} ({paths.training_metadata} is missing). "
                     f"Run `npm run train` first.")


def diff_manifests(old: dict[str, str], new: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
    return added, changed, removed


def check(paths: Paths, data_dir: Path | None = None) -> DataChanges:
    """Added, changed and removed scenario files since the current version's data manifest."""
    from dndtrain import versions
    from dndtrain.train import data_manifest

    data_dir = Path(data_dir or paths.scenarios)
    if not data_dir.is_dir():
        raise StageError(f"scenario folder {data_dir} does not exist")
    reference, old = _reference_manifest(paths)
    now = data_manifest(data_dir)
    added, changed, removed = diff_manifests(old, now)
    cur = versions.current_version(paths) if versions.is_recorded(paths) else None
    return DataChanges(reference, added, changed, removed, len(now), data_dir,
                       current_version=cur.name if cur else None, has_scores=bool(cur and cur.scores),
                       interrupted=(incremental_checkpoints(paths) / RUN_FILE).is_file())


# --- training --------------------------------------------------------------------------------------------------------

@dataclass
class IncrementalResult:
    version: Any
    """The new `versions.Version`."""
    parent: str
    new_files: list[str]
    replay_files: list[str]
    held_out_new: list[str]
    steps: int
    final_loss: float | None
    wall_time_s: float
    learning_rate: float
    loss_history: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        loss = f"{self.final_loss:.3f}" if self.final_loss is not None else "n/a"
        held = f", {len(self.held_out_new)} new file(s) held out for validation" if self.held_out_new else ""
        return (f"Incremental training {self.parent} -> {self.version.name}: {len(self.new_files)} new/changed file(s) "
                f"+ {len(self.replay_files)} replayed{held}; {self.steps} steps at lr {self.learning_rate:g} in "
                f"{self.wall_time_s / 60:.1f} min, final loss {loss}.\n"
                f"Previous model kept as {self.parent} (`dndtrain incremental rollback {self.parent}` restores it).")


def _read_split(model_dir: Path) -> tuple[list[str], list[str]]:
    from dndtrain.train import SPLIT_FILE

    try:
        data = json.loads((model_dir / SPLIT_FILE).read_text(encoding="utf-8"))
        return list(data.get("train") or []), list(data.get("holdout") or [])
    except (OSError, ValueError, AttributeError):
        raise StageError(f"{model_dir / SPLIT_FILE}: no train/held-out split recorded; "
                         f"retrain with `npm run train`") from None


def _recorded_train_config(model_dir: Path):
    from dndtrain.config import TrainConfig

    try:
        made_by = json.loads((model_dir / "dndtrain_config.json").read_text(encoding="utf-8"))
        recorded = made_by["train"]
    except (OSError, ValueError, KeyError, TypeError):
        raise StageError(f"{model_dir / 'dndtrain_config.json'}: missing or unreadable; it records the base model "
                         f"the adapter belongs to. Retrain with `npm run train`") from None
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in recorded.items() if k in names})


def held_out_files(manifest: dict[str, str], prev_holdout: list[str], added: list[str], fraction: float,
                   seed: int) -> set[str]:
    """The held-out split after new files arrive: every previously held-out file that still exists stays held out
    (the model never saw it), and per category just enough added files join it to keep the held-out share at
    `fraction` (ceil(n * fraction), as `train.split_scenarios` does; the added files are ranked by the same hash)."""
    import hashlib
    import math

    def category(rel: str) -> str:
        parts = rel.split("/")
        return parts[0] if len(parts) > 1 else ""

    held = {h for h in prev_holdout if h in manifest}
    if fraction <= 0:
        return held
    by_cat: dict[str, list[str]] = {}
    for rel in manifest:
        by_cat.setdefault(category(rel), []).append(rel)
    new = set(added)
    for cat, files in by_cat.items():
        target = min(math.ceil(len(files) * fraction), len(files) - 1)
        have = sum(1 for f in files if f in held)
        candidates = sorted((f for f in files if f in new),
                            key=lambda f: hashlib.sha256(f"{seed}:{f}".encode()).hexdigest())
        held.update(candidates[: max(0, target - have)])
    return held


def plan_run(cfg, paths: Paths, parent, data_dir: Path, max_steps: int | None = None) -> dict[str, Any]:
    """Decide what an incremental run trains on and with which settings (a JSON-able plan)."""
    from dndtrain.train import data_manifest

    inc = cfg.incremental
    if inc.replay_ratio < 0:
        raise StageError(f"incremental.replay_ratio must be >= 0, got {inc.replay_ratio}")
    steps = max_steps if max_steps is not None else inc.max_steps
    if steps < 1:
        raise StageError(f"incremental max_steps must be at least 1, got {steps}")
    manifest = data_manifest(data_dir)
    added, changed, removed = diff_manifests(parent.info.get("data_manifest") or {}, manifest)
    prev_train, prev_holdout = _read_split(paths.model_dir)
    recorded = _recorded_train_config(paths.model_dir)
    holdout = sorted(held_out_files(manifest, prev_holdout, added, recorded.holdout_fraction, recorded.seed))
    held = set(holdout)
    new = [f for f in added + changed if f not in held]
    pool = sorted(f for f in prev_train if f in manifest and f not in held and f not in changed)
    n_replay = min(len(pool), round(len(new) * inc.replay_ratio))
    replay = sorted(random.Random(f"{recorded.seed}:{parent.name}").sample(pool, n_replay)) if new else []
    train_cfg = dataclasses.replace(
        recorded,
        learning_rate=inc.learning_rate, max_steps=steps, warmup_steps=min(inc.warmup_steps, steps),
        logging_steps=max(1, min(cfg.train.logging_steps, steps // 10)),
        save_steps=max(1, min(cfg.train.save_steps, steps // 4)), save_total_limit=2,
        threads=cfg.train.threads, precision=cfg.train.precision,
    )
    return {
        "format": PLAN_FORMAT, "parent": parent.name, "parent_sha256": parent.info.get("adapter_sha256"),
        "data_dir": str(data_dir), "data_manifest": manifest,
        "added": added, "changed": changed, "removed": removed,
        "new": new, "replay": replay, "held_out_new": sorted(held & set(added)),
        "train": sorted(set(new) | set(replay)), "holdout": holdout,
        "train_config": dataclasses.asdict(train_cfg),
    }


def _complete_checkpoints(ckdir: Path) -> list[Path]:
    """Checkpoints whose trainer_state.json was written (it is written last); incomplete ones are deleted."""
    done = []
    for c in sorted(ckdir.glob("checkpoint-*")):
        try:
            json.loads((c / "trainer_state.json").read_text(encoding="utf-8"))
            int(c.name.split("-")[-1])
            done.append(c)
        except (OSError, ValueError):
            shutil.rmtree(c, ignore_errors=True)
    return sorted(done, key=lambda p: int(p.name.split("-")[-1]))


def incremental_train(cfg, paths: Paths, resume: bool = False, max_steps: int | None = None, log=print,
                      on_log=None, data_dir: Path | None = None) -> IncrementalResult | None:
    """Continue the current adapter on new/changed scenario files (see the module docstring). Returns None when
    there is nothing new to train on."""
    from dndtrain import versions
    from dndtrain.config import TrainConfig
    from dndtrain.scenario import parse_file
    from dndtrain.train import SPLIT_FILE, manifest_hash, replace_dir, train, write_json_atomic

    t0 = time.time()
    data_dir = Path(data_dir or paths.scenarios)
    require(paths.model_dir, "trained model", "npm run train")
    if not data_dir.is_dir():
        raise StageError(f"scenario folder {data_dir} does not exist")
    ckdir = incremental_checkpoints(paths)
    run_file = ckdir / RUN_FILE

    if resume:
        try:
            plan = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise StageError(f"--resume: no interrupted incremental run in {ckdir}; "
                             f"start one with `dndtrain incremental train`") from None
        if not _complete_checkpoints(ckdir):
            raise StageError(f"--resume: the interrupted run saved no checkpoint in {ckdir}; "
                             f"start again with `dndtrain incremental train`")
        if versions.adapter_hash(paths.model_dir) != plan.get("parent_sha256"):
            raise StageError(f"--resume: {paths.model_dir} changed since the interrupted run; "
                             f"start again with `dndtrain incremental train`")
        if Path(plan["data_dir"]).resolve() != data_dir.resolve():
            raise StageError(f"--resume: the interrupted run used {plan['data_dir']}, not {data_dir}")
        parent = versions.ensure_recorded(paths, log=log)
        if max_steps is not None and max_steps != plan["train_config"]["max_steps"]:
            log(f"--resume keeps the interrupted run's {plan['train_config']['max_steps']} steps (ignoring --max-steps)")
        log(f"Resuming the incremental run on top of {plan['parent']}")
    else:
        if ckdir.exists():
            log(f"Discarding the checkpoints of an earlier interrupted incremental run in {ckdir}")
            shutil.rmtree(ckdir)
        parent = versions.ensure_recorded(paths, log=log)  # the backup, before anything is overwritten
        plan = plan_run(cfg, paths, parent, data_dir, max_steps)
        if not plan["new"]:
            held = f" ({len(plan['held_out_new'])} new file(s) are held out for validation)" if plan["held_out_new"] else ""
            log(f"Nothing to train: no new or changed training files since {parent.name}{held}.")
            return None
        ckdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_file, plan)

    missing = [f for f in plan["train"] if not (data_dir / f).is_file()]
    if missing:
        raise StageError(f"{len(missing)} planned training file(s) no longer exist ({', '.join(missing[:3])}); "
                         f"start again with `dndtrain incremental train`")
    selected = [parse_file(data_dir / f, data_dir) for f in plan["train"]]
    train_cfg = TrainConfig(**plan["train_config"])
    log(f"Incremental run on top of {plan['parent']}: {len(plan['new'])} new/changed file(s) "
        f"({len(plan['added'])} added, {len(plan['changed'])} changed) + {len(plan['replay'])} replayed old file(s); "
        f"{train_cfg.max_steps} steps at lr {train_cfg.learning_rate:g}")

    staging = paths.output / STAGING_NAME
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        old_meta = paths.training_metadata.read_bytes() if paths.training_metadata.is_file() else None
    except OSError:
        old_meta = None
    swapped = False
    try:
        res = train(
            train_cfg, _RunPaths(paths.root, paths.output, paths.assets), data_dir=data_dir, resume=resume, log=log,
            on_log=on_log, init_adapter=paths.model_dir, scenarios=selected, model_dir=staging / paths.model_dir.name,
            extra_metadata={
                "kind": "incremental", "parent_version": plan["parent"],
                "incremental": {k: plan[k] for k in ("added", "changed", "removed", "new", "replay", "held_out_new")},
            },
        )
        new_model = staging / paths.model_dir.name
        # The split: old held-out files stay held out (train() would recompute it from the current data).
        write_json_atomic(new_model / SPLIT_FILE, {"train": plan["train"], "holdout": plan["holdout"]})
        meta = json.loads(paths.training_metadata.read_text(encoding="utf-8"))
        meta.update({
            "model_dir": str(paths.model_dir),
            "data_manifest": plan["data_manifest"], "data_hash": manifest_hash(plan["data_manifest"]),
            "split": dict(meta.get("split") or {}, train=plan["train"], holdout=plan["holdout"]),
        })
        replace_dir(new_model, paths.model_dir)
        swapped = True
        write_json_atomic(paths.training_metadata, meta)
    except BaseException:
        if not swapped and old_meta is not None:  # train() may have written metadata of the unfinished model
            try:
                tmp = paths.training_metadata.with_name(f".{paths.training_metadata.name}.restore")
                tmp.write_bytes(old_meta)
                tmp.replace(paths.training_metadata)
            except OSError:
                pass
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    version = versions.record_version(paths, kind="incremental", parent=plan["parent"], log=log)
    shutil.rmtree(ckdir, ignore_errors=True)
    return IncrementalResult(
        version=version, parent=plan["parent"], new_files=plan["new"], replay_files=plan["replay"],
        held_out_new=plan["held_out_new"], steps=res.steps, final_loss=res.final_loss,
        wall_time_s=time.time() - t0, learning_rate=train_cfg.learning_rate, loss_history=res.loss_history,
    )


# --- command line ----------------------------------------------------------------------------------------------------

def add_commands(sub, common, handler) -> None:
    p = sub.add_parser(
        "incremental", help="incremental training and model versions",
        description="Continue training the current model on new scenario files, and manage model versions.")
    # No options on the group itself (a sub-command's defaults would override them); defaults for the handler.
    p.set_defaults(func=handler, inc_command=None, config=None, root=".", output=None, assets_dir=None)
    isub = p.add_subparsers(dest="inc_command", metavar="COMMAND")

    c = isub.add_parser("check", help="list scenario files added, changed or removed since the current version")
    common(c)
    c.add_argument("--json", action="store_true", help="print the changes as JSON")

    c = isub.add_parser("train", help="continue the current model on new/changed files (the old one is kept)")
    common(c)
    c.add_argument("--max-steps", dest="inc_max_steps", type=int, metavar="N",
                   help="optimizer steps (overrides incremental.max_steps)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted incremental run from its checkpoint")

    c = isub.add_parser("versions", help="table of model versions")
    common(c)
    c.add_argument("--json", action="store_true", help="print the versions as JSON")

    c = isub.add_parser("rollback", help="make an earlier version the current model again")
    common(c)
    c.add_argument("name", metavar="vN", help="version to restore, e.g. v2")

    c = isub.add_parser("cleanup", help="remove old versions (never the current one)")
    common(c)
    c.add_argument("--keep", type=int, default=5, metavar="N", help="how many of the newest versions to keep (default 5)")

    c = isub.add_parser("record", help="record the current model as a version (if it is not one yet)")
    common(c)

    c = isub.add_parser("attach", help="copy the latest validation scores into the current version")
    common(c)

    c = isub.add_parser("compare", help="compare the current version's validation scores with its parent's")
    common(c)
    c.add_argument("--max-drop", type=float, default=0.02, metavar="X",
                   help="largest allowed drop of a score (shares in [0, 1]; default 0.02 = 2 points)")
    c.add_argument("--against", metavar="vN", help="compare with this version instead of the parent")
    c.add_argument("--json", action="store_true", help="print the comparison as JSON")


def run_command(args, cfg, paths, log=print) -> int:
    from dndtrain import versions

    cmd = getattr(args, "inc_command", None)
    if cmd == "check":
        ch = check(paths)
        print(json.dumps(ch.to_dict(), indent=2) if args.json else ch.summary(), flush=True)
        return 0
    if cmd == "train":
        res = incremental_train(cfg, paths, resume=args.resume, max_steps=args.inc_max_steps, log=log)
        if res is not None:
            log("")
            log(res.summary())
            log("Next: npm run train:validate  (dndtrain validate), then `dndtrain incremental compare`")
        return 0
    if cmd == "versions":
        if args.json:
            rows = [{"name": v.name, "current": v.current, **{k: v.info.get(k) for k in (
                "kind", "parent", "created", "trained", "steps", "final_loss", "base_model", "scores", "validation",
                "train_files", "holdout_files")}, "files": v.files} for v in versions.list_versions(paths)]
            print(json.dumps(rows, indent=2), flush=True)
        else:
            print(versions.versions_table(paths), flush=True)
        return 0
    if cmd == "rollback":
        versions.rollback(paths, args.name, log=log)
        log("Next: npm run train:convert && npm run train:deploy to ship it")
        return 0
    if cmd == "cleanup":
        versions.cleanup(paths, args.keep, log=log)
        return 0
    if cmd == "record":
        v = versions.ensure_recorded(paths, log=log)
        if v is None:
            raise StageError(f"no trained model at {paths.model_dir}. Run `npm run train` first.")
        log(f"Current model: {v.summary()}")
        return 0
    if cmd == "attach":
        return 0 if versions.attach_validation(paths, log=log) is not None else 1
    if cmd == "compare":
        if args.max_drop < 0:
            raise StageError(f"--max-drop must be >= 0, got {args.max_drop}")
        comp = versions.compare(paths, against=args.against, max_drop=args.max_drop)
        if args.json:
            print(json.dumps(dataclasses.asdict(comp), indent=2), flush=True)
        else:
            print(comp.summary(), flush=True)
        if not comp.comparable:
            return 3
        return 1 if comp.regressed else 0
    import sys

    print("usage: dndtrain incremental {check,train,versions,rollback,cleanup,record,attach,compare} ...\n"
          "Run `dndtrain incremental COMMAND --help` for a command's options.", file=sys.stderr, flush=True)
    return 2

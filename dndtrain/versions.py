"""Model versions: every trained model is snapshotted into `trained_models/versions/vN/`.

Layout (all under `paths.versions`):

    v3/dnd_model/               a copy of the adapter folder (adapter, tokenizer, dndtrain_config.json, split.json)
    v3/training_metadata.json   the training metadata of that run (when there was one)
    v3/version.json             data manifest (sha256 per scenario file), base model, config, steps, final loss,
                                validation scores (once `attach_validation` ran), date, kind, parent, adapter hash
    current.json                {"name": "v3", "since": "<UTC time it became current>"}

`trained_models/dnd_model/` is always the current model; `current.json` says which version it is. A version folder is
written under a temp name and renamed into place, so a crash never leaves a half-written `vN`. Rolling back copies
`vN/dnd_model` into a temp folder and swaps it in with `train.replace_dir`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dndtrain.paths import Paths
from dndtrain.stages import StageError, require

VERSION_FILE = "version.json"
CURRENT_FILE = "current.json"
MODEL_SUBDIR = "dnd_model"
METADATA_FILE = "training_metadata.json"
ADAPTER_FILE = "adapter_model.safetensors"
_NAME = re.compile(r"^v(\d+)$")

REGRESSION_METRICS = ("tool_f1", "format_validity", "no_call_accuracy", "arg_accuracy")
"""Validation shares (higher is better) compared between a version and its parent."""
TABLE_METRICS = (("tool_f1", "F1"), ("format_validity", "format"), ("no_call_accuracy", "no-call"))


@dataclass
class Version:
    name: str
    """`v1`, `v2`, ..."""
    path: Path
    """The version folder."""
    info: dict[str, Any] = field(default_factory=dict)
    """The contents of version.json."""
    current: bool = False

    @property
    def number(self) -> int:
        return int(self.name[1:])

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_SUBDIR

    @property
    def kind(self) -> str:
        return self.info.get("kind", "full")

    @property
    def parent(self) -> str | None:
        return self.info.get("parent")

    @property
    def created(self) -> str:
        return self.info.get("created", "")

    @property
    def scores(self) -> dict[str, Any] | None:
        return self.info.get("scores")

    @property
    def files(self) -> int:
        return len(self.info.get("data_manifest") or {})

    def summary(self) -> str:
        loss = self.info.get("final_loss")
        loss_s = f"{loss:.3f}" if isinstance(loss, (int, float)) else "n/a"
        parent = f", parent {self.parent}" if self.parent else ""
        return (f"{self.name} ({self.kind}{parent}): {self.files} scenario files, {self.info.get('steps', '?')} steps, "
                f"final loss {loss_s}{', current' if self.current else ''}")


# --- small helpers ---------------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: cannot read ({exc}); fix or delete the file") from None
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected a JSON object")
    return data


def _write_json(path: Path, data: Any) -> None:
    from dndtrain.train import write_json_atomic

    write_json_atomic(path, data)


def sha256_file(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def adapter_hash(model_dir: Path) -> str | None:
    """sha256 of the adapter weights: identifies a model folder's content."""
    return sha256_file(Path(model_dir) / ADAPTER_FILE)


def _number(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def _check_name(name: str) -> str:
    name = name.strip()
    if name.isdigit():
        name = f"v{name}"
    if _number(name) is None:
        raise StageError(f"'{name}' is not a version name; versions are called v1, v2, ... (see `dndtrain incremental versions`)")
    return name


# --- reading ---------------------------------------------------------------------------------------------------------

def _current_record(paths: Paths) -> dict[str, Any] | None:
    try:
        return _read_json(paths.versions / CURRENT_FILE)
    except FileNotFoundError:
        return None


def list_versions(paths: Paths) -> list[Version]:
    """Every recorded version, oldest first (folders without a readable version.json are skipped)."""
    if not paths.versions.is_dir():
        return []
    cur = (_current_record(paths) or {}).get("name")
    out = []
    for d in paths.versions.iterdir():
        if not d.is_dir() or _number(d.name) is None:
            continue
        try:
            info = _read_json(d / VERSION_FILE)
        except (FileNotFoundError, StageError):
            continue
        out.append(Version(d.name, d, info, current=(d.name == cur)))
    return sorted(out, key=lambda v: v.number)


def get_version(paths: Paths, name: str) -> Version:
    name = _check_name(name)
    for v in list_versions(paths):
        if v.name == name:
            return v
    known = ", ".join(v.name for v in list_versions(paths)) or "none"
    raise StageError(f"no version {name} in {paths.versions} (known: {known})")


def current_version(paths: Paths) -> Version | None:
    """The version recorded as current in current.json (None when nothing is recorded)."""
    rec = _current_record(paths)
    if not rec or not rec.get("name"):
        return None
    for v in list_versions(paths):
        if v.name == rec["name"]:
            return v
    return None


def is_recorded(paths: Paths) -> bool:
    """True when `paths.model_dir` is the current version (same adapter weights)."""
    cur = current_version(paths)
    return cur is not None and cur.info.get("adapter_sha256") == adapter_hash(paths.model_dir)


# --- writing ---------------------------------------------------------------------------------------------------------

def _set_current(paths: Paths, name: str) -> None:
    _write_json(paths.versions / CURRENT_FILE, {"name": name, "since": _now()})


def _training_metadata(paths: Paths) -> dict[str, Any]:
    try:
        return _read_json(paths.training_metadata)
    except FileNotFoundError:
        return {}
    except StageError:
        return {}


def _metadata_describes(meta: dict[str, Any], model_dir: Path) -> bool:
    """Does this training metadata belong to the model in `model_dir`? Same folder, or (a moved project) the same
    train/held-out split; never the staging folder of an unfinished incremental run."""
    recorded = meta.get("model_dir")
    if not recorded or Path(recorded).resolve() == model_dir.resolve():
        return True
    if ".incremental-staging" in Path(recorded).parts:
        return False
    try:
        split = json.loads((model_dir / "split.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    ms = meta.get("split") or {}
    return isinstance(split, dict) and split.get("train") == ms.get("train") and split.get("holdout") == ms.get("holdout")


def record_version(paths: Paths, kind: str = "full", parent: str | None = None, data_dir: Path | None = None,
                   log=print) -> Version:
    """Snapshot `paths.model_dir` (+ `paths.training_metadata`) as the next version vN and make it current.

    Idempotent: when the model folder already is the current version (same adapter weights), that version is returned
    and nothing is copied. `data_dir` picks the scenario folder hashed into the data manifest; by default the manifest
    recorded by the training run is used (it describes the data the model was trained from)."""
    from dndtrain.train import data_manifest, manifest_hash

    if kind not in ("full", "incremental"):
        raise ValueError(f"kind must be 'full' or 'incremental', got {kind!r}")
    model_dir = require(paths.model_dir, "trained model", "npm run train")
    digest = adapter_hash(model_dir)
    if digest is None:
        raise StageError(f"{model_dir}: no {ADAPTER_FILE}; it is not a trained adapter. Run `npm run train` first.")
    cur = current_version(paths)
    if cur is not None and cur.info.get("adapter_sha256") == digest:
        return cur

    meta = _training_metadata(paths)
    if meta and not _metadata_describes(meta, model_dir):
        log(f"note: {paths.training_metadata} describes another model; recording {model_dir} without it")
        meta = {}
    if data_dir is not None:
        manifest = data_manifest(Path(data_dir))
    elif isinstance(meta.get("data_manifest"), dict):
        manifest = meta["data_manifest"]
    else:
        manifest = data_manifest(paths.scenarios) if paths.scenarios.is_dir() else {}
    if parent is None and kind == "incremental":
        parent = meta.get("parent_version")
    try:
        made_by = json.loads((model_dir / "dndtrain_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        made_by = {}
    split = meta.get("split") or {}
    info = {
        "kind": kind,
        "parent": parent,
        "created": _now(),
        "trained": meta.get("created"),
        "base_model": meta.get("base_model") or (made_by.get("train") or {}).get("base_model"),
        "base_model_path": meta.get("base_model_path") or made_by.get("base_model_path"),
        "config": meta.get("config") or made_by.get("train") or {},
        "steps": meta.get("steps"),
        "final_loss": meta.get("final_loss"),
        "train_time_s": meta.get("train_time_s"),
        "data_hash": manifest_hash(manifest),
        "data_manifest": manifest,
        "train_files": len(split.get("train") or []),
        "holdout_files": len(split.get("holdout") or []),
        "adapter_sha256": digest,
        "scores": None,
        "validation": None,
    }
    if meta.get("incremental"):
        info["incremental"] = meta["incremental"]

    paths.versions.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".new-version-", dir=paths.versions))
    try:
        shutil.copytree(model_dir, tmp / MODEL_SUBDIR)
        if meta:
            _write_json(tmp / METADATA_FILE, meta)
        number = max([v.number for v in list_versions(paths)] + [0]) + 1
        while True:
            name = f"v{number}"
            info["name"] = name
            _write_json(tmp / VERSION_FILE, info)
            try:
                if (paths.versions / name).exists():
                    raise FileExistsError
                tmp.rename(paths.versions / name)
                break
            except (FileExistsError, OSError) as exc:
                if not (paths.versions / name).exists():
                    raise StageError(f"cannot create {paths.versions / name}: {exc}") from None
                number += 1
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _set_current(paths, name)
    v = get_version(paths, name)
    log(f"Recorded {v.summary()}")
    return v


def ensure_recorded(paths: Paths, log=print) -> Version | None:
    """Record `paths.model_dir` as a version unless it already is the current one (None when there is no model)."""
    if not (paths.model_dir / ADAPTER_FILE).is_file():
        return None
    if is_recorded(paths):
        return current_version(paths)
    meta = _training_metadata(paths)
    kind = meta.get("kind") if meta.get("kind") in ("full", "incremental") else "full"
    return record_version(paths, kind=kind, log=log)


def _update_info(v: Version, **changes) -> Version:
    info = dict(v.info, **changes)
    _write_json(v.path / VERSION_FILE, info)
    v.info = info
    return v


def attach_validation(paths: Paths, log=print) -> Version | None:
    """Copy the aggregate scores of `paths.validation_results` into the current version's version.json.

    Records the current model as a version first when it is not recorded yet. Returns the updated version, or None
    (with a message) when the results belong to another model or predate the current version."""
    try:
        data = _read_json(paths.validation_results)
    except FileNotFoundError:
        raise StageError(f"validation results not found at {paths.validation_results}. "
                         f"Run `npm run train:validate` first.") from None
    scored = Path(str(data.get("model", ""))).resolve() if data.get("model") else None
    if scored is None or scored != paths.model_dir.resolve():
        log(f"validation results are for {data.get('model') or 'an unknown model'}, not the current model "
            f"{paths.model_dir}; not attached")
        return None
    was_recorded = is_recorded(paths)
    v = ensure_recorded(paths, log=log)
    if v is None:
        raise StageError(f"no trained model at {paths.model_dir}. Run `npm run train` first.")
    # Stale results: made before the current model was trained, or before it became current (rollback).
    limits = [str(v.info.get("trained") or "")]
    if was_recorded:
        limits.append(str((_current_record(paths) or {}).get("since") or ""))
    created = str(data.get("created") or "")
    newest = max(limits)
    if newest and created and created < newest:
        log(f"validation results ({created}) are older than the current model {v.name} ({newest}); "
            f"run `npm run train:validate` again")
        return None
    trained = data.get("trained") or {}
    scores = {k: val for k, val in trained.items() if isinstance(val, (int, float)) and not isinstance(val, bool)}
    base = data.get("base") or {}
    validation = {
        "created": created, "n_examples": data.get("n_examples"), "limit": data.get("limit"),
        "n_files": len(data.get("scenarios") or []), "scenario_root": data.get("scenario_root"),
        "scenarios_hash": hashlib.sha256(json.dumps(sorted(data.get("scenarios") or [])).encode()).hexdigest(),
        "base_scores": {k: base[k] for k in REGRESSION_METRICS if isinstance(base.get(k), (int, float))} or None,
    }
    _update_info(v, scores=scores, validation=validation)
    log(f"Attached validation scores to {v.name}: " + ", ".join(
        f"{k} {scores[k]:.3f}" for k in REGRESSION_METRICS if isinstance(scores.get(k), (int, float))))
    return v


@dataclass
class Comparison:
    version: str
    parent: str | None
    deltas: dict[str, float | None]
    """Per metric: version score minus parent score (None where either side lacks it)."""
    regressed: list[str]
    comparable: bool
    note: str = ""

    def summary(self) -> str:
        if not self.comparable:
            return f"{self.version} vs {self.parent or '(no parent)'}: not comparable: {self.note}"
        parts = [f"{k} {d:+.3f}" for k, d in self.deltas.items() if d is not None]
        verdict = f"REGRESSED ({', '.join(self.regressed)})" if self.regressed else "no regression"
        return f"{self.version} vs {self.parent}: {', '.join(parts) or 'no shared metrics'}: {verdict}" + (
            f" ({self.note})" if self.note else "")


def compare(paths: Paths, name: str | None = None, against: str | None = None, max_drop: float = 0.02) -> Comparison:
    """Compare a version's validation scores (default: the current one) with another's (default: its parent).
    A metric regresses when it dropped by more than `max_drop` (shares in [0, 1]: 0.02 = 2 points)."""
    v = get_version(paths, name) if name else current_version(paths)
    if v is None:
        raise StageError("no current model version recorded. Run `npm run train` first.")
    other_name = against or v.parent
    if not other_name:
        return Comparison(v.name, None, {}, [], False, "it has no parent version")
    other = get_version(paths, other_name)
    if not v.scores or not other.scores:
        missing = [x.name for x in (v, other) if not x.scores]
        return Comparison(v.name, other.name, {}, [], False,
                          f"no validation scores for {', '.join(missing)} (validate it, then `dndtrain incremental attach`)")
    deltas, regressed = {}, []
    for k in REGRESSION_METRICS:
        a, b = v.scores.get(k), other.scores.get(k)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            deltas[k] = a - b
            if a - b < -max_drop - 1e-9:
                regressed.append(k)
        else:
            deltas[k] = None
    note = ""
    va, vb = v.info.get("validation") or {}, other.info.get("validation") or {}
    if va.get("scenarios_hash") != vb.get("scenarios_hash") or va.get("limit") != vb.get("limit"):
        note = "validated on different scenario sets or limits"
    return Comparison(v.name, other.name, deltas, regressed, True, note)


def _copy_model(src: Path, paths: Paths) -> None:
    from dndtrain.train import replace_dir

    paths.model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{paths.model_dir.name}-rollback-", dir=paths.model_dir.parent))
    try:
        shutil.rmtree(tmp)
        shutil.copytree(src, tmp)
        replace_dir(tmp, paths.model_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def rollback(paths: Paths, name: str, log=print) -> Version:
    """Make version `name` current again: its adapter folder is copied back into `paths.model_dir` (atomically) and its
    training metadata restored. The model being replaced is recorded first when it is not a version yet."""
    target = get_version(paths, name)
    if not (target.model_dir / ADAPTER_FILE).is_file():
        raise StageError(f"{target.model_dir}: the version has no adapter; it cannot be restored")
    ensure_recorded(paths, log=log)
    _copy_model(target.model_dir, paths)
    meta = target.path / METADATA_FILE
    if meta.is_file():
        _write_json(paths.training_metadata, _read_json(meta))
    _set_current(paths, target.name)
    target = get_version(paths, target.name)
    log(f"Rolled back: {target.summary()}")
    return target


def cleanup(paths: Paths, keep: int, log=print) -> list[str]:
    """Remove all but the newest `keep` versions; the current version is never removed. Returns the removed names."""
    if keep < 1:
        raise StageError(f"--keep must be at least 1, got {keep}")
    versions = list_versions(paths)
    cur = current_version(paths)
    keep_names = {v.name for v in versions[-keep:]}
    if cur is not None:
        keep_names.add(cur.name)
    removed = []
    for v in versions:
        if v.name in keep_names:
            continue
        trash = v.path.with_name(f".{v.name}.removing")
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(v.path, trash)  # the version disappears at once; the delete below may take a while
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(v.name)
    # Leftovers of interrupted snapshots or removals.
    if paths.versions.is_dir():
        for d in paths.versions.iterdir():
            if d.is_dir() and (d.name.startswith(".new-version-") or d.name.endswith(".removing")):
                shutil.rmtree(d, ignore_errors=True)
    log(f"Removed {len(removed)} old version(s)" + (f": {', '.join(removed)}" if removed else "")
        + f"; kept {', '.join(sorted(keep_names, key=lambda n: int(n[1:]))) or 'none'}")
    return removed


def versions_table(paths: Paths) -> str:
    """A text table of every version: date, kind, parent, files, steps, loss and validation scores."""
    versions = list_versions(paths)
    if not versions:
        return f"no versions recorded in {paths.versions} (train a model with `npm run train`)"
    head = ["", "version", "kind", "parent", "date", "files", "steps", "loss"] + [h for _, h in TABLE_METRICS]
    rows = [head]
    for v in versions:
        loss = v.info.get("final_loss")
        sc = v.scores or {}
        rows.append([
            "*" if v.current else "", v.name, v.kind, v.parent or "-", (v.created or "")[:16].replace("T", " "),
            str(v.files), str(v.info.get("steps") if v.info.get("steps") is not None else "-"),
            f"{loss:.3f}" if isinstance(loss, (int, float)) else "-",
        ] + [f"{sc[k]:.3f}" if isinstance(sc.get(k), (int, float)) else "-" for k, _ in TABLE_METRICS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("* = current (trained_models/dnd_model); scores are validation shares on held-out turns")
    return "\n".join(lines)

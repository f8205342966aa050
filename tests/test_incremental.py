"""Incremental training and model versions, on the tiny model (`trained`: a 2-step adapter on 6 fixture scenes)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from dndtrain import versions
from dndtrain.cli import main
from dndtrain.config import Config, IncrementalConfig
from dndtrain.incremental import check, incremental_checkpoints, incremental_train
from dndtrain.stages import StageError

NEW_SCENES = {
    "combat/wolf_pack.md": """
        # SYSTEM
        Role: Dungeon Master
        World: Forgotten Realms
        Location: The High Forest
        Party:
        - Bryn (Human Ranger, Level 4, HP: 34/34)

        # USER
        I loose an arrow at the lead wolf.

        # DM
        Bryn draws and releases in one smooth motion. [roll: d20+6]

        # TOOLCALL
        d20+6: 1d20 (12) + 6 = *18*

        # DM
        The arrow takes the wolf in the shoulder and the pack scatters into the pines.
        """,
    "exploration/sunken_stair.md": """
        # SYSTEM
        Role: Dungeon Master
        World: Greyhawk
        Location: A flooded stairwell
        Party:
        - Osk (Dwarf Cleric, Level 3, HP: 26/26)

        # USER
        Osk searches the steps for loose stones.

        # DM
        Cold water laps at the lowest step as Osk runs a hand along the wall. [check: investigation, Osk]

        # TOOLCALL
        investigation (Osk): 11 + 0(skill) = *11*

        # DM
        One stone rocks under his fingers; behind it, a rusted key glints.
        """,
    "roleplay/merchant_haggle.md": """
        # SYSTEM
        Role: Dungeon Master
        World: Eberron
        Location: Sharn market
        Party:
        - Vex (Tiefling Bard, Level 2, HP: 15/15)

        # USER
        I ask the merchant how much for the map.

        # DM
        "Forty gold, and not a copper less," the merchant says, tapping the parchment.
        """,
}


def _write(root: Path, scenes: dict[str, str]) -> None:
    for rel, text in scenes.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")


def _quiet(*a):
    pass


@pytest.fixture
def inc_cfg(tiny_train_config) -> Config:
    train = tiny_train_config
    train.threads = 1
    train.holdout_fraction = 0.2
    return Config(train=train, incremental=IncrementalConfig(learning_rate=1e-3, max_steps=2, warmup_steps=0))


@pytest.fixture
def trained(project, inc_cfg):
    """A project with a 2-step tiny adapter (one file per category held out; one more file per category keeps the
    held-out share, so the new scenes below are all trained on)."""
    from dndtrain.train import train

    train(inc_cfg.train, project, log=_quiet)
    return project


def _config_file(tmp_path: Path, tiny_model_dir: Path, steps: int, save_steps: int) -> Path:
    cfg = tmp_path / "inc.toml"
    cfg.write_text(
        f'[train]\nbase_model = "{tiny_model_dir.as_posix()}"\nthreads = 1\nlogging_steps = 1\nsave_steps = {save_steps}\n'
        f"[incremental]\nlearning_rate = 1e-3\nmax_steps = {steps}\nwarmup_steps = 0\n"
    )
    return cfg


# --- check -----------------------------------------------------------------------------------------------------------

def test_check_lists_added_changed_and_removed_files(trained, capsys):
    p = trained
    v1 = versions.record_version(p, log=_quiet)
    assert v1.name == "v1" and v1.current and v1.files == 6
    assert check(p).count == 0
    _write(p.scenarios, {"combat/wolf_pack.md": NEW_SCENES["combat/wolf_pack.md"]})
    changed = p.scenarios / "roleplay/tavern_rumors.md"
    changed.write_text(changed.read_text() + "\n", encoding="utf-8")
    (p.scenarios / "exploration/river_crossing.md").unlink()

    ch = check(p)
    assert (ch.added, ch.changed, ch.removed) == (
        ["combat/wolf_pack.md"], ["roleplay/tavern_rumors.md"], ["exploration/river_crossing.md"])
    assert ch.reference == "v1" and ch.files == 6
    assert "1 added, 1 changed, 1 removed" in ch.summary()

    assert main(["incremental", "check", "--root", str(p.root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["added"] == ["combat/wolf_pack.md"] and data["changes"] == 3 and data["current_version"] == "v1"
    assert data["has_scores"] is False


def test_held_out_share_is_kept_when_files_are_added():
    from dndtrain.incremental import held_out_files

    old = {f"combat/c{i}.md": "x" for i in range(9)}
    new = {f"combat/n{i}.md": "y" for i in range(3)}
    manifest = {**old, **new}
    # 12 files at 10 %: 2 held out; one was held out before, so exactly one added file joins it.
    held = held_out_files(manifest, ["combat/c0.md", "combat/gone.md"], sorted(new), 0.1, 42)
    assert "combat/c0.md" in held and "combat/gone.md" not in held
    assert len(held) == 2 and len(held & set(new)) == 1
    # Already enough held out: the added files are all trained on.
    assert held_out_files(manifest, ["combat/c0.md", "combat/c1.md"], sorted(new), 0.1, 42) == {"combat/c0.md", "combat/c1.md"}
    assert held_out_files(manifest, [], sorted(new), 0.0, 42) == set()


def test_check_without_a_model_says_what_to_run(project, capsys):
    assert main(["incremental", "check", "--root", str(project.root)]) == 1
    assert "npm run train" in capsys.readouterr().err


# --- train -----------------------------------------------------------------------------------------------------------

def test_incremental_train_backs_up_trains_and_records_a_new_version(trained, inc_cfg):
    p = trained
    before = versions.adapter_hash(p.model_dir)
    old_split = json.loads((p.model_dir / "split.json").read_text())
    _write(p.scenarios, NEW_SCENES)

    res = incremental_train(inc_cfg, p, log=_quiet)

    assert res is not None
    # The model that was current is backed up first (it was never recorded), then the new one is recorded.
    v1, v2 = versions.list_versions(p)
    assert (v1.name, v1.kind, v1.info["adapter_sha256"]) == ("v1", "full", before)
    assert versions.adapter_hash(v1.model_dir) == before
    assert (v2.name, v2.kind, v2.parent, v2.current) == ("v2", "incremental", "v1", True)
    assert res.version.name == "v2" and res.parent == "v1" and res.steps == 2
    assert versions.adapter_hash(p.model_dir) == v2.info["adapter_sha256"] != before
    assert v2.files == 9 and v2.info["incremental"]["added"] == sorted(NEW_SCENES)

    # Every added file is either trained on or held out; old held-out files are never trained on.
    split = json.loads((p.model_dir / "split.json").read_text())
    assert set(res.new_files) | set(res.held_out_new) == set(NEW_SCENES)
    assert res.new_files
    assert set(old_split["holdout"]) <= set(split["holdout"])
    assert not set(split["train"]) & set(split["holdout"])
    assert set(res.replay_files) <= set(old_split["train"])
    meta = json.loads(p.training_metadata.read_text())
    assert meta["kind"] == "incremental" and meta["parent_version"] == "v1"
    assert meta["model_dir"] == str(p.model_dir) and meta["split"]["holdout"] == split["holdout"]
    assert meta["config"]["learning_rate"] == 1e-3

    # Nothing left behind, and the data is now up to date.
    assert not incremental_checkpoints(p).exists()
    assert not [d for d in p.output.iterdir() if d.name.startswith(".")]
    assert check(p).count == 0
    assert incremental_train(inc_cfg, p, log=_quiet) is None
    assert [v.name for v in versions.list_versions(p)] == ["v1", "v2"]


def test_versions_table_rollback_and_cleanup(trained, inc_cfg, capsys):
    p = trained
    v1 = versions.record_version(p, log=_quiet)
    assert versions.record_version(p, log=_quiet).name == "v1"  # idempotent for the same model
    v1_meta = p.training_metadata.read_text()
    _write(p.scenarios, NEW_SCENES)
    incremental_train(inc_cfg, p, log=_quiet)

    assert main(["incremental", "versions", "--root", str(p.root)]) == 0
    table = capsys.readouterr().out
    rows = {l.split()[1] if l.startswith("*") else l.split()[0]: l for l in table.splitlines()[2:] if l.strip()}
    assert rows["v2"].startswith("*") and "incremental" in rows["v2"] and " v1 " in rows["v2"], table
    assert not rows["v1"].startswith("*") and "full" in rows["v1"], table

    assert main(["incremental", "rollback", "v1", "--root", str(p.root)]) == 0
    assert versions.adapter_hash(p.model_dir) == v1.info["adapter_sha256"]
    assert versions.current_version(p).name == "v1"
    assert json.loads(p.training_metadata.read_text())["created"] == json.loads(v1_meta)["created"]
    assert check(p).added == sorted(NEW_SCENES)  # back to v1's view of the data

    # Two more versions (distinct adapter bytes are enough for versioning), then make the oldest current.
    for _ in range(2):
        with open(p.model_dir / "adapter_model.safetensors", "ab") as f:
            f.write(os.urandom(8))
        versions.record_version(p, log=_quiet)
    assert [v.name for v in versions.list_versions(p)] == ["v1", "v2", "v3", "v4"]
    versions.rollback(p, "v1", log=_quiet)
    assert main(["incremental", "cleanup", "--keep", "1", "--root", str(p.root)]) == 0
    assert [v.name for v in versions.list_versions(p)] == ["v1", "v4"]  # the current one survives --keep 1
    assert versions.current_version(p).name == "v1"
    assert main(["incremental", "rollback", "v3", "--root", str(p.root)]) == 1
    assert "no version v3" in capsys.readouterr().err
    with pytest.raises(StageError):
        versions.cleanup(p, 0, log=_quiet)


def test_attach_validation_and_compare(trained, inc_cfg, capsys):
    p = trained
    versions.record_version(p, log=_quiet)

    def results(model: Path, f1: float, age_s: float = 0, **extra):
        created = datetime.fromtimestamp(time.time() - age_s, timezone.utc).isoformat(timespec="seconds")
        data = {"created": created, "model": str(model), "n_examples": 4, "limit": 0, "scenarios": ["a.md"],
                "trained": {"tool_f1": f1, "format_validity": 0.9, "no_call_accuracy": 0.5, "arg_accuracy": 0.4,
                            "perplexity": 12.0, "tool_precision": None}, "base": None, **extra}
        p.validation_results.write_text(json.dumps(data))

    results(p.model_dir, 0.60)
    v1 = versions.attach_validation(p, log=_quiet)
    assert v1.scores["tool_f1"] == 0.60 and "tool_precision" not in v1.scores
    assert versions.get_version(p, "v1").scores["tool_f1"] == 0.60

    _write(p.scenarios, NEW_SCENES)
    incremental_train(inc_cfg, p, log=_quiet)
    # Results of another model are not attached.
    results(p.output / "elsewhere", 0.9)
    assert versions.attach_validation(p, log=_quiet) is None
    assert main(["incremental", "compare", "--root", str(p.root)]) == 3  # v2 has no scores yet

    results(p.model_dir, 0.57)  # -3 points
    assert main(["incremental", "attach", "--root", str(p.root)]) == 0
    capsys.readouterr()
    assert main(["incremental", "compare", "--root", str(p.root)]) == 1
    assert "REGRESSED (tool_f1)" in capsys.readouterr().out
    assert main(["incremental", "compare", "--root", str(p.root), "--max-drop", "0.05"]) == 0
    results(p.model_dir, 0.59)  # -1 point: within the default 2
    versions.attach_validation(p, log=_quiet)
    comp = versions.compare(p)
    assert comp.comparable and not comp.regressed and comp.deltas["tool_f1"] == pytest.approx(-0.01)

    # After a rollback, results made before it belong to the replaced model: not attached to v1.
    results(p.model_dir, 0.10, age_s=60)
    versions.rollback(p, "v1", log=_quiet)
    assert versions.attach_validation(p, log=_quiet) is None
    assert versions.current_version(p).scores["tool_f1"] == 0.60


# --- interruption ----------------------------------------------------------------------------------------------------

# Runs the CLI, but parks the process for good after the first checkpoint is saved, so the test can kill it mid-run
# no matter how fast the machine is.
STALL_AFTER_CHECKPOINT = """
import sys, time
import transformers
save = transformers.Trainer._save_checkpoint
def stall(self, *a, **k):
    save(self, *a, **k)
    print("checkpoint saved; stalling", flush=True)
    time.sleep(3600)
transformers.Trainer._save_checkpoint = stall
from dndtrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli(root: Path, cfg: Path, *extra: str) -> list[str]:
    return ["incremental", "train", "--root", str(root), "--config", str(cfg), *extra]


def test_killed_incremental_run_leaves_the_model_intact_and_resumes(trained, tiny_model_dir, tmp_path):
    p = trained
    versions.record_version(p, log=_quiet)
    before = versions.adapter_hash(p.model_dir)
    meta_before = p.training_metadata.read_text()
    _write(p.scenarios, NEW_SCENES)
    cfg = _config_file(tmp_path, tiny_model_dir, steps=8, save_steps=2)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    log = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", STALL_AFTER_CHECKPOINT, *_cli(p.root, cfg)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    ckdir = incremental_checkpoints(p)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if "stalling" in (tmp_path / "run1.log").read_text():
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed: " + (tmp_path / "run1.log").read_text()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()

    assert versions.adapter_hash(p.model_dir) == before
    assert p.training_metadata.read_text() == meta_before
    assert [v.name for v in versions.list_versions(p)] == ["v1"]
    assert (ckdir / "run.json").is_file() and list(ckdir.glob("checkpoint-*/trainer_state.json"))

    out = subprocess.run([sys.executable, "-m", "dndtrain", *_cli(p.root, cfg, "--resume")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Resuming from" in out.stdout + out.stderr
    v = versions.current_version(p)
    assert (v.name, v.kind, v.parent) == ("v2", "incremental", "v1")
    meta = json.loads(p.training_metadata.read_text())
    assert meta["steps"] == 8
    # The resumed run logged only the steps after the checkpoint.
    assert meta["loss_history"][0]["step"] > 1
    assert versions.adapter_hash(p.model_dir) != before
    assert not ckdir.exists()


def test_resume_without_an_interrupted_run_is_a_clear_error(trained, capsys):
    assert main(["incremental", "train", "--resume", "--root", str(trained.root)]) == 1
    assert "no interrupted incremental run" in capsys.readouterr().err


# --- weekly maintenance script ---------------------------------------------------------------------------------------

def test_weekly_maintenance_script_trains_validates_and_deploys(trained, tiny_model_dir, tmp_path):
    """The real script in a temp project (its own copy of scripts/, the venv linked in): no changes -> nothing to do;
    new scenes -> incremental version, validated, compared with the previous one, exported and deployed."""
    p = trained
    repo = Path(__file__).resolve().parents[1]
    (p.root / "scripts").mkdir()
    shutil.copy(repo / "scripts" / "weekly_maintenance.sh", p.root / "scripts")
    os.symlink(repo / ".venv", p.root / ".venv")
    cfg = _config_file(tmp_path, tiny_model_dir, steps=2, save_steps=100)
    cfg.write_text(cfg.read_text() + "[validate]\nmax_new_tokens = 4\n")
    env = dict(os.environ, DNDTRAIN_CONFIG=str(cfg), VALIDATE_LIMIT="2", KEEP="5")

    def run():
        return subprocess.run(["bash", "scripts/weekly_maintenance.sh"], cwd=p.root, env=env, capture_output=True,
                              text=True, timeout=900)

    out = run()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "No data changes" in out.stdout
    assert not p.deploy_dir.exists()

    _write(p.scenarios, NEW_SCENES)
    out = run()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "no regression" in out.stdout and "v2 deployed" in out.stdout
    v1, v2 = versions.list_versions(p)
    assert v1.scores is not None and v2.scores is not None  # the baseline was validated first, then the new model
    assert (v2.kind, v2.parent, v2.current) == ("incremental", "v1", True)
    assert (p.deploy_dir / "manifest.json").is_file()
    logs = list((p.root / "logs").glob("weekly_maintenance-*.log"))
    assert len(logs) == 1 and "v2 deployed" in logs[0].read_text()


def test_record_version_uses_only_the_metadata_of_this_model(trained):
    p = trained
    meta = json.loads(p.training_metadata.read_text())
    # A moved project: the recorded folder differs but the split is this model's -> the metadata is used.
    p.training_metadata.write_text(json.dumps(dict(meta, model_dir="/elsewhere/trained_models/dnd_model")))
    v1 = versions.record_version(p, log=_quiet)
    assert v1.info["steps"] == 2 and v1.files == 6
    # Metadata of an unfinished incremental run (its staging folder) never describes the current model.
    with open(p.model_dir / "adapter_model.safetensors", "ab") as f:
        f.write(b"\0")
    staging = str(p.output / ".incremental-staging" / "dnd_model")
    p.training_metadata.write_text(json.dumps(dict(meta, model_dir=staging, steps=99)))
    v2 = versions.record_version(p, log=_quiet)
    assert v2.info["steps"] is None and v2.files == 6

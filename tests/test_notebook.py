"""Execute notebooks/comprehensive_training_basic.ipynb headless (nbclient) on the tiny model in a temp project."""

from __future__ import annotations

import json
import sys
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "comprehensive_training_basic.ipynb"


def _cells_by_tag(nb) -> dict[str, dict]:
    return {t: c for c in nb.cells if c.cell_type == "code" for t in c.metadata.get("tags", [])}


def _text(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            out.append(o.get("text", ""))
        elif "data" in o and "text/plain" in o["data"]:
            out.append(o["data"]["text/plain"])
    return "".join(out)


def _images(cell) -> int:
    return sum(1 for o in cell.get("outputs", []) if "image/png" in o.get("data", {}))


def test_notebook_is_clean_and_parameterised():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    cells = _cells_by_tag(nb)
    assert {"parameters", "data", "train", "validate", "convert", "deploy", "runtime", "summary"} <= set(cells)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    params = cells["parameters"].source
    for var in ("DNDTRAIN_NB_ROOT", "DNDTRAIN_NB_BASE_MODEL", "DNDTRAIN_NB_MAX_STEPS"):
        assert var in params
    # Each pipeline step is a call into the package, not logic of its own.
    assert "train(cfg.train, paths, on_log=" in cells["train"].source
    assert "validate(cfg.validate, paths)" in cells["validate"].source
    assert "convert(cfg.export, paths)" in cells["convert"].source
    assert "deploy(cfg, paths)" in cells["deploy"].source
    assert "run_tests(cfg.test, paths)" in cells["runtime"].source


def test_notebook_runs_the_whole_pipeline_on_the_tiny_model(project, tiny_model_dir, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from dndtrain import versions

    env = {
        "DNDTRAIN_NB_ROOT": str(project.root), "DNDTRAIN_NB_BASE_MODEL": str(tiny_model_dir),
        "DNDTRAIN_NB_MAX_STEPS": "3", "DNDTRAIN_NB_VALIDATE_LIMIT": "2", "DNDTRAIN_NB_MAX_NEW_TOKENS": "8",
        "DNDTRAIN_NB_COMPARE_BASE": "0", "DNDTRAIN_NB_TEST_MAX_TOKENS": "8", "DNDTRAIN_NB_THREADS": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # The training config logs every step so the live plot gets a point per step.
    cfg = tmp_path / "nb.toml"
    cfg.write_text("[train]\nlogging_steps = 1\nsave_steps = 100\nwarmup_steps = 0\nholdout_fraction = 0.34\n")
    monkeypatch.setenv("DNDTRAIN_NB_CONFIG", str(cfg))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    workdir = tmp_path / "notebooks"
    workdir.mkdir()
    client = NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(workdir)}})
    client.execute()

    cells = _cells_by_tag(nb)
    # The kernel is this interpreter (the venv's python), not some other Python on the machine.
    assert _text(nb.cells[-1]).strip() == sys.executable
    assert str(project.root) in _text(cells["parameters"])
    assert "6 files" in _text(cells["data"])
    assert _images(cells["data-charts"]) >= 1
    # The live loss plot: one display, updated in place after each logged step.
    assert _images(cells["train"]) == 1
    assert "Trained 3 steps" in _text(cells["train"])
    assert "Validated" in _text(cells["validate"])
    assert "Exported" in _text(cells["convert"])
    assert "Deployed to" in _text(cells["deploy"]) or "Replaced the deployment" in _text(cells["deploy"])
    assert "RESULT:" in _text(cells["runtime"])
    assert "v1" in _text(cells["summary"])

    # Artifacts of every step, and the model recorded as a version with its validation scores.
    assert (project.model_dir / "adapter_model.safetensors").is_file()
    meta = json.loads(project.training_metadata.read_text())
    assert meta["steps"] == 3 and len(meta["loss_history"]) == 3
    results = json.loads(project.validation_results.read_text())
    assert results["n_examples"] == 2
    assert project.gguf_file("q4_k_m").is_file()
    assert project.deploy_dir.is_dir() and project.integration_results.is_file()
    v = versions.current_version(project)
    assert v is not None and v.name == "v1" and v.scores and "tool_f1" in v.scores

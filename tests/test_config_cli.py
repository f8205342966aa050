import json
from pathlib import Path

import pytest

from dndtrain.cli import main
from dndtrain.config import ConfigError, TrainConfig, field_docs, load_config, reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_field_is_documented():
    import dataclasses

    from dndtrain import config

    for cls in (config.TrainConfig, config.ValidateConfig, config.ExportConfig, config.TestConfig,
                config.IncrementalConfig):
        docs = field_docs(cls)
        assert set(docs) == {f.name for f in dataclasses.fields(cls)}, cls.__name__


def test_readme_config_reference_is_current():
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- config:start -->")[1].split("<!-- config:end -->")[0]
    assert block.strip() == reference_markdown().strip()


def test_toml_and_yaml_configs(tmp_path):
    t = tmp_path / "c.toml"
    t.write_text("[train]\nmax_steps = 7\nlearning_rate = 5e-4\n[export]\nquant = 'q8_0'\n")
    cfg = load_config(t)
    assert (cfg.train.max_steps, cfg.train.learning_rate, cfg.export.quant) == (7, 5e-4, "q8_0")
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lora_r: 8\n  lora_target_modules: q_proj\n")
    cfg = load_config(y)
    assert cfg.train.lora_r == 8 and cfg.train.lora_target_modules == ["q_proj"]
    assert cfg.train.max_steps == TrainConfig().max_steps


@pytest.mark.parametrize("text, needle", [
    ("[train]\nmax_stepz = 3\n", "unknown key 'train.max_stepz'"),
    ("[trian]\nmax_steps = 3\n", "unknown section 'trian'"),
    ("[train]\nmax_steps = 'many'\n", "should be a int"),
    ("[train\n", "cannot parse"),
])
def test_bad_configs_are_clear_errors(tmp_path, text, needle):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        load_config(p)


def test_cli_reports_bad_config_without_traceback(tmp_path, capsys):
    p = tmp_path / "bad.toml"
    p.write_text("[train]\nnope = 1\n")
    assert main(["train", "--config", str(p), "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nope" in err and "Traceback" not in err


def test_cli_train_on_malformed_scenario_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "data" / "scenarios" / "combat" / "broken.md"
    bad.parent.mkdir(parents=True)
    bad.write_text("# SYSTEM\nRole: Dungeon Master\n\n# DM\nHello\n")
    assert main(["train", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "broken.md:4:" in err and "first turn after SYSTEM must be '# USER'" in err


def test_cli_steps_in_wrong_order_say_what_to_run(tmp_path, capsys):
    (tmp_path / "data" / "scenarios").mkdir(parents=True)
    assert main(["deploy", "--root", str(tmp_path)]) == 1
    assert "npm run train:convert" in capsys.readouterr().err
    assert main(["convert", "--root", str(tmp_path)]) == 1
    assert "npm run train" in capsys.readouterr().err


def test_cli_help_and_unknown_base_model(tmp_path, capsys, scenes_dir):
    import shutil

    shutil.copytree(scenes_dir, tmp_path / "data" / "scenarios")
    assert main(["train", "--root", str(tmp_path), "--base-model", "org/some-hub-model"]) == 1
    assert "never downloads" in capsys.readouterr().err
    assert main([]) == 2


def test_cli_convert_flags_reach_the_export_config(tmp_path, monkeypatch):
    import dndtrain.export as export

    seen = []

    def fake_convert(cfg, paths, model_dir=None, log=print):
        seen.append(cfg)
        raise export.StageError("stop here")

    monkeypatch.setattr(export, "convert", fake_convert)
    (tmp_path / "data" / "scenarios").mkdir(parents=True)
    assert main(["convert", "--root", str(tmp_path)]) == 1
    assert main(["convert", "--root", str(tmp_path), "--quant", "q8_0", "--trained-blocks-q8"]) == 1
    (tmp_path / "on.toml").write_text("[export]\ntrained_blocks_q8 = true\n")
    assert main(["convert", "--root", str(tmp_path), "--config", str(tmp_path / "on.toml"),
                 "--no-trained-blocks-q8"]) == 1
    assert (seen[0].quant, seen[0].trained_blocks_q8) == ("q4_k_m", False)  # default: plain q4_k_m, <= 110 MB
    assert (seen[1].quant, seen[1].trained_blocks_q8) == ("q8_0", True)
    assert seen[2].trained_blocks_q8 is False  # the flag beats the config file

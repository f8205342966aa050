"""Export -> deploy -> runtime test on the tiny random model (real converter, real llama.cpp).

The expensive part (train 2 steps + merge + GGUF f16 + q4_k_m) runs once per module in `exported`, which does what
conftest's `tiny_trained` does (same scenes, same tiny config) at module scope so every test can share it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import write_scenes
from dndtrain.config import Config, ExportConfig, TestConfig, TrainConfig
from dndtrain.paths import Paths
from dndtrain.stages import StageError

EOT = "<|im_end|>"
EOT_ID = 2  # SmolLM2 vocabulary: 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>
QUIET = lambda *a: None  # noqa: E731


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir):
    """A project with a tiny trained adapter, exported to f16 + q4_k_m (module scope: built once)."""
    from dndtrain.export import convert
    from dndtrain.train import train

    root = tmp_path_factory.mktemp("edr") / "proj"
    write_scenes(root / "data" / "scenarios")
    paths = Paths.make(root)
    import torch

    # LoRA on the top block only, so the q4_k_m export with trained_blocks_q8 keeps that block (and only it) at q8_0
    cfg = TrainConfig(base_model=str(tiny_model_dir), max_steps=2, logging_steps=1, save_steps=1, lora_layers=1,
                      warmup_steps=0, learning_rate=1e-3, holdout_fraction=0.34, threads=1)
    torch_threads = torch.get_num_threads()
    try:
        train(cfg, paths, log=QUIET)  # 1 thread: a hidden-64 model gains nothing from more, and CI boxes are busy
    finally:
        torch.set_num_threads(torch_threads)
    lines: list[str] = []
    result = convert(ExportConfig(quant="q4_k_m", trained_blocks_q8=True), paths, log=lambda *a: lines.append(" ".join(map(str, a))))
    return paths, result, lines


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    keys = ("general.architecture", "general.file_type", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")
    out = {k: r.fields[k].contents() for k in keys if k in r.fields}
    out["n_tensors"] = len(r.tensors)
    return out


def _tensor_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


# --- convert --------------------------------------------------------------------------------------------------------

def test_convert_writes_inspected_ggufs(exported):
    paths, res, lines = exported
    assert set(res.gguf) == {"f16", "q4_k_m"}
    assert res.gguf["f16"] == paths.gguf_file("f16") and res.gguf["q4_k_m"] == paths.gguf_file("q4_k_m")
    assert res.eos_token == EOT and res.eos_token_id == EOT_ID and res.chat_template_ok
    assert res.sizes_mb["q4_k_m"] < res.sizes_mb["f16"]
    # progress: one line per step
    for step in ("merge", "convert", "quantize", "inspect"):
        assert any(step in line for line in lines), step

    # what ships: read the quantized file back with gguf-py
    f = _gguf_fields(paths.gguf_file("q4_k_m"))
    assert f["general.architecture"] == "llama"
    assert f["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert f["tokenizer.ggml.eos_token_id"] == EOT_ID
    assert EOT in f["tokenizer.chat_template"]
    assert f["tokenizer.ggml.add_bos_token"] is False  # the ChatML template writes <|im_start|> itself
    assert f["n_tensors"] == res.tensor_count > 0

    info = json.loads(paths.export_info.read_text())
    assert info["end_of_turn"] == EOT and info["quant"] == "q4_k_m"
    for kind in ("f16", "q4_k_m"):
        assert info["files"][kind]["sha256"] == _sha(paths.gguf_file(kind))
    assert info["files"]["f16"]["file_type"] == 1
    # hidden 64 is not a multiple of 256: k-quants fall back per tensor, recorded rather than failing
    assert "Q4_K" not in info["files"]["q4_k_m"]["tensor_types"]
    # the fine-tuned block 1 stays at q8_0; the untouched block 0 gets q4_k_m's types
    assert info["q8_0_blocks"] == [1]
    assert any("fine-tuned blocks 1 stay at q8_0" in line for line in lines)
    types = _tensor_types(paths.gguf_file("q4_k_m"))
    block1 = {n: t for n, t in types.items() if n.startswith("blk.1.") and not n.endswith("norm.weight")}
    assert len(block1) == 7 and set(block1.values()) == {"Q8_0"}, block1
    assert types["blk.0.attn_q.weight"] != "Q8_0" and types["blk.0.ffn_up.weight"] != "Q8_0"

    # the merged folder says <|im_end|> everywhere the converter looks
    merged = paths.merged_dir
    tok_cfg = json.loads((merged / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == EOT and tok_cfg["add_bos_token"] is False and EOT in tok_cfg["chat_template"]
    assert json.loads((merged / "config.json").read_text())["eos_token_id"] == EOT_ID
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == EOT_ID
    assert (merged / "model.safetensors").is_file() and (merged / "chat_template.jinja").is_file()
    assert not list(paths.gguf_dir.glob(".export-*")), "staging folder left behind"
    assert "q4_k_m" in res.summary() and "MB" in res.summary()


def test_convert_failure_keeps_previous_export(exported, monkeypatch, tmp_path):
    """A converter crash raises StageError with the log tail and leaves the previous export as it was.
    The input here is a plain (already merged) folder, which convert also accepts."""
    import dndtrain.export as export

    paths, _res, _ = exported
    before = {p.name: _sha(p) for p in (paths.export_info, paths.gguf_file("q4_k_m"), paths.gguf_file("f16"))}
    plain = tmp_path / "plain"
    shutil.copytree(paths.merged_dir, plain)
    fake = tmp_path / "convert_hf_to_gguf.py"
    fake.write_text("import sys\nprint('loading model')\nprint('NotImplementedError: architecture Foo')\nsys.exit(3)\n")
    monkeypatch.setattr(export, "find_converter", lambda paths, script="convert_hf_to_gguf.py": fake)
    with pytest.raises(StageError) as err:
        export.convert(ExportConfig(), paths, model_dir=plain, log=QUIET)
    assert "architecture Foo" in str(err.value) and "exit 3" in str(err.value)
    after = {p.name: _sha(p) for p in (paths.export_info, paths.gguf_file("q4_k_m"), paths.gguf_file("f16"))}
    assert after == before
    assert not list(paths.gguf_dir.glob(".export-*"))


def test_convert_without_model_says_train_first(project):
    from dndtrain.export import convert

    with pytest.raises(StageError, match="npm run train`"):
        convert(ExportConfig(), project, log=QUIET)


def test_convert_rejects_unknown_quant(project):
    from dndtrain.export import convert

    with pytest.raises(StageError, match="q4_k_m, q8_0, f16"):
        convert(ExportConfig(quant="q2_k"), project, log=QUIET)


# --- deploy ---------------------------------------------------------------------------------------------------------

def test_deploy_before_convert_says_convert_first(project):
    from dndtrain.deploy import deploy

    with pytest.raises(StageError, match="npm run train:convert"):
        deploy(Config(), project, log=QUIET)
    assert not project.deploy_dir.exists()


def test_deploy_contents_manifest_and_cactus_config(exported):
    from dndtrain.chat import DEFAULT_SYSTEM, default_tool_lines, system_prompt
    from dndtrain.deploy import deploy, verify_manifest
    from dndtrain.game import default_party
    from dndtrain.registry import ToolRegistry

    paths, _res, _ = exported
    res = deploy(Config(), paths, log=QUIET)
    d = paths.deploy_dir
    expected = {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json", "dnd_model.gguf",
                "deployment_config.json", "cactus_config.json", "integration-example.ts", "README.md", "manifest.json"}
    assert expected <= {p.name for p in d.iterdir()}
    assert _sha(d / "dnd_model.gguf") == _sha(paths.gguf_file("q4_k_m"))

    manifest = json.loads((d / "manifest.json").read_text())
    assert set(manifest["files"]) == expected - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == _sha(d / name) and entry["size_bytes"] == (d / name).stat().st_size
    assert verify_manifest(d) == []

    cactus = json.loads((d / "cactus_config.json").read_text())
    assert set(cactus) == {"model", "system_prompt", "generation_config", "tools"}
    assert cactus["model"] == {"name": "dnd_model", "type": "gguf",
                               "path": "./assets/models/custom-dnd-trained-model/dnd_model.gguf",
                               "quantization": "q4_k_m", "context_length": 2048}
    registry = ToolRegistry.load(paths.tool_registry)
    assert cactus["system_prompt"] == system_prompt(DEFAULT_SYSTEM, default_party(), default_tool_lines(registry))
    gen = cactus["generation_config"]
    assert gen == {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1, "max_tokens": 512,
                   "stop": [EOT]}
    tools = cactus["tools"]
    assert tools["enabled"] is True and tools["format"] == "[{tool_name}: {arguments}]"
    assert tools["supported"] == registry.names() and set(tools["schemas"]) == set(registry.names())
    assert [a["name"] for a in tools["schemas"]["save"]["args"]] == ["ability", "character", "DC"]

    dep = json.loads((d / "deployment_config.json").read_text())
    assert dep["quantization"] == "q4_k_m" and dep["training"]["steps"] == 2 and dep["training"]["data_hash"]
    assert dep["export"]["q8_0_blocks"] == [1]  # the fine-tuned block kept at q8_0 (test_convert_writes_inspected_ggufs)
    ts = (d / "integration-example.ts").read_text()
    assert "initLlama" in ts and ".completion(" in ts and EOT in ts and "role: 'user'" in ts
    assert "dnd_model.gguf" in res.summary() and "MB" in res.summary()
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".")], "temp folder left in assets"


def test_failed_deploy_keeps_previous_deployment(exported, monkeypatch):
    import dndtrain.deploy as deploy_mod

    paths, _res, _ = exported
    deploy_mod.deploy(Config(), paths, log=QUIET)
    d = paths.deploy_dir
    before = {p.name: _sha(p) for p in d.iterdir()}

    real_copy = deploy_mod._copy_file
    calls = []

    def flaky(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_copy(src, dst)

    monkeypatch.setattr(deploy_mod, "_copy_file", flaky)
    with pytest.raises(OSError, match="No space left"):
        deploy_mod.deploy(Config(), paths, log=QUIET)
    assert {p.name: _sha(p) for p in d.iterdir()} == before
    assert deploy_mod.verify_manifest(d) == []
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".")], "temp folder left in assets"


# --- runtime test ---------------------------------------------------------------------------------------------------

def test_runtime_loads_generates_and_reports(exported):
    from dndtrain.deploy import deploy, verify_manifest
    from dndtrain.runtime import PROMPTS, run_tests

    paths, _res, _ = exported
    deploy(Config(), paths, log=QUIET)
    res = run_tests(TestConfig(max_tokens=24, threads=1), paths, log=QUIET)
    by_name = {c["name"]: c for c in res.checks}
    # structural checks hold even for a random model
    for name in ("manifest hashes", "loads in llama.cpp", "EOS is end-of-turn", "chat template in GGUF",
                 "no duplicated BOS"):
        assert by_name[name]["passed"], by_name[name]
    # quality checks run and report (a random model fails them)
    for name in ("generates text", "stops at end-of-turn", "no role markers leak", "tool calls parse and validate"):
        assert name in by_name and isinstance(by_name[name]["passed"], bool) and by_name[name]["detail"]
    assert res.passed == all(c["passed"] for c in res.checks)
    assert len(res.samples) == len(PROMPTS)
    for s in res.samples:
        assert s["finish_reason"] in ("stop", "length") and 0 < s["completion_tokens"] <= 24
        assert isinstance(s["calls"], list) and isinstance(s["call_errors"], list)
    assert res.tokens_per_s > 0

    saved = json.loads((paths.deploy_dir / "test_results.json").read_text())
    assert saved["passed"] == res.passed and len(saved["checks"]) == len(res.checks)
    assert json.loads(paths.integration_results.read_text())["samples"][0]["name"] == PROMPTS[0][0]
    text = res.summary()
    assert "EOS is end-of-turn" in text and "tokens/s" in text and ("PASSED" in text or "FAILED" in text)

    # the manifest check catches a tampered deployment
    with open(paths.deploy_dir / "dnd_model.gguf", "ab") as f:
        f.write(b"\0")
    assert any("dnd_model.gguf" in p for p in verify_manifest(paths.deploy_dir))


def test_runtime_without_deployment_says_deploy_first(project):
    from dndtrain.runtime import run_tests

    with pytest.raises(StageError, match="npm run train:deploy"):
        run_tests(TestConfig(), project, log=QUIET)


def test_f16_gguf_matches_the_merged_model(exported):
    """llama.cpp tokenizes the rendered chat exactly like the HF tokenizer (no extra BOS) and the f16 GGUF gives
    the merged model's logits."""
    import llama_cpp
    import numpy as np
    import torch

    from dndtrain.basemodel import load_model, load_tokenizer

    paths, _res, _ = exported
    tok = load_tokenizer(paths.merged_dir)
    text = tok.apply_chat_template([{"role": "system", "content": "You are the DM."},
                                    {"role": "user", "content": "I open the door."}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        hf = load_model(paths.merged_dir)(torch.tensor([ids])).logits[0, -1].numpy()
    llm = llama_cpp.Llama(str(paths.gguf_file("f16")), n_ctx=256, n_threads=1, verbose=False, logits_all=True)
    try:
        # what llama.cpp does for an app: add BOS only if the GGUF asks for it
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
        llm.eval(ids)
        cpp = np.array(llm.scores[len(ids) - 1])
    finally:
        llm.close()
    assert np.abs(cpp - hf).max() < 0.05 * max(1.0, np.abs(hf).max())


def test_trained_blocks_reads_the_adapter_config(tmp_path):
    from dndtrain.export import _Source, block_pattern, trained_blocks

    def blocks(cfg):
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
        return trained_blocks(_Source(tmp_path, True, None, {}))

    assert blocks({"layers_to_transform": [29, 15, 16]}) == [15, 16, 29]
    assert blocks({"layers_to_transform": 3}) == [3]
    assert blocks({"layers_to_transform": None}) is None  # every block: nothing to single out
    assert blocks({}) is None and blocks({"layers_to_transform": ["x"]}) is None
    assert trained_blocks(_Source(tmp_path, False, None, {})) is None  # a merged model carries no adapter config
    import re

    pat = re.compile(block_pattern([1, 15]))
    assert pat.search("blk.15.attn_q.weight") and pat.search("blk.1.ffn_down.weight")
    assert not pat.search("blk.150.attn_q.weight") and not pat.search("blk.11.attn_q.weight")

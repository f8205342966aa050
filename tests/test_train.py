import json

import pytest
import torch

from dndtrain.basemodel import end_of_turn_token, load_tokenizer
from dndtrain.chat import build_example, default_tool_lines, dm_text, scenario_messages, system_prompt
from dndtrain.scenario import parse_file
from dndtrain.train import split_scenarios, train
from dndtrain.scenario import load_scenarios


def test_loss_mask_covers_exactly_the_dm_turns(scenes_dir, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    eot = end_of_turn_token(tok)
    assert eot == "<|im_end|>"
    s = parse_file(scenes_dir / "roleplay/tavern_rumors.md", scenes_dir)
    ex = build_example(tok, scenario_messages(s, default_tool_lines()), eot, 2048)
    trained = tok.decode([i for i, l in zip(ex.input_ids, ex.labels) if l != -100])
    dm = [dm_text(t.text) for t in s.turns if t.role == "dm"]
    assert trained == "".join(d + eot for d in dm)
    # Nothing from the system prompt, the user or the tool result is trained on.
    assert "Yawning Portal" not in trained and "Brom asks" not in trained and "removed potion" not in trained
    eot_id = tok.convert_tokens_to_ids(eot)
    assert sum(1 for l in ex.labels if l == eot_id) == len(dm)


def test_system_prompt_lists_tools_and_party(scenes_dir):
    s = parse_file(scenes_dir / "combat/goblin_ambush.md", scenes_dir)
    text = system_prompt(s.system, s.party, default_tool_lines())
    for name in ("roll", "health", "inventory", "spellcast", "check", "save"):
        assert f"[{name}:" in text
    assert "- Thordak (Dragonborn Fighter, Level 5, HP: 45/45)" in text
    assert "Role:" not in text


def test_long_scenarios_drop_early_exchanges(scenes_dir, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    s = parse_file(scenes_dir / "exploration/moonlit_ruins.md", scenes_dir)
    msgs = scenario_messages(s, default_tool_lines())
    full = build_example(tok, msgs, "<|im_end|>", 4096)
    short = build_example(tok, msgs, "<|im_end|>", len(full.input_ids) - 5)
    assert short.dropped_exchanges == 1
    assert len(short.input_ids) <= len(full.input_ids) - 5
    assert "courtyard" not in tok.decode(short.input_ids)


def test_split_is_deterministic_and_stratified(scenes_dir):
    sc = load_scenarios(scenes_dir)
    a = split_scenarios(sc, scenes_dir, 0.34, 42)
    b = split_scenarios(list(reversed(sc)), scenes_dir, 0.34, 42)
    assert [s.path for s in a[1]] == [s.path for s in b[1]]
    cats = {s.category for s in a[1]}
    assert cats == {"combat", "roleplay", "exploration"}
    assert not {s.path for s in a[0]} & {s.path for s in a[1]}


def test_train_writes_adapter_metadata_and_curve(tiny_trained):
    p = tiny_trained
    assert (p.model_dir / "adapter_model.safetensors").is_file()
    assert (p.model_dir / "adapter_config.json").is_file()
    assert (p.model_dir / "tokenizer.json").is_file()
    made = json.loads((p.model_dir / "dndtrain_config.json").read_text())
    assert made["train"]["max_steps"] == 2
    meta = json.loads(p.training_metadata.read_text())
    assert meta["steps"] == 2 and len(meta["loss_history"]) == 2
    assert meta["split"]["holdout"] and not set(meta["split"]["holdout"]) & set(meta["split"]["train"])
    for key in ("data_hash", "wall_time_s", "tokens_per_s", "peak_rss_mb", "base_model"):
        assert meta[key]
    assert p.loss_curve.is_file() and p.loss_curve.stat().st_size > 1000


def test_decision_tokens_weigh_more(scenes_dir, tiny_model_dir):
    from dndtrain.chat import DECISION_WEIGHT

    tok = load_tokenizer(tiny_model_dir)
    s = parse_file(scenes_dir / "roleplay/tavern_rumors.md", scenes_dir)
    ex = build_example(tok, scenario_messages(s, default_tool_lines()), "<|im_end|>", 2048)
    heavy = tok.decode([i for i, w in zip(ex.input_ids, ex.weights) if w == DECISION_WEIGHT])
    # Each turn's first token (the call-or-narrate choice), the call, the token after it, and every end-of-turn.
    assert heavy == 'The<|im_end|>[inventory: Brom, remove, potion of healing] She<|im_end|>"<|im_end|>'
    assert all((w == 0) == (l == -100) for w, l in zip(ex.weights, ex.labels))


def test_decision_points_and_margin_loss(tiny_model_dir):
    """The decision points are each DM turn's first token and the token after each call (call or not); the margin loss
    (which also covers tool names and first arguments) is ~0 only for a model whose greedy choice matches the
    reference at every one of them."""
    from types import SimpleNamespace

    import torch

    from dndtrain.chat import dm_text, tokenize_messages
    from dndtrain.train import call_token_ids, decision_targets, weighted_dm_loss

    tok = load_tokenizer(tiny_model_dir)
    msgs = [
        {"role": "system", "content": "You are the DM."},
        {"role": "user", "content": "I attack the goblin."},
        {"role": "assistant", "content": dm_text("You swing hard. [roll: d20+5] [roll: 1d8+3]")},
        {"role": "tool", "content": "d20+5: 1d20 (3) + 5 = *8*"},
        {"role": "assistant", "content": "You miss."},
    ]
    ex = tokenize_messages(tok, msgs, "<|im_end|>")
    opens, close = call_token_ids(tok)
    labels = torch.tensor([ex.labels])
    y = decision_targets(labels[:, 1:], opens, close)[0]
    points = [(tok.decode([t]), int(v)) for t, v in zip(labels[0, 1:].tolist(), y.tolist()) if v >= 0]
    assert points == [("[", 1), (" [", 1), (" You", 0), ("You", 0)]

    inputs = {"input_ids": torch.tensor([ex.input_ids]), "attention_mask": torch.ones(1, len(ex.input_ids)),
              "labels": labels, "loss_weights": torch.tensor([ex.weights])}

    target = labels[0, 1:]

    def fake_model(follow_reference: bool):
        """Logits of 20 on the reference token everywhere, or on the call tokens everywhere."""
        def model(input_ids, attention_mask, logits_to_keep, use_cache):
            z = torch.zeros(1, len(logits_to_keep), len(tok))
            for j, t in enumerate(logits_to_keep.tolist()):
                if follow_reference and target[t] != -100:
                    z[0, j, target[t]] = 20.0
                elif not follow_reference:
                    z[0, j, opens] = 20.0
            return SimpleNamespace(logits=z)
        return model

    def decision_part(follow_reference: bool):
        model = fake_model(follow_reference)
        decision = (opens, close, 1.0, tok.convert_tokens_to_ids(":"))
        return float(weighted_dm_loss(model, inputs, decision)[0] - weighted_dm_loss(model, inputs, None)[0])

    assert decision_part(True) < 1e-3
    assert decision_part(False) > 5.0


def test_lora_layers_picks_the_top_layers():
    from types import SimpleNamespace

    from dndtrain.train import top_layers

    assert top_layers(SimpleNamespace(num_hidden_layers=30), 15) == list(range(15, 30))
    assert top_layers(SimpleNamespace(num_hidden_layers=30), 0) is None
    assert top_layers(SimpleNamespace(num_hidden_layers=2), 5) is None  # more than the model has: all layers
    assert top_layers(SimpleNamespace(n_layer=24), 6) == list(range(18, 24))  # GPT-2 style config


def test_keep_freed_memory_tunes_glibc_and_keeps_working():
    import sys

    import torch

    from dndtrain.train import keep_freed_memory

    ok = keep_freed_memory()
    assert ok is sys.platform.startswith("linux")
    # Big tensors (over glibc's 32 MB mmap threshold) still allocate, free and compute correctly afterwards.
    for _ in range(3):
        x = torch.ones(64, 1024, 1024)
        assert float(x.sum()) == 64 * 1024 * 1024
        del x


def test_time_budget_refits_steps_and_schedule():
    import torch
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from dndtrain.train import cosine_lr_lambda, fit_steps, make_time_budget_callback

    assert fit_steps(10, 20.0, 100.0, 215) == 50  # 2 s/step, 100 s -> 50 steps
    assert fit_steps(10, 20.0, 1000.0, 215) == 215  # never more than planned
    assert fit_steps(10, 20.0, 1.0, 215) == 11  # never fewer than done + 1
    now = [0.0]
    logs = []
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lr_lambda(2, 200))
    cb = make_time_budget_callback(1.0, 2, lambda: sched, log=logs.append, clock=lambda: now[0])
    state, control = TrainerState(max_steps=200), TrainerControl()
    args = TrainingArguments(output_dir="unused", report_to=[])
    cb.on_train_begin(args, state, control)
    for step in range(1, 11):
        now[0] = step * 3.0  # 3 s/step: 20 steps fit in 60 s
        state.global_step = step
        cb.on_step_end(args, state, control)
    assert state.max_steps == 20 and logs and "20 of 200" in logs[0]
    assert sched.lr_lambdas[0](20) == 0.0 and 0 < sched.lr_lambdas[0](11) < 1


def test_no_budget_only_reports_a_slow_pace():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from dndtrain.train import make_time_budget_callback

    args = TrainingArguments(output_dir="unused", report_to=[])
    for pace, expect_notice in ((6.0, True), (1.0, False)):  # 430 steps: 43 min / 7 min
        now, logs = [0.0], []
        cb = make_time_budget_callback(0.0, 20, lambda: None, log=logs.append, clock=lambda: now[0],
                                       slow_hint=" (fp32)")
        state, control = TrainerState(max_steps=430), TrainerControl()
        cb.on_train_begin(args, state, control)
        for step in range(1, 61):
            now[0] = step * pace
            state.global_step = step
            cb.on_step_end(args, state, control)
        assert state.max_steps == 430  # no budget: the run is never shortened
        if expect_notice:
            assert len(logs) == 1 and "~43 min" in logs[0] and "(fp32)" in logs[0] and "--max-minutes" in logs[0]
        else:
            assert logs == []


def test_time_budget_stops_a_real_run_early(project, tiny_train_config):
    tiny_train_config.max_steps = 14
    tiny_train_config.max_minutes = 1e-6
    result = train(tiny_train_config, project, log=lambda *a: None)
    assert result.steps == 11  # checked at step 10, one more step allowed, then stop
    meta = json.loads(project.training_metadata.read_text())
    assert meta["steps"] == 11 and meta["config"]["max_minutes"] == 1e-6
    # the schedule was re-fitted to 11 steps: the learning rate has annealed to ~0 (not 10% of peak, as at 11/14)
    assert meta["loss_history"][-1]["learning_rate"] < 0.05 * tiny_train_config.learning_rate


@pytest.fixture(scope="module")
def tiny4_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Llama with 4 layers, so LoRA on the top 2 leaves 2 frozen layers to cache."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny4")
    cfg = LlamaConfig.from_pretrained(str(tiny_model_dir))
    cfg.num_hidden_layers = 4
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(out))
    return out


def test_frozen_layer_cache_trains_the_same_adapter(project, tiny_train_config, tiny4_model_dir):
    from safetensors.torch import load_file

    cfg = tiny_train_config
    cfg.base_model, cfg.lora_layers, cfg.max_steps, cfg.precision, cfg.save_steps = str(tiny4_model_dir), 2, 3, "fp32", 100
    runs = {}
    for cached in (True, False):
        cfg.cache_frozen_layers = "on" if cached else "off"
        logs = []
        train(cfg, project, log=logs.append)
        meta = json.loads(project.training_metadata.read_text())
        runs[cached] = ([h["loss"] for h in meta["loss_history"]], load_file(project.model_dir / "adapter_model.safetensors"),
                        logs)
    assert any("Cached the output of the 2 frozen layers" in line for line in runs[True][2])
    assert not any("Cached" in line for line in runs[False][2])
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    weights, ref = runs[True][1], runs[False][1]
    assert weights.keys() == ref.keys() and all(".layers.2." in k or ".layers.3." in k for k in weights)
    assert all(torch.allclose(weights[k], ref[k], atol=1e-5) for k in weights)
    assert any(ref[k].abs().sum() > 0 for k in ref if "lora_B" in k)  # the steps did move the adapter


def test_layer_cache_auto_mode_caches_only_runs_long_enough_to_pay_for_it():
    from dndtrain.train import CACHE_MIN_EPOCHS, TrainError, use_layer_cache

    assert not use_layer_cache("auto", 1.1)  # the default run: the fill would cost what it saves
    assert use_layer_cache("auto", CACHE_MIN_EPOCHS) and use_layer_cache("AUTO", 3.0)
    assert use_layer_cache("on", 0.1) and not use_layer_cache("off", 5.0)
    with pytest.raises(TrainError, match="cache_frozen_layers = 'yes'"):
        use_layer_cache("yes", 2.0)


def test_frozen_depth_is_the_lowest_trainable_layer(tiny4_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dndtrain import layercache

    model = AutoModelForCausalLM.from_pretrained(str(tiny4_model_dir))
    assert layercache.frozen_depth(model) == 0  # everything trainable
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1, 3]))
    assert layercache.frozen_depth(peft) == 1
    peft.base_model.model.model.embed_tokens.weight.requires_grad = True
    assert layercache.frozen_depth(peft) == 0


def test_cache_self_check_rejects_an_architecture_that_rescales_inputs(tiny4_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dndtrain import layercache

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny4_model_dir)),
                           LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[2, 3]))
    rows = [[1, 5, 9, 14, 3], [2, 7, 11]]
    fp32 = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    cache = layercache.compute_states(model, rows, 2, fp32, progress=False)
    assert [t.shape[0] for t in cache.states] == [5, 3] and cache.depth == 2
    assert layercache.matches_full_model(model, cache, rows, fp32)
    cache.states = [t * 8.0 for t in cache.states]  # what Gemma's embedding scaling would do to inputs_embeds
    assert not layercache.matches_full_model(model, cache, rows, fp32)
    assert isinstance(layercache.decoder_layers(model)[0], torch.nn.Module)
    assert type(layercache.decoder_layers(model)[0]).__name__ != "PassThrough"  # real layers restored


def test_gradient_accumulation_averages_micro_batches(project, tiny_train_config):
    """Two micro-batches of 1 log (and step on) the mean of their losses, like one batch of 2, not their sum."""
    cfg = tiny_train_config
    cfg.max_steps, cfg.learning_rate, cfg.precision, cfg.save_steps = 1, 1e-9, "fp32", 100
    first_loss = {}
    for batch, accum in ((2, 1), (1, 2)):
        cfg.batch_size, cfg.gradient_accumulation_steps = batch, accum
        train(cfg, project, log=lambda *a: None)
        first_loss[accum] = json.loads(project.training_metadata.read_text())["loss_history"][0]["loss"]
    assert first_loss[1] > 1.0  # an untrained model: both see a loss well above 0
    assert first_loss[2] == pytest.approx(first_loss[1], rel=0.25)


def test_repeat_kv_attention_matches_sdpa(tiny_model_dir):
    """The training attention (key/value heads repeated) gives SDPA's outputs and gradients, with and without a mask."""
    import torch

    from dndtrain.basemodel import load_model
    from dndtrain.train import REPEAT_KV_ATTENTION, use_repeat_kv_attention

    ref, fast = load_model(tiny_model_dir), load_model(tiny_model_dir)
    assert ref.config._attn_implementation == "sdpa" and ref.config.num_key_value_heads < ref.config.num_attention_heads
    assert use_repeat_kv_attention(fast)
    assert fast.config._attn_implementation == REPEAT_KV_ATTENTION and ref.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 1000, (2, 12))
    for mask in (None, torch.tensor([[1] * 12, [1] * 9 + [0] * 3])):
        ins = ids[:1] if mask is None else ids
        outs = []
        for model in (ref, fast):
            model.zero_grad()
            logits = model(input_ids=ins, attention_mask=mask).logits
            logits.float().pow(2).mean().backward()
            outs.append((logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
        torch.testing.assert_close(outs[0][0], outs[1][0])
        torch.testing.assert_close(outs[0][1], outs[1][1])
    assert not use_repeat_kv_attention(fast)  # already switched: a no-op


def test_frozen_linears_to_bf16_keeps_autocast_results(tiny_model_dir):
    """Frozen block weights stored in bf16 give the same autocast loss and LoRA gradients; LoRA weights, embeddings
    and norms stay fp32."""
    import torch
    from peft import LoraConfig, get_peft_model

    from dndtrain.basemodel import load_model
    from dndtrain.train import frozen_linears_to_bf16

    ids = torch.randint(0, 1000, (1, 16))
    results = []
    for convert in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                                       init_lora_weights=False))
        if convert:
            assert frozen_linears_to_bf16(model) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
            layer = model.base_model.model.model.layers[0]
            assert layer.self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
            assert layer.mlp.up_proj.weight.dtype == torch.bfloat16
            assert layer.self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
            assert layer.input_layernorm.weight.dtype == torch.float32
            assert model.base_model.model.model.embed_tokens.weight.dtype == torch.float32
            assert frozen_linears_to_bf16(model) == 0  # nothing left to convert
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grad = model.base_model.model.model.layers[1].self_attn.q_proj.lora_B["default"].weight.grad
        results.append((loss.detach(), grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_lora_plus_optimizer_puts_b_matrices_at_the_ratio(tiny_model_dir):
    """Every trainable parameter lands in exactly one group; LoRA B matrices at ratio x the rate, the rest at the rate."""
    from peft import LoraConfig, get_peft_model

    from dndtrain.basemodel import load_model
    from dndtrain.train import lora_plus_optimizer

    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.99))
    new = lora_plus_optimizer(opt, model, 8.0)
    lr_of = {id(p): g["lr"] for g in new.param_groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(len(g["params"]) for g in new.param_groups) == len(trainable) == len(lr_of)
    for name, p in trainable.items():
        assert lr_of[id(p)] == pytest.approx(8e-3 if "lora_B" in name else 1e-3), name
    assert all(g["betas"] == (0.9, 0.99) for g in new.param_groups)


@pytest.mark.parametrize("ratio", [0.0, -2.0])
def test_a_bad_lora_plus_ratio_is_a_clean_error(project, tiny_train_config, ratio):
    import dataclasses

    from dndtrain.train import TrainError

    with pytest.raises(TrainError, match="lora_plus_ratio"):
        train(dataclasses.replace(tiny_train_config, lora_plus_ratio=ratio), project, log=lambda *a: None)
    assert not project.model_dir.exists()

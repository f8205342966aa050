import json

from dndtrain.basemodel import end_of_turn_token, load_tokenizer
from dndtrain.chat import build_example, default_tool_lines, scenario_messages, system_prompt
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
    dm = [t.text for t in s.turns if t.role == "dm"]
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
    assert heavy == "<|im_end|> [inventory: Brom, remove, potion of healing]<|im_end|><|im_end|>"
    assert all((w == 0) == (l == -100) for w, l in zip(ex.weights, ex.labels))

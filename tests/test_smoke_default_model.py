"""Real-model smoke test: SmolLM2-135M-Instruct (the default base) -> 3 LoRA steps -> q4_k_m GGUF -> llama.cpp.

Slow (about a minute or two on 2 cores); deselect with `-m 'not slow'`.
"""

from __future__ import annotations

import pytest

QUIET = lambda *a: None  # noqa: E731


@pytest.mark.slow
def test_default_model_trains_exports_and_runs_in_llama_cpp(project, smollm_dir):
    import llama_cpp
    from gguf import GGUFReader

    from dndtrain.config import ExportConfig, TrainConfig
    from dndtrain.export import convert
    from dndtrain.runtime import default_threads
    from dndtrain.train import train

    import torch

    torch_threads = torch.get_num_threads()
    try:
        train(TrainConfig(base_model="default", max_steps=3, logging_steps=1, save_steps=100, warmup_steps=0,
                          max_seq_length=1024, holdout_fraction=0.34, threads=default_threads()),
              project, log=QUIET)
    finally:
        torch.set_num_threads(torch_threads)
    res = convert(ExportConfig(quant="q4_k_m"), project, log=QUIET)
    q4 = project.gguf_file("q4_k_m")
    assert res.gguf["q4_k_m"] == q4 and q4.is_file()
    assert res.sizes_mb["q4_k_m"] < 0.5 * res.sizes_mb["f16"]

    reader = GGUFReader(str(q4))
    eos = reader.fields["tokenizer.ggml.eos_token_id"].contents()
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert tokens.contents(eos) == "<|im_end|>"
    assert "<|im_end|>" in reader.fields["tokenizer.chat_template"].contents()
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.embedding_length"].contents() == 576

    llm = llama_cpp.Llama(model_path=str(q4), n_ctx=1024, n_threads=default_threads(), verbose=False, seed=0)
    try:
        assert llm.detokenize([llm.token_eos()], special=True) == b"<|im_end|>"
        out = llm.create_chat_completion(
            [{"role": "system", "content": "You are the Dungeon Master of a D&D 5e game."},
             {"role": "user", "content": "I open the door of the tavern."}],
            temperature=0.0, max_tokens=48, seed=0,
        )
    finally:
        llm.close()
    text = out["choices"][0]["message"]["content"]
    assert text.strip() and out["usage"]["completion_tokens"] > 0
    assert "<|im_start|>" not in text and "<|im_end|>" not in text

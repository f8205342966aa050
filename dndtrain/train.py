"""Stage 3: LoRA fine-tuning with TRL's SFTTrainer on the rendered scenarios (loss on DM turns only).

Output (atomic: written to a temp folder and renamed into place):
- `trained_models/dnd_model/`: adapter, tokenizer (with the chat template), `dndtrain_config.json`
- `trained_models/training_metadata.json`: base model, data hash, split, steps, loss history, wall time, tokens/s, RSS
- `trained_models/loss_curve.png`
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dndtrain import layercache
from dndtrain.config import TrainConfig
from dndtrain.paths import Paths
from dndtrain.scenario import Scenario, find_scenario_files, load_scenarios

SPLIT_FILE = "split.json"


class TrainError(RuntimeError):
    pass


@dataclass
class TrainResult:
    model_dir: Path
    steps: int
    final_loss: float | None
    wall_time_s: float
    train_time_s: float
    tokens_per_s: float
    peak_rss_mb: float
    train_files: int
    holdout_files: int
    metadata_path: Path
    loss_curve: Path | None
    loss_history: list[dict] = field(default_factory=list)
    cache_time_s: float = 0.0
    """Part of `train_time_s` spent filling the frozen-layer cache (0 when uncached)."""

    def summary(self) -> str:
        loss = f"{self.final_loss:.3f}" if self.final_loss is not None else "n/a"
        return (
            f"Trained {self.steps} steps on {self.train_files} scenario files ({self.holdout_files} held out) "
            f"in {self.wall_time_s / 60:.1f} min ({self.tokens_per_s:.0f} tokens/s, final loss {loss}, "
            f"peak RAM {self.peak_rss_mb:.0f} MB).\nModel: {self.model_dir}"
        )


# --- data -----------------------------------------------------------------------------------------------------------

def relpath(s: Scenario, root: Path) -> str:
    try:
        return Path(s.path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return Path(s.path).as_posix()


def split_scenarios(scenarios: list[Scenario], root: Path, holdout_fraction: float, seed: int):
    """Deterministic split stratified by category: within each category, files are ranked by a hash of
    (seed, relative path) and the first ceil(n * fraction) are held out (always leaving at least one file to train on)."""
    by_cat: dict[str, list[Scenario]] = {}
    for s in scenarios:
        by_cat.setdefault(s.category, []).append(s)
    train, holdout = [], []
    for cat in sorted(by_cat):
        items = sorted(by_cat[cat], key=lambda s: hashlib.sha256(f"{seed}:{relpath(s, root)}".encode()).hexdigest())
        k = min(math.ceil(len(items) * holdout_fraction), len(items) - 1) if holdout_fraction > 0 else 0
        holdout += items[:k]
        train += items[k:]
    key = lambda s: relpath(s, root)  # noqa: E731
    return sorted(train, key=key), sorted(holdout, key=key)


def data_manifest(root: Path) -> dict[str, str]:
    """sha256 of every scenario file, by relative path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in find_scenario_files(root)
    }


def manifest_hash(manifest: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def build_dataset(scenarios, tokenizer, eot: str, tool_lines: list[str], max_len: int):
    from datasets import Dataset

    from dndtrain.chat import build_example, scenario_messages

    rows = []
    for s in scenarios:
        ex = build_example(tokenizer, scenario_messages(s, tool_lines), eot, max_len)
        if any(l != -100 for l in ex.labels):
            rows.append({"input_ids": ex.input_ids, "labels": ex.labels, "loss_weights": ex.weights})
    if not rows:
        raise TrainError("no trainable DM turns in the training data")
    return Dataset.from_list(rows)


# --- hardware -------------------------------------------------------------------------------------------------------

def bf16_supported() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def use_bf16(precision: str) -> bool:
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    return bf16_supported()


CACHE_MIN_EPOCHS = 1.5
"""`cache_frozen_layers = "auto"` caches from this many planned epochs on: the fill costs about one epoch of the
frozen layers' forward passes, so the cache pays only after that (bench/train_speed.py --cache on,off)."""


def use_layer_cache(mode: str, planned_epochs: float) -> bool:
    """Whether to build the frozen-layer cache for `cache_frozen_layers = mode` and a run of `planned_epochs`."""
    mode = str(mode).lower()
    if mode not in ("auto", "on", "off"):
        raise TrainError(f"[train] cache_frozen_layers = {mode!r}: expected \"auto\", \"on\" or \"off\"")
    return mode == "on" or (mode == "auto" and planned_epochs >= CACHE_MIN_EPOCHS)


def keep_freed_memory() -> bool:
    """Stop glibc from handing big freed blocks back to the OS between training steps.

    glibc serves every allocation over 32 MB (logits, attention buffers, activations of a whole batch) with a fresh
    mmap and unmaps it on free, so each step page-faults and zeroes hundreds of MB again; measured here, that is
    ~25% of a CPU training step (367 -> 467 tokens/s, bench/train_speed.py). Keeping those blocks in the heap costs
    ~1 GB more peak RAM. Linux/glibc only; returns False (and changes nothing) elsewhere."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- output ---------------------------------------------------------------------------------------------------------

def plot_loss(history: list[dict], png: Path, title: str = "Training loss") -> Path | None:
    pts = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (DM tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished folder into place; the old one is removed only after the new one is complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    if old.exists():
        shutil.rmtree(old)


# --- training -------------------------------------------------------------------------------------------------------

class WeightedCollator:
    """Pads input_ids / labels / loss_weights of a batch to its longest example (right padding)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.states: list | None = None
        """Cached frozen-layer states by the rows' `idx` (layercache.py): when set, batches carry `inputs_embeds`."""

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        n = max(len(e["input_ids"]) for e in examples)

        def pad(key, value, dtype):
            return torch.tensor([list(e[key]) + [value] * (n - len(e[key])) for e in examples], dtype=dtype)

        batch = {
            "input_ids": pad("input_ids", self.pad_token_id, torch.long),
            "labels": pad("labels", -100, torch.long),
            "loss_weights": pad("loss_weights", 0.0, torch.float32),
            "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * (n - len(e["input_ids"]))
                                            for e in examples], dtype=torch.long),
        }
        if self.states is not None:
            embeds = torch.zeros(len(examples), n, self.states[0].shape[-1], dtype=torch.float32)
            for i, e in enumerate(examples):
                state = self.states[e["idx"]]
                if state.shape[0] < len(e["input_ids"]):
                    raise TrainError(f"frozen-layer cache row {e['idx']} is shorter than its example")
                embeds[i, : len(e["input_ids"])] = state[: len(e["input_ids"])]
            batch["inputs_embeds"] = embeds
        return batch


REPEAT_KV_ATTENTION = "sdpa_repeat_kv"
"""Name under which `use_repeat_kv_attention` registers its attention function with transformers."""


def _sdpa_repeat_kv(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, but with the key/value heads repeated instead of `enable_gqa=True`.

    With no attention mask (a batch of one unpadded example) transformers asks torch for grouped-query attention, and
    torch's CPU flash kernel then runs its backward pass about 2x slower than on repeated heads (SmolLM2 has 9 query
    and 3 key/value heads; bench/train_speed.py --attention). Everything else is unchanged."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1 and attention_mask is None and query.shape[2] > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        module = SimpleNamespace(num_key_value_groups=1, is_causal=getattr(module, "is_causal", True),
                                 layer_idx=getattr(module, "layer_idx", None))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_repeat_kv_attention(model) -> bool:
    """Switch a model that uses SDPA attention to `_sdpa_repeat_kv` (same results, faster training steps on CPU).
    Returns whether it switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(REPEAT_KV_ATTENTION, _sdpa_repeat_kv)
    AttentionMaskInterface.register(REPEAT_KV_ATTENTION, sdpa_mask)
    model.set_attn_implementation(REPEAT_KV_ATTENTION)
    return model.config._attn_implementation == REPEAT_KV_ATTENTION


DECISION_MARGIN = 1.0
"""Logit margin the decision loss asks for between a call and the best alternative token."""


def frozen_linears_to_bf16(model) -> int:
    """Store the frozen weights of the transformer blocks' linear layers in bf16; returns how many were converted.

    Under bf16 autocast every matmul casts its fp32 weight to bf16 anyway, on every forward pass; for trainable
    weights autocast caches the cast, for frozen ones it does not. Converting them once gives bit-identical losses
    and ~8% faster steps (bench/train_speed.py; 1.16 vs 1.26 s/step on a 2-core Xeon with AMX). Embeddings (tied to
    the LM head) and norms keep fp32, so the residual stream stays fp32 as before. Only for bf16 autocast runs: a
    bf16 weight outside autocast would meet fp32 inputs."""
    import torch

    n = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, torch.nn.Linear) and ".layers." in name and "lora_" not in name
                and weight is not None and not weight.requires_grad and weight.dtype == torch.float32):
            module.weight.data = weight.data.to(torch.bfloat16)
            n += 1
    return n


def top_layers(model_config, n: int) -> list[int] | None:
    """Indices of the last `n` transformer layers (None = all layers, when n is 0 or covers the whole model)."""
    total = getattr(model_config, "num_hidden_layers", None) or getattr(model_config, "n_layer", None)
    if n <= 0 or not total or n >= total:
        return None
    return list(range(total - n, total))


def call_token_ids(tokenizer) -> tuple[list[int], int | None]:
    """Token ids that open a tool call at a decision point (`[` at the start of a turn, ` [` after a call) and the
    id that closes one (`]`). Empty / None when the tokenizer does not have them as single tokens."""
    opens = []
    for text in ("[", " ["):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1:
            opens.append(ids[0])
    close = tokenizer.encode("]", add_special_tokens=False)
    return opens, (close[0] if len(close) == 1 else None)


def decision_targets(target, open_ids: list[int], close_id: int | None):
    """Per target position: 1 where a tool call starts, 0 where narration or the end of the turn starts instead, -1
    elsewhere. Decision points are the first token of each DM turn and the token after each call's `]`."""
    import torch

    labelled = target != -100
    prev = torch.full_like(target, -100)
    prev[:, 1:] = target[:, :-1]
    point = labelled & ((prev == -100) | (prev == close_id if close_id is not None else False))
    is_call = torch.zeros_like(labelled)
    for i in open_ids:
        is_call |= target == i
    return torch.where(point, is_call.long(), torch.full_like(target, -1))


def weighted_dm_loss(model, inputs: dict, decision: tuple[list[int], int | None, float] | None = None):
    """Cross-entropy on DM tokens only, weighted per token, projecting through the LM head only the positions that
    have a label (about a third of the tokens): `logits_to_keep` takes the union of those positions in the batch.

    `decision` = (call-opening ids, call-closing id, weight) adds a margin loss at every decision point: the logit of
    "a tool call starts here" against the best other token. Token cross-entropy spreads "narrate" over many possible
    first words while "call" is one token, so under greedy decoding the call wins whenever the model is unsure (a
    call at 30% beats every single first word); the margin term trains the decision greedy decoding actually makes."""
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"]
    weights = inputs["loss_weights"]
    target = labels[:, 1:]
    keep = (target != -100).any(dim=0).nonzero().flatten()  # positions t whose next token is trained
    # With the frozen-layer cache the batch carries the states entering the first adapted layer (layercache.py).
    feed = {"inputs_embeds": inputs["inputs_embeds"]} if "inputs_embeds" in inputs else {"input_ids": inputs["input_ids"]}
    out = model(**feed, attention_mask=inputs["attention_mask"], logits_to_keep=keep, use_cache=False)
    logits = out.logits.float()  # [batch, len(keep), vocab]
    tgt = target[:, keep]
    w = weights[:, 1:][:, keep] * (tgt != -100)
    ce = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="none")
    loss = (ce * w.flatten()).sum() / w.sum().clamp(min=1e-6)
    if decision and decision[0] and decision[2] > 0:
        open_ids, close_id, weight, *rest = decision
        colon_id = rest[0] if rest else None
        y = decision_targets(target, open_ids, close_id)[:, keep]
        at = y >= 0
        if at.any():
            z = logits[at]
            call = z[:, open_ids].max(dim=-1).values
            other = z.index_fill(1, torch.tensor(open_ids, device=z.device), float("-inf")).max(dim=-1).values
            # Greedy decoding picks the single most likely token: a call must beat the best other token by a margin
            # where the reference calls, and lose to it by a margin where it does not.
            gap = torch.where(y[at] == 1, other - call, call - other)
            margins = [F.softplus(gap + DECISION_MARGIN)]
            # The token after a call's `[` names the tool: the reference name must beat every other token too ...
            prev = torch.full_like(target, -100)
            prev[:, 1:] = target[:, :-1]
            opens_t = torch.tensor(open_ids, device=target.device)
            named = (target != -100) & torch.isin(prev, opens_t)
            if colon_id is not None and close_id is not None:
                # ... and so must the first token of the first argument (skill, ability, character, dice), the token
                # after the call's first `:`.
                depth = torch.cumsum(torch.isin(target, opens_t).long() - (target == close_id).long(), dim=1)
                prev_depth = torch.zeros_like(depth)
                prev_depth[:, 1:] = depth[:, :-1]
                named |= (target != -100) & (prev == colon_id) & (prev_depth > 0)
            named = named[:, keep]
            if named.any():
                zn = logits[named]
                ref = tgt[named]
                ref_logit = zn.gather(1, ref.unsqueeze(1)).squeeze(1)
                best_other = zn.scatter(1, ref.unsqueeze(1), float("-inf")).max(dim=-1).values
                margins.append(F.softplus(best_other - ref_logit + DECISION_MARGIN))
            loss = loss + weight * torch.cat(margins).mean()
    return loss, out


def lora_plus_optimizer(opt, model, ratio: float):
    """The same optimizer with every LoRA B matrix in its own group at `ratio` times the learning rate (LoRA+,
    https://arxiv.org/abs/2402.12354: B learns faster than A). Called before any step, so there is no state to move."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for g in opt.param_groups:
        for is_b in (False, True):
            params = [p for p in g["params"] if ("lora_B" in names.get(id(p), "")) == is_b]
            if params:
                groups.append({**g, "params": params, "lr": g["lr"] * (ratio if is_b else 1.0)})
    accepted = inspect.signature(type(opt)).parameters
    new = type(opt)(groups, **{k: v for k, v in opt.defaults.items() if k in accepted})
    new._lora_plus = True
    return new


def make_trainer_class():
    from trl import SFTTrainer

    class DMTrainer(SFTTrainer):
        """TRL's SFTTrainer with the decision-weighted DM loss (see `chat.DECISION_WEIGHT`) and the margin
        call/no-call decision loss (`TrainConfig.decision_loss_weight`)."""

        decision: tuple[list[int], int | None, float] | None = None
        loss_is_scaled_for_ga = False
        """`weighted_dm_loss` is a per-micro-batch mean, so the Trainer must divide it by the accumulation steps
        (otherwise, since Llama's forward takes loss kwargs, it assumes the loss was normalised by
        `num_items_in_batch` and sums the micro-batches: N times the gradient and the logged loss)."""

        lora_plus_ratio: float = 1.0
        """Learning-rate multiplier of the LoRA B matrices (`TrainConfig.lora_plus_ratio`)."""

        def create_optimizer(self, model=None):
            opt = super().create_optimizer(model)
            if self.lora_plus_ratio != 1.0 and not getattr(opt, "_lora_plus", False):
                self.optimizer = opt = lora_plus_optimizer(opt, self.model if model is None else model,
                                                           self.lora_plus_ratio)
            return opt

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = weighted_dm_loss(model, inputs, self.decision)
            return (loss, out) if return_outputs else loss

    return DMTrainer


def cosine_lr_lambda(warmup: int, total: int):
    """Linear warmup then cosine decay to 0 at `total` steps (the curve of transformers' "cosine" schedule)."""

    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def fit_steps(done: int, elapsed_s: float, budget_s: float, max_steps: int) -> int:
    """How many steps fit in `budget_s` at the pace so far (`done` steps in `elapsed_s`), at most `max_steps` and at
    least the steps already done (+1)."""
    if done <= 0 or elapsed_s <= 0:
        return max_steps
    return max(done + 1, min(max_steps, int(budget_s * done / elapsed_s)))


SLOW_RUN_MINUTES = 12.0
"""Without a time budget, a run whose pace projects more than this many minutes says so once (with the fix)."""


def make_time_budget_callback(budget_minutes: float, warmup_steps: int, get_scheduler, log=print,
                              clock=time.monotonic, slow_hint: str = ""):
    """A TrainerCallback that keeps the run within `budget_minutes`: every 10 steps after warmup it compares the pace
    with the budget and, when `max_steps` will not fit, lowers `state.max_steps` and re-fits the cosine schedule
    (`get_scheduler()` returns the trainer's learning-rate scheduler; callbacks are not handed it).
    With no budget (`budget_minutes <= 0`) it only projects the run's length at the first check and, when that is over
    SLOW_RUN_MINUTES, logs it once with `slow_hint` (why this machine is slow) and how to cap the run."""
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        def __init__(self):
            self.start = None
            self.first_step = 0
            self.planned = None
            self.projected = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.first_step, self.planned = clock(), state.global_step, state.max_steps

        def on_step_end(self, args, state, control, **kwargs):
            done = state.global_step - self.first_step
            if done < max(5, warmup_steps) or done % 10:
                return
            if budget_minutes <= 0:
                if not self.projected:
                    self.projected = True
                    pace = (clock() - self.start) / done
                    minutes = pace * (self.planned - self.first_step) / 60
                    if minutes > SLOW_RUN_MINUTES:
                        log(f"Pace {pace:.1f} s/step: the {self.planned - self.first_step} steps take ~{minutes:.0f} "
                            f"min on this machine{slow_hint}. To cap a run: `--max-minutes 10` (or `[train] "
                            f"max_minutes`) trains the steps that fit, with the schedule re-fitted, at some cost in "
                            f"quality")
                return
            total = self.first_step + fit_steps(done, clock() - self.start, budget_minutes * 60,
                                                self.planned - self.first_step)
            if total == state.max_steps:
                return
            if total < state.max_steps or state.max_steps < self.planned:
                sched = get_scheduler()
                sched = getattr(sched, "scheduler", sched)  # accelerate wraps the torch scheduler
                if sched is not None and hasattr(sched, "lr_lambdas"):
                    sched.lr_lambdas = [cosine_lr_lambda(warmup_steps, total) for _ in sched.lr_lambdas]
                    # the scheduler already stepped for the next step: re-apply the new curve at once
                    for lam, base, group in zip(sched.lr_lambdas, sched.base_lrs, sched.optimizer.param_groups):
                        group["lr"] = base * lam(sched.last_epoch)
                    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
                log(f"Time budget {budget_minutes:g} min: {total} of {self.planned} steps fit at "
                    f"{(clock() - self.start) / done:.1f} s/step")
                state.max_steps = total

    return TimeBudget()


def make_callbacks(history: list[dict], on_log=None):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                history.append({"step": state.global_step, "loss": float(logs["loss"]),
                                "learning_rate": float(logs.get("learning_rate", 0.0))})
                if on_log:
                    on_log(history)

    return [Recorder()]


def train(
    cfg: TrainConfig,
    paths: Paths,
    data_dir: Path | None = None,
    resume: bool = False,
    log=print,
    on_log=None,
    init_adapter: Path | None = None,
    scenarios: list[Scenario] | None = None,
    model_dir: Path | None = None,
    extra_metadata: dict | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter. `init_adapter` continues from an existing adapter (incremental training);
    `scenarios` overrides the training files (otherwise: all files in data_dir minus the held-out split)."""
    t0 = time.time()
    import torch

    from dndtrain.basemodel import end_of_turn_token, load_model, load_tokenizer, resolve_base_model
    from dndtrain.chat import default_tool_lines
    from dndtrain.registry import ToolRegistry

    data_dir = Path(data_dir or paths.scenarios)
    model_dir = Path(model_dir or paths.model_dir)
    all_scenarios = load_scenarios(data_dir)
    train_set, holdout = split_scenarios(all_scenarios, data_dir, cfg.holdout_fraction, cfg.seed)
    if scenarios is not None:
        train_set = scenarios
    if not train_set:
        raise TrainError(f"{data_dir}: no scenario files left for training after the hold-out split")
    if not (isinstance(cfg.lora_plus_ratio, (int, float)) and 0 < cfg.lora_plus_ratio <= 1000):
        raise TrainError(f"[train] lora_plus_ratio = {cfg.lora_plus_ratio!r}: expected a number > 0 and <= 1000 "
                         "(1 = plain LoRA)")
    registry = ToolRegistry.load(paths.tool_registry)
    tool_lines = default_tool_lines(registry)

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    base_path = resolve_base_model(cfg.base_model, log)
    tokenizer = load_tokenizer(base_path)
    eot = end_of_turn_token(tokenizer)
    dataset = build_dataset(train_set, tokenizer, eot, tool_lines, cfg.max_seq_length)
    bf16 = use_bf16(cfg.precision)
    log(f"Training on {len(dataset)} scenarios ({len(holdout)} held out), base {base_path.name}, "
        f"{'bf16 autocast' if bf16 else 'fp32'}, {cfg.max_steps} steps")

    from peft import LoraConfig, PeftModel
    from trl import SFTConfig

    model = load_model(base_path)
    use_repeat_kv_attention(model)
    targets = cfg.lora_target_modules
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none", task_type="CAUSAL_LM",
        target_modules="all-linear" if targets in (["all-linear"], "all-linear") else list(targets),
        layers_to_transform=top_layers(model.config, cfg.lora_layers),
    )
    peft_config = lora
    if init_adapter is not None:
        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        peft_config = None
    args = SFTConfig(
        output_dir=str(paths.checkpoints),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_steps,
        weight_decay=0.0,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        bf16=bf16,
        fp16=False,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[],
        max_length=cfg.max_seq_length,
        packing=False,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
        remove_unused_columns=False,
        gradient_checkpointing=False,  # TRL turns it on by default; 135M at seq 2048 fits easily, and it costs ~1/3 more compute
    )
    history: list[dict] = []
    dataset = dataset.add_column("idx", list(range(len(dataset))))
    collator = WeightedCollator(tokenizer.pad_token_id)
    trainer = make_trainer_class()(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
        data_collator=collator, callbacks=make_callbacks(history, on_log),
    )
    if bf16:
        frozen_linears_to_bf16(trainer.model)
    t_train = time.time()
    skip = contextlib.nullcontext()
    cache_time = 0.0
    planned_epochs = cfg.max_steps * cfg.batch_size * cfg.gradient_accumulation_steps / max(1, len(dataset))
    depth = layercache.frozen_depth(trainer.model) if use_layer_cache(cfg.cache_frozen_layers, planned_epochs) else 0
    if depth == 0 and cfg.cache_frozen_layers == "auto" and layercache.frozen_depth(trainer.model) > 0:
        log(f"Frozen-layer cache off: {planned_epochs:.1f} planned epochs (it saves time from {CACHE_MIN_EPOCHS})")
    if depth > 0:
        device = trainer.model.device.type
        autocast = lambda: torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
        cache = layercache.compute_states(trainer.model, dataset["input_ids"], depth, autocast)
        if cache is None:
            log("Frozen-layer cache skipped: the corpus is too big to keep in memory; training uncached")
        elif not layercache.matches_full_model(trainer.model, cache, dataset["input_ids"], autocast):
            log("Frozen-layer cache skipped: this architecture does not take the cached states as inputs_embeds "
                "unchanged; training uncached")
        else:
            collator.states = cache.states
            cache_time = cache.seconds
            skip = layercache.skip_frozen_layers(trainer.model, depth)
            log(f"Cached the output of the {depth} frozen layers ({cache.nbytes / 2**20:.0f} MiB) in "
                f"{cache.seconds:.0f} s; each step now runs only the adapted layers")
    budget = max(cfg.max_minutes - cache_time / 60, 1e-9) if cfg.max_minutes > 0 else 0.0  # cache: same clock
    slow_hint = "" if bf16 or torch.cuda.is_available() else " (fp32: this CPU has no bf16 support)"
    trainer.add_callback(make_time_budget_callback(budget, cfg.warmup_steps, lambda: trainer.lr_scheduler, log,
                                                   slow_hint=slow_hint))
    colon = tokenizer.encode(":", add_special_tokens=False)
    trainer.lora_plus_ratio = cfg.lora_plus_ratio
    trainer.decision = (*call_token_ids(tokenizer), cfg.decision_loss_weight, colon[0] if len(colon) == 1 else None)
    checkpoint = None
    if resume:
        ckpts = sorted(paths.checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        if not ckpts:
            raise TrainError(f"--resume: no checkpoint in {paths.checkpoints}; start a fresh run without --resume")
        checkpoint = str(ckpts[-1])
        log(f"Resuming from {checkpoint}")
    with skip:
        out = trainer.train(resume_from_checkpoint=checkpoint)
    train_time = time.time() - t_train
    steps = int(out.global_step)
    n_tokens = sum(len(r) for r in dataset["input_ids"])
    epochs = steps * cfg.batch_size * cfg.gradient_accumulation_steps / max(1, len(dataset))
    tokens_seen = n_tokens * epochs
    tokens_per_s = tokens_seen / train_time if train_time > 0 else 0.0

    # Save atomically: adapter + tokenizer + config into a temp folder, then rename into place.
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-", dir=model_dir.parent))
    trainer.model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    made_by = {"train": dataclasses.asdict(cfg), "base_model_path": str(base_path), "end_of_turn": eot}
    (tmp / "dndtrain_config.json").write_text(json.dumps(made_by, indent=2))
    manifest = data_manifest(data_dir)
    (tmp / SPLIT_FILE).write_text(json.dumps({
        "train": [relpath(s, data_dir) for s in train_set],
        "holdout": [relpath(s, data_dir) for s in holdout],
    }, indent=2))
    replace_dir(tmp, model_dir)

    final_loss = history[-1]["loss"] if history else None
    png = plot_loss(history, paths.loss_curve)
    metadata = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": cfg.base_model,
        "base_model_path": str(base_path),
        "model_dir": str(model_dir),
        "data_dir": str(data_dir),
        "data_hash": manifest_hash(manifest),
        "data_manifest": manifest,
        "split": {"seed": cfg.seed, "holdout_fraction": cfg.holdout_fraction,
                  "train": [relpath(s, data_dir) for s in train_set],
                  "holdout": [relpath(s, data_dir) for s in holdout]},
        "config": dataclasses.asdict(cfg),
        "precision": "bf16" if bf16 else "fp32",
        "steps": steps,
        "epochs": round(epochs, 3),
        "final_loss": final_loss,
        "loss_history": history,
        "wall_time_s": round(time.time() - t0, 1),
        "train_time_s": round(train_time, 1),
        "frozen_layer_cache_s": round(cache_time, 1),
        "tokens_per_s": round(tokens_per_s, 1),
        "train_tokens": n_tokens,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "torch_threads": torch.get_num_threads(),
        "openmp_waiting": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ},
        **(extra_metadata or {}),
    }
    write_json_atomic(paths.training_metadata, metadata)
    return TrainResult(
        model_dir=model_dir, steps=steps, final_loss=final_loss, wall_time_s=time.time() - t0,
        train_time_s=train_time, tokens_per_s=tokens_per_s, peak_rss_mb=peak_rss_mb(),
        train_files=len(train_set), holdout_files=len(holdout), metadata_path=paths.training_metadata,
        loss_curve=png, loss_history=history, cache_time_s=cache_time,
    )

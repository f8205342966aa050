"""Frozen-layer cache: compute the frozen bottom layers once per training example instead of once per step.

With LoRA only on the top N layers (`TrainConfig.lora_layers`), everything below the lowest adapted layer is frozen
and deterministic: its output for a given example is the same at every epoch. The cache runs those layers once per
example (no gradients) and keeps the hidden state that enters the first adapted layer. Training then feeds that state
as `inputs_embeds` to a model whose frozen layers are swapped for pass-throughs, so each step runs only the adapted
layers forward and backward. The result is the same computation (the hidden state is kept in fp32 unless the corpus is
too big for `CACHE_BUDGET_BYTES`, then in bf16), in about two thirds of the time per step.

Works for Hugging Face decoder models that keep their blocks in `model.model.layers` (Llama, Mistral, Qwen, SmolLM,
...); for anything else, or when the embeddings or the lowest layer are trainable, training runs uncached. Before it is
used, `matches_full_model` checks on one example that the cached path gives the full model's logits, so an
architecture that transforms `inputs_embeds` (Gemma scales them) falls back to uncached training instead of training
on wrong inputs.

Cost and gain are both one forward pass of the frozen layers: filling the cache costs one per example, and each epoch
saves one per example (measured ~1.6x more, since the training forward is batched with padding). So it pays off from
the first epoch and more with every further epoch (bench/train_speed.py --cache on,off).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

CACHE_BUDGET_BYTES = 4 * 2**30
"""Largest cache kept in memory; a bigger corpus stores bf16 states, and one too big even for that runs uncached."""

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class LayerCache:
    """Hidden states entering layer `depth`, one [seq_len, hidden] tensor per dataset row (row order)."""

    depth: int
    """Number of frozen bottom layers the states went through."""
    states: list
    """One tensor per training example."""
    seconds: float
    """Time spent computing the states."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states)


def decoder_layers(model):
    """The ModuleList of transformer blocks of a (PEFT-wrapped) causal LM, or None when it is not where Llama-style
    models keep it."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def frozen_depth(model) -> int:
    """How many bottom layers have no trainable parameter and sit above frozen embeddings (0 = nothing to cache)."""
    if decoder_layers(model) is None:
        return 0
    lowest = None
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = _LAYER_RE.search(name)
        if m is None:
            if "embed" in name:
                return 0  # trainable embeddings change the cached input itself
            continue
        lowest = int(m.group(1)) if lowest is None else min(lowest, int(m.group(1)))
    return lowest or 0


class _StopForward(Exception):
    pass


def compute_states(model, rows, depth: int, autocast, progress: bool = True) -> LayerCache | None:
    """Run each row's `input_ids` through the bottom `depth` layers (under `autocast`, the training precision) and
    keep the hidden state entering layer `depth`. Returns None when the cache would not fit CACHE_BUDGET_BYTES."""
    import time

    import torch
    from tqdm.auto import tqdm

    layers = decoder_layers(model)
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)
    total_tokens = sum(len(r) for r in rows)
    dtype = torch.float32
    if total_tokens * hidden * 4 > CACHE_BUDGET_BYTES:
        dtype = torch.bfloat16
        if total_tokens * hidden * 2 > CACHE_BUDGET_BYTES:
            return None
    captured = {}

    def grab(module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        raise _StopForward

    handle = layers[depth].register_forward_pre_hook(grab, with_kwargs=True)
    was_training = model.training
    model.eval()
    states = []
    t0 = time.time()
    try:
        with torch.no_grad(), autocast():
            for ids in tqdm(rows, desc=f"Caching frozen layers 0-{depth - 1}", unit="ex", disable=not progress,
                            leave=False):
                try:
                    model(input_ids=torch.tensor([list(ids)], device=model.device), use_cache=False)
                except _StopForward:
                    pass
                states.append(captured.pop("h")[0].to(dtype).cpu())
    finally:
        handle.remove()
        model.train(was_training)
    return LayerCache(depth=depth, states=states, seconds=time.time() - t0)


@contextmanager
def skip_frozen_layers(model, depth: int):
    """Within the block, layers 0..depth-1 are pass-throughs: the model expects `inputs_embeds` to be the cached
    states entering layer `depth`. The real layers are put back on exit, whatever happens."""
    import torch

    class PassThrough(torch.nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states

    layers = decoder_layers(model)
    saved = [layers[i] for i in range(depth)]
    try:
        for i in range(depth):
            layers[i] = PassThrough()
        yield model
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer


def matches_full_model(model, cache: LayerCache, rows, autocast, rel_tol: float = 1e-2) -> bool:
    """True when feeding the cached state of the shortest row through the model with its frozen layers skipped gives
    the same logits as the full model on that row (max difference within `rel_tol` of the logits' range)."""
    import torch

    i = min(range(len(rows)), key=lambda k: len(rows[k]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast():
            full = model(input_ids=torch.tensor([list(rows[i])], device=model.device), use_cache=False).logits.float()
            with skip_frozen_layers(model, cache.depth):
                state = cache.states[i][None].to(device=model.device, dtype=torch.float32)
                fast = model(inputs_embeds=state, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    scale = float(full.abs().max()) or 1.0
    return full.shape == fast.shape and float((full - fast).abs().max()) <= rel_tol * scale

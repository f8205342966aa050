"""Text generation backends shared by `validate` and `play`: Hugging Face (adapter or plain folder) and GGUF.

`load_generator(path)` accepts
- a LoRA adapter folder (`adapter_config.json`): the base comes from `dndtrain_config.json`'s `base_model_path`, else
  the adapter's `base_model_name_or_path`; the adapter is merged in memory (`merge_and_unload`) for speed,
- a plain or merged Hugging Face folder (`config.json` + safetensors),
- a `.gguf` file, run by llama.cpp (llama-cpp-python) with the chat template stored in the file.

Generation is greedy, so two runs give the same text, and stops at the end-of-turn token (`<|im_end|>` for ChatML),
which is not part of the returned text.

The Hugging Face backend is tuned for a 2-core CPU, where reading the prompt costs as much as writing the reply:
- `generate_and_score` groups prompts that are token prefixes of a longer sequence (every DM turn of a scenario is a
  prefix of the whole scenario) and runs the model once per group; the system prompt shared by all groups is read
  once; the reference perplexity of a conversation comes from the same forward pass;
- replies are decoded greedily `batch_size` rows at a time from left-padded copies of those caches held in
  preallocated buffers (no per-token concatenation); when half the rows have finished, the batch is refilled;
- single-token attention runs as two small grouped matmuls (`_decode_attention`), 2-3x faster than SDPA on CPU.
`tests/test_validate.py` checks that this gives exactly what `model.generate` gives.
"""

from __future__ import annotations

import functools
import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from dndtrain.stages import StageError
from dndtrain.threads import set_openmp_waiting

BATCH_SIZE = 16
KV_BUDGET = 16 * 1024
"""Most key/value positions (rows x longest prompt + new tokens) decoded together; bounds memory (~0.7 GB at 135M)."""
GGUF_CONTEXT = 4096
MIN_SHARED_PREFIX = 16


@dataclass
class GenResult:
    text: str
    """The reply, without the end-of-turn token."""
    stopped_at_eot: bool
    """True when the model ended its turn itself; False when it ran into max_new_tokens."""
    n_tokens: int
    """Tokens generated (not counting the end-of-turn token)."""


class Generator:
    """Interface: greedy chat generation from a list of `{"role", "content"}` messages."""

    kind = "?"
    path: Path
    supports_nll = False

    def generate(self, messages: list[dict], max_new_tokens: int) -> GenResult:
        return self.generate_batch([messages], max_new_tokens)[0]

    def generate_batch(self, batch: list[list[dict]], max_new_tokens: int,
                       progress: Callable[[int], None] | None = None) -> list[GenResult]:
        out = []
        for messages in batch:
            out.append(self.generate(messages, max_new_tokens))
            if progress:
                progress(1)
        return out

    def stream(self, messages: list[dict], max_new_tokens: int) -> Iterator[str]:
        yield self.generate(messages, max_new_tokens).text

    def reference_nll(self, messages: list[dict], target_text: str) -> tuple[float, int] | None:
        """Summed negative log-likelihood of `target_text` (+ end-of-turn) as the next assistant turn, and its
        token count. None when the backend cannot score text (GGUF)."""
        return None

    def conversation_nll(self, messages: list[dict]) -> list[tuple[float, int]] | None:
        """(summed NLL, tokens) of every assistant message in a conversation, from one forward pass."""
        return None

    def generate_and_score(self, batch: list[list[dict]], conversations: list[list[dict]], max_new_tokens: int,
                           progress: Callable[[int], None] | None = None):
        """`generate_batch(batch)` plus `conversation_nll` of each conversation (None entries where unsupported)."""
        return self.generate_batch(batch, max_new_tokens, progress), [self.conversation_nll(c) for c in conversations]

    def close(self) -> None:
        pass

    @property
    def name(self) -> str:
        return self.path.name


# --- Hugging Face ----------------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: cannot read ({exc})") from None
    return data if isinstance(data, dict) else {}


def is_adapter(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file()


def recorded_base(path: Path) -> Path | None:
    """The base model recorded for a model folder: `dndtrain_config.json`'s `base_model_path`, else (adapters) the
    adapter's `base_model_name_or_path`. Only existing local folders count."""
    path = Path(path)
    if path.is_file() or not path.is_dir():
        return None
    candidates = []
    made_by = path / "dndtrain_config.json"
    if made_by.is_file():
        candidates.append(_read_json(made_by).get("base_model_path"))
    if is_adapter(path):
        candidates.append(_read_json(path / "adapter_config.json").get("base_model_name_or_path"))
    for c in candidates:
        if isinstance(c, str) and c and Path(c).expanduser().is_dir():
            found = Path(c).expanduser().resolve()
            if found != path.resolve():
                return found
    return None


def adapter_base(path: Path) -> Path:
    base = recorded_base(path)
    if base is None:
        made = path / "dndtrain_config.json"
        named = _read_json(made).get("base_model_path") if made.is_file() else None
        named = named or _read_json(path / "adapter_config.json").get("base_model_name_or_path")
        raise StageError(
            f"{path}: the adapter's base model {named!r} is not a local folder (dndtrain never downloads models). "
            f"Retrain with `npm run train`, or merge the adapter and pass the merged folder with --model"
        )
    return base


@functools.lru_cache(maxsize=None)
def _buffer_layer_class():
    """A cache layer over preallocated key/value buffers (`[batch, heads, capacity, dim]`, the first `n` positions
    filled). Decoding writes each new position in place instead of concatenating the whole cache per token (which is
    half the time of a CPU decoding step at ~700 tokens of context). Defined once: a class made per call would keep
    its buffers alive in a reference cycle until the garbage collector happens to run."""
    import torch
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        def __init__(self, keys, values, length: int):
            super().__init__()
            self.kbuf, self.vbuf, self.n = keys, values, length
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self._view()

        def _view(self):
            self.keys = self.kbuf[:, :, : self.n]
            self.values = self.vbuf[:, :, : self.n]

        def update(self, key_states, value_states, *args, **kwargs):
            m = key_states.shape[-2]
            if self.n + m > self.kbuf.shape[2]:
                grow = max(m, 64)
                self.kbuf = torch.cat([self.kbuf, self.kbuf.new_zeros(self.kbuf.shape[:2] + (grow, self.kbuf.shape[3]))], 2)
                self.vbuf = torch.cat([self.vbuf, self.vbuf.new_zeros(self.vbuf.shape[:2] + (grow, self.vbuf.shape[3]))], 2)
            self.kbuf[:, :, self.n:self.n + m] = key_states
            self.vbuf[:, :, self.n:self.n + m] = value_states
            self.n += m
            self._view()
            return self.keys, self.values

        def batch_select_indices(self, indices):
            self.kbuf, self.vbuf = self.kbuf[indices], self.vbuf[indices]
            self._view()

        def crop(self, tokens_to_remove):
            raise NotImplementedError("buffered decoding caches are not croppable")

    return BufferLayer


def _buffer_layer(keys, values, length: int):
    return _buffer_layer_class()(keys, values, length)


ATTENTION_NAME = "dndtrain_decode"


def _decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention for one new token per row as two small matmuls over the key/value heads (grouped queries).

    On CPU this is 2-3x faster than SDPA's flash kernel for a single query position, which is most of a decoding step
    with a long cached prompt. Anything else (prefill, dropout, soft-capping, sinks) goes to SDPA unchanged."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    special = dropout or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None
    if query.shape[2] != 1 or special or key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    b, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(b, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)) * (scaling if scaling is not None else dim ** -0.5)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype), value)
    return out.reshape(b, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def use_decode_attention(model) -> bool:
    """Switch an SDPA model to `_decode_attention` (same masks as SDPA). False when the model cannot switch."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(ATTENTION_NAME, _decode_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, TypeError, KeyError):
        return False
    return getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest common token prefix of all sequences."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(q) for q in seqs)
    i = 0
    while i < n and all(q[i] == first[i] for q in seqs):
        i += 1
    return i


def _sliding(config) -> bool:
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True) is not False


class HFGenerator(Generator):
    supports_nll = True

    def __init__(self, model, tokenizer, path: Path, kind: str, batch_size: int = BATCH_SIZE):
        from dndtrain.basemodel import end_of_turn_token

        self.model = model.eval()
        self.tok = tokenizer
        self.path = Path(path)
        self.kind = kind
        self.batch_size = max(1, batch_size)
        self.eot = end_of_turn_token(tokenizer)
        ids = {tokenizer.convert_tokens_to_ids(self.eot), tokenizer.eos_token_id}
        self.stop_ids = {i for i in ids if isinstance(i, int) and i >= 0}
        self.shared_prefix = not _sliding(model.config)
        if self.shared_prefix:
            use_decode_attention(self.model)

    # -- helpers --
    def encode(self, messages: list[dict]) -> list[int]:
        from dndtrain.chat import generation_prompt

        return list(self.tok(generation_prompt(self.tok, messages), add_special_tokens=False)["input_ids"])

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def _result(self, ids: list[int], stopped: bool) -> GenResult:
        return GenResult(self._decode(ids), stopped, len(ids))

    # -- batched greedy generation --
    def generate_batch(self, batch, max_new_tokens, progress=None):
        return self.generate_and_score(batch, [], max_new_tokens, progress)[0]

    def generate_and_score(self, batch, conversations, max_new_tokens, progress=None):
        """Generate every prompt of `batch` and score every assistant turn of `conversations`, sharing the forward
        passes: a conversation is usually the root that the prompts of its DM turns are prefixes of."""
        import torch

        prompts = [self.encode(m) for m in batch]
        refs = [self._targets(c) for c in conversations]
        results: list[GenResult | None] = [None] * len(prompts)
        scored: list[list[tuple[float, int]] | None] = [None] * len(refs)
        with torch.inference_mode():
            if self.shared_prefix:
                self._generate_shared(prompts, refs, max_new_tokens, results, scored, progress)
            else:
                self._generate_padded(prompts, max_new_tokens, results, progress)
                scored = [self._score_alone(r) for r in refs]
        return results, scored

    @staticmethod
    def _groups(seqs: list[list[int]]) -> list[tuple[int, list[int]]]:
        """(root, members): every member's tokens are a prefix of its root's (the root is a member too). Groups come
        in the order of their first member, members sorted by length."""
        order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
        roots: list[int] = []
        members: dict[int, list[int]] = {}
        for i in order:
            p = seqs[i]
            for r in roots:
                if len(seqs[r]) >= len(p) and seqs[r][: len(p)] == p:
                    members[r].append(i)
                    break
            else:
                roots.append(i)
                members[i] = [i]
        first = {r: min(m) for r, m in members.items()}
        return [(r, sorted(members[r], key=lambda i: (len(seqs[i]), i))) for r in sorted(roots, key=first.get)]

    def _targets(self, messages: list[dict]):
        """Token ids of a conversation, the (label position, assistant turn) pairs to score, and the turn count."""
        from dndtrain.chat import assistant_spans

        text, spans = assistant_spans(self.tok, messages, self.eot)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        which = []
        for t, (start, _end) in enumerate(enc["offset_mapping"]):
            if t == 0:
                continue
            s = next((k for k, (a, b) in enumerate(spans) if a <= start < b), None)
            if s is not None:
                which.append((t, s))
        return list(enc["input_ids"]), which, len(spans)

    @staticmethod
    def _nll(logits, rows: list[int], targets: list[int], which, n_turns: int) -> list[tuple[float, int]]:
        import torch

        totals = [[0.0, 0] for _ in range(n_turns)]
        if which:
            logp = torch.log_softmax(logits[rows].float(), dim=-1)
            nll = (-logp.gather(1, torch.tensor(targets, dtype=torch.long)[:, None])[:, 0]).tolist()
            for (_, s), v in zip(which, nll):
                totals[s][0] += v
                totals[s][1] += 1
        return [(float(a), int(b)) for a, b in totals]

    def _score_alone(self, ref) -> list[tuple[float, int]]:
        import torch

        ids, which, n = ref
        if not which:
            return [(0.0, 0)] * n
        keep = [t - 1 for t, _ in which]
        out = self.model(input_ids=torch.tensor([ids]), logits_to_keep=torch.tensor(keep, dtype=torch.long))
        return self._nll(out.logits[0], list(range(len(keep))), [ids[t] for t, _ in which], which, n)

    def _generate_shared(self, prompts, refs, max_new_tokens, results, scored, progress):
        rows = self._prefilled_rows(prompts, refs, max_new_tokens, results, scored, progress)
        self._decode_many(rows, max_new_tokens, results, progress)
        for _ in rows:  # already exhausted by _decode_many; groups with only conversations to score
            pass
        for j, r in enumerate(refs):
            if scored[j] is None:
                scored[j] = [(0.0, 0)] * r[2]

    def _prefilled_rows(self, prompts, refs, max_new_tokens, results, scored, progress):
        """Yield (prompt index, prompt length, first token, root cache) for every prompt still to decode, one
        forward pass per group of prompts sharing a root; conversations in a group are scored on the way."""
        import torch
        from transformers import DynamicCache

        n_prompts = len(prompts)
        seqs = prompts + [r[0] for r in refs]
        groups = self._groups(seqs)
        # Every prompt starts with the same system instructions and tool list: read them once for all groups.
        shared = _common_prefix([seqs[r] for r, _ in groups]) if len(groups) > 1 else 0
        prefix = None
        if shared >= MIN_SHARED_PREFIX:
            out = self.model(input_ids=torch.tensor([seqs[groups[0][0]][:shared]], dtype=torch.long), use_cache=True,
                             logits_to_keep=1)
            prefix = [(kv[0], kv[1]) for kv in out.past_key_values]
        for root, members in groups:
            gen_members = [i for i in members if i < n_prompts]
            ref_members = [i - n_prompts for i in members if i >= n_prompts]
            positions = [len(prompts[i]) - 1 for i in gen_members]
            for j in ref_members:
                positions += [t - 1 for t, _ in refs[j][1]]
            keep = sorted(set(positions))
            if not keep:
                continue
            start = shared if prefix is not None and keep[0] >= shared else 0
            out = self.model(
                input_ids=torch.tensor([seqs[root][start:]], dtype=torch.long),
                past_key_values=DynamicCache(ddp_cache_data=prefix) if start else None,
                use_cache=bool(gen_members) or bool(start),
                logits_to_keep=torch.tensor([p - start for p in keep], dtype=torch.long),
            )
            logits = out.logits[0]
            row = {p: k for k, p in enumerate(keep)}
            for j in ref_members:
                ids, which, n = refs[j]
                scored[j] = self._nll(logits, [row[t - 1] for t, _ in which], [ids[t] for t, _ in which], which, n)
            if not gen_members:
                continue
            layers = [(kv[0], kv[1]) for kv in out.past_key_values]
            best = logits.argmax(-1).tolist()
            del out, logits
            for i in gen_members:
                t = best[row[len(prompts[i]) - 1]]
                if t in self.stop_ids or max_new_tokens <= 1:
                    results[i] = GenResult("", True, 0) if t in self.stop_ids else self._result([t], False)
                    if progress:
                        progress(1)
                    continue
                yield i, len(prompts[i]), t, layers

    def _decode_many(self, rows, max_new_tokens, results, progress):
        """Greedy decoding of many prompts, up to `batch_size` at a time, from left-padded copies of their roots'
        caches. When half the rows have finished, the batch is rebuilt with new prompts, so it stays full."""
        import torch
        from transformers import DynamicCache

        active: list[dict] = []  # {i, gen, fed (cached positions), start (first cached column)}
        buffers: list | None = None  # per layer: BufferLayer
        width = 0  # the buffers' common right edge
        exhausted = False
        while True:
            if not exhausted and len(active) <= self.batch_size // 2:
                new = []
                longest = max([r["fed"] for r in active], default=0)
                while len(active) + len(new) < self.batch_size:
                    nxt = next(rows, None)
                    if nxt is None:
                        exhausted = True
                        break
                    new.append(nxt)
                    longest = max(longest, nxt[1])
                    if (len(active) + len(new) + 1) * (longest + max_new_tokens) > KV_BUDGET:
                        break
                if new:
                    buffers, width = self._rebuild(active, buffers, width, new, max_new_tokens)
                    active = [{"i": r["i"], "gen": r["gen"], "fed": r["fed"]} for r in active]
                    active += [{"i": i, "gen": [t], "fed": n} for i, n, t, _ in new]
                    kv = DynamicCache()
                    kv.layers = buffers
            if not active:
                break
            mask = torch.zeros((len(active), width + 1), dtype=torch.long)
            for b, r in enumerate(active):
                mask[b, width - r["fed"]:] = 1
            x = torch.tensor([[r["gen"][-1]] for r in active], dtype=torch.long)
            pos = torch.tensor([[r["fed"]] for r in active], dtype=torch.long)
            out = self.model(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=kv,
                             use_cache=True, logits_to_keep=1)
            kv = out.past_key_values
            width += 1
            keep = []
            for b, (r, t) in enumerate(zip(active, out.logits[:, -1].argmax(-1).tolist())):
                r["fed"] += 1
                done = t in self.stop_ids
                if not done:
                    r["gen"].append(t)
                    done = len(r["gen"]) >= max_new_tokens
                if done:
                    results[r["i"]] = self._result(r["gen"], t in self.stop_ids)
                    if progress:
                        progress(1)
                else:
                    keep.append(b)
            if len(keep) < len(active):
                active = [active[b] for b in keep]
                if active:
                    kv.batch_select_indices(torch.tensor(keep, dtype=torch.long))
                buffers = kv.layers

    def _rebuild(self, active, buffers, width, new, max_new_tokens):
        """New decoding buffers holding the active rows' caches and the new rows' prompt caches, right-aligned."""
        new_width = max([r["fed"] for r in active] + [n for _, n, _, _ in new])
        rows = len(active) + len(new)
        n_layers = len(new[0][3])
        out = []
        for layer in range(n_layers):
            k0, v0 = new[0][3][layer]
            k = k0.new_zeros((rows, k0.shape[1], new_width + max_new_tokens, k0.shape[3]))
            v = v0.new_zeros((rows, v0.shape[1], new_width + max_new_tokens, v0.shape[3]))
            for b, r in enumerate(active):
                f = r["fed"]
                k[b, :, new_width - f:new_width] = buffers[layer].kbuf[b, :, width - f:width]
                v[b, :, new_width - f:new_width] = buffers[layer].vbuf[b, :, width - f:width]
            for b, (_, n, _, cache) in enumerate(new, start=len(active)):
                rk, rv = cache[layer]
                k[b, :, new_width - n:new_width] = rk[0, :, :n]
                v[b, :, new_width - n:new_width] = rv[0, :, :n]
            out.append(_buffer_layer(k, v, new_width))
        return out, new_width

    def _generate_padded(self, prompts, max_new_tokens, results, progress):
        """Fallback for models with sliding-window attention: HF `generate` on left-padded, length-sorted batches."""
        import torch

        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else min(self.stop_ids)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = max(len(prompts[i]) for i in idx)
            x = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for b, i in enumerate(idx):
                n = len(prompts[i])
                x[b, width - n:] = torch.tensor(prompts[i])
                mask[b, width - n:] = 1
            out = self.model.generate(
                input_ids=x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=sorted(self.stop_ids), pad_token_id=pad, num_beams=1,
            )
            for b, i in enumerate(idx):
                ids = out[b, width:].tolist()
                stop = next((k for k, t in enumerate(ids) if t in self.stop_ids), None)
                results[i] = self._result(ids[:stop] if stop is not None else ids, stop is not None)
            if progress:
                progress(len(idx))

    # -- streaming (play) --
    def stream(self, messages, max_new_tokens):
        import torch

        ids = self.encode(messages)
        gen: list[int] = []
        shown = ""
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            while len(gen) < max_new_tokens:
                t = int(out.logits[0, -1].argmax())
                if t in self.stop_ids:
                    break
                gen.append(t)
                text = self._decode(gen)
                if not text.endswith("\ufffd") and len(text) > len(shown) and text.startswith(shown):
                    yield text[len(shown):]
                    shown = text
                out = self.model(input_ids=torch.tensor([[t]]), past_key_values=out.past_key_values,
                                 use_cache=True, logits_to_keep=1)
        text = self._decode(gen)
        if text != shown and text.startswith(shown):
            yield text[len(shown):]

    # -- reference perplexity --
    def conversation_nll(self, messages):
        import torch

        with torch.inference_mode():
            return self._score_alone(self._targets(messages))

    def reference_nll(self, messages, target_text):
        scored = self.conversation_nll(list(messages) + [{"role": "assistant", "content": target_text}])
        return scored[-1] if scored else None

    def close(self):
        self.model = None
        gc.collect()


# --- GGUF (llama.cpp) ------------------------------------------------------------------------------------------------

class GGUFGenerator(Generator):
    kind = "gguf"

    def __init__(self, path: Path, n_ctx: int = GGUF_CONTEXT, threads: int = 0):
        try:
            import llama_cpp
        except ImportError:
            raise StageError("llama-cpp-python is not installed; run `npm run setup`") from None
        self.path = Path(path)
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=threads or os.cpu_count() or 1, seed=0, verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise StageError(f"{path}: llama.cpp cannot load this GGUF file ({exc}); re-export with `npm run train:convert`") from None

    def _args(self, max_new_tokens: int) -> dict:
        return dict(temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=0,
                    max_tokens=max(1, max_new_tokens))

    def generate(self, messages, max_new_tokens):
        try:
            resp = self.llm.create_chat_completion(messages=list(messages), **self._args(max_new_tokens))
        except ValueError:  # the prompt does not fit the context: an empty, unfinished reply
            return GenResult("", False, 0)
        choice = resp["choices"][0]
        return GenResult(choice["message"].get("content") or "", choice.get("finish_reason") == "stop",
                         int(resp.get("usage", {}).get("completion_tokens", 0)))

    def stream(self, messages, max_new_tokens):
        for chunk in self.llm.create_chat_completion(messages=list(messages), stream=True, **self._args(max_new_tokens)):
            piece = chunk["choices"][0].get("delta", {}).get("content")
            if piece:
                yield piece

    def close(self):
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None and hasattr(llm, "close"):
            llm.close()
        gc.collect()


# --- loading ---------------------------------------------------------------------------------------------------------

def model_kind(path: Path) -> str:
    """`gguf`, `adapter` or `hf`; StageError for anything else."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"model not found at {path}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf"
        raise StageError(f"{path}: not a model; expected a LoRA adapter folder, a Hugging Face model folder or a .gguf file")
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "hf"
    raise StageError(f"{path}: not a model folder (no adapter_config.json or config.json); "
                     f"expected a LoRA adapter folder, a Hugging Face model folder or a .gguf file")


def load_hf(path: Path, log=print, batch_size: int = BATCH_SIZE) -> HFGenerator:
    from dndtrain.basemodel import load_model, load_tokenizer, resolve_base_model

    path = Path(path)
    kind = model_kind(path)
    if kind == "adapter":
        base = adapter_base(path)
        resolve_base_model(str(base))  # clear error for folders without safetensors
        log(f"Loading {path.name} (LoRA adapter on {base.name}, merged in memory)...")
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(base), str(path)).merge_and_unload()
        tok_dir = path if (path / "tokenizer_config.json").is_file() else base
    elif kind == "hf":
        resolve_base_model(str(path))
        log(f"Loading {path.name}...")
        model = load_model(path)
        tok_dir = path
    else:
        raise StageError(f"{path}: a GGUF file cannot be loaded with transformers")
    return HFGenerator(model, load_tokenizer(tok_dir), path, kind, batch_size)


def load_generator(path: Path, log=print) -> Generator:
    """A generator for an adapter folder, a Hugging Face folder or a .gguf file."""
    set_openmp_waiting()
    path = Path(path)
    if model_kind(path) == "gguf":
        log(f"Loading {path.name} with llama.cpp...")
        return GGUFGenerator(path)
    return load_hf(path, log)

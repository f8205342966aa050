"""Stage 7: load the deployed GGUF in llama.cpp (llama-cpp-python) and check it behaves like a chat model.

The prompts use the system prompt the model was trained with (`chat.system_prompt`, default world and party, the
registry's tools) and are rendered by the GGUF's own chat template, exactly as an app would. Decoding is greedy
(temperature 0) with the deployed repeat penalty, so results are reproducible.

Checks: manifest hashes (deployed folder), EOS is the end-of-turn token, chat template present, no duplicated BOS,
every prompt generates text, most replies stop at end-of-turn, no role markers leak into replies, and at least one
D&D prompt produces tool calls that parse and validate. The thresholds are for a trained model; the random model of
the test suite runs the same checks (and fails the quality ones).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dndtrain.config import TestConfig
from dndtrain.paths import Paths
from dndtrain.stages import StageError, require

MIN_STOP_SHARE = 0.6
"""Share of replies that must end at the end-of-turn token (not at max_tokens)."""
MIN_PROMPTS_WITH_VALID_CALLS = 1
"""D&D action prompts whose reply must contain tool calls that parse and validate."""
ROLE_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "assistant\n", "### user", "### assistant")
RESULTS_FILE = "test_results.json"

PROMPTS: list[tuple[str, str, bool]] = [
    ("sneak", "Lyra sneaks past the sleeping guards toward the vault door.", True),
    ("trap", "Thordak steps onto a loose flagstone in the dusty corridor and hears a click.", True),
    ("fireball", "Elara casts fireball at the group of goblins by the campfire!", True),
    ("attack", "Thordak attacks the orc chieftain with his longsword.", True),
    ("small talk", "Brother Aldric asks the innkeeper how her day has been.", False),
]
"""(name, player message, expects a tool call)."""


@dataclass
class RuntimeTestResult:
    passed: bool
    checks: list[dict]
    """Each {"name", "passed", "detail"}."""
    tokens_per_s: float
    """Decode speed (generated tokens / decode time), llama.cpp's own timings."""
    samples: list[dict] = field(default_factory=list)
    model: Path | None = None
    prompt_tokens_per_s: float = 0.0
    threads: int = 0
    wall_time_s: float = 0.0
    results_paths: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        width = max([len(c["name"]) for c in self.checks] + [5])
        lines = [f"Runtime test of {self.model} ({self.threads} threads, {self.wall_time_s:.1f} s)", ""]
        lines.append(f"  {'check':<{width}}  result  detail")
        lines.append(f"  {'-' * width}  ------  {'-' * 40}")
        for c in self.checks:
            lines.append(f"  {c['name']:<{width}}  {'PASS' if c['passed'] else 'FAIL':<6}  {c['detail']}")
        lines.append("")
        if self.samples:
            lines.append("  samples (greedy):")
            for s in self.samples:
                text = " ".join(s["text"].split())
                text = text[:110] + ("..." if len(text) > 110 else "")
                lines.append(f"    [{s['name']}] ({s['finish_reason']}, {s['completion_tokens']} tok) {text}")
            lines.append("")
        lines.append(f"  decode speed: {self.tokens_per_s:.1f} tokens/s "
                     f"(prompt {self.prompt_tokens_per_s:.0f} tokens/s)")
        lines.append(f"  RESULT: {'PASSED' if self.passed else 'FAILED'} "
                     f"({sum(c['passed'] for c in self.checks)}/{len(self.checks)} checks)")
        for p in self.results_paths:
            lines.append(f"  results: {p}")
        return "\n".join(lines)


def default_threads() -> int:
    """Cores not already busy (usable cores minus the 1-minute load average), at least 1.

    ggml's worker threads spin while waiting for each other, so on an oversubscribed CPU one thread per core is
    far slower than fewer threads (measured on a loaded 2-core box: 3 tokens/s with 2 threads, 49 with 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):
        busy = 0
    return max(1, min(cores, cores - busy))


def _token_text(llm, token_id: int) -> str:
    if token_id < 0:
        return ""
    return llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")


def _check(checks: list[dict], name: str, passed: bool, detail: str) -> bool:
    checks.append({"name": name, "passed": bool(passed), "detail": detail})
    return bool(passed)


def _expected_eot(model: Path, paths: Paths, template: str | None) -> str:
    """The end-of-turn marker: from the deployed cactus_config / export info, else inferred from the template."""
    for cfg_path, getter in (
        (model.parent / "cactus_config.json", lambda d: (d.get("generation_config") or {}).get("stop", [None])[0]),
        (paths.export_info, lambda d: d.get("end_of_turn")),
    ):
        if cfg_path.is_file():
            try:
                value = getter(json.loads(cfg_path.read_text(encoding="utf-8")))
            except (OSError, ValueError, AttributeError, IndexError, TypeError):
                value = None
            if isinstance(value, str) and value:
                return value
    return "<|im_end|>" if template and "<|im_end|>" in template else ""


def _write_json_atomic(path: Path, data) -> None:
    from dndtrain.train import write_json_atomic

    write_json_atomic(path, data)


def run_tests(cfg: TestConfig, paths: Paths, model: Path | None = None, log=print) -> RuntimeTestResult:
    t0 = time.time()
    model = Path(model) if model else paths.deploy_dir / "dnd_model.gguf"
    require(model, "deployed model", "npm run train:deploy")
    if model.is_dir():
        raise StageError(f"{model} is a folder; pass the .gguf file")
    deployed = model.resolve().parent == paths.deploy_dir.resolve()
    threads = cfg.threads or default_threads()
    checks: list[dict] = []
    samples: list[dict] = []
    tps = pps = 0.0

    from dndtrain.chat import DEFAULT_SYSTEM, default_tool_lines, system_prompt
    from dndtrain.game import default_party
    from dndtrain.registry import ToolRegistry
    from dndtrain.rules import errors, validate_call
    from dndtrain.toolcalls import find_calls

    registry = ToolRegistry.load(paths.tool_registry)
    party = default_party()
    system = system_prompt(DEFAULT_SYSTEM, party, default_tool_lines(registry))

    if deployed:
        from dndtrain.deploy import verify_manifest

        log("[1/3] manifest: recomputing sha256 of the deployed files")
        problems = verify_manifest(model.parent)
        _check(checks, "manifest hashes", not problems, "; ".join(problems[:3]) or "all files match manifest.json")

    log(f"[2/3] load: {model.name} in llama.cpp (n_ctx {cfg.n_ctx}, {threads} threads)")
    import llama_cpp

    from dndtrain.deploy import GENERATION_CONFIG

    llm = None
    try:
        llm = llama_cpp.Llama(model_path=str(model), n_ctx=cfg.n_ctx, n_threads=threads, n_threads_batch=threads,
                              verbose=False, seed=0)
        _check(checks, "loads in llama.cpp", True, f"{llm.metadata.get('general.architecture', '?')}, "
               f"{model.stat().st_size / 1e6:.1f} MB, n_ctx {llm.n_ctx()}")
    except (ValueError, RuntimeError, OSError) as exc:
        _check(checks, "loads in llama.cpp", False, f"{type(exc).__name__}: {exc}")

    if llm is not None:
        try:
            template = llm.metadata.get("tokenizer.chat_template")
            eot = _expected_eot(model, paths, template)
            eos_id = llm.token_eos()
            eos_text = _token_text(llm, eos_id)
            _check(checks, "EOS is end-of-turn", bool(eot) and eos_text == eot,
                   f"EOS id {eos_id} = {eos_text!r}, expected {eot!r}")
            has_template = isinstance(template, str) and bool(template)
            marker_ok = has_template and bool(eot) and (eot in template or "eos_token" in template)
            _check(checks, "chat template in GGUF", marker_ok,
                   "missing: the app cannot format chats" if not has_template
                   else "present, contains the turn marker" if marker_ok else f"does not end turns with {eot!r}")

            # What an app does: render the chat template, then tokenize with the model's own BOS rule.
            bos_id = llm.token_bos()
            probe: list[int] = []
            if has_template:
                from llama_cpp.llama_chat_format import Jinja2ChatFormatter

                bos_text = _token_text(llm, bos_id)
                rendered = Jinja2ChatFormatter(template, eos_token=eos_text, bos_token=bos_text)(
                    messages=[{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]).prompt
                probe = llm.tokenize(rendered.encode("utf-8"), add_bos=True, special=True)
            dup = bos_id >= 0 and len(probe) >= 2 and probe[0] == bos_id and probe[1] == bos_id
            _check(checks, "no duplicated BOS", not dup,
                   f"add_bos_token={llm.metadata.get('tokenizer.ggml.add_bos_token', 'unset')}, "
                   f"prompt starts with tokens {probe[:3]}")

            if has_template:
                llm.chat_format = "chat_template.default"  # the GGUF's own template, never a guessed format
                log(f"[3/3] generate: {len(PROMPTS)} prompts, greedy, max {cfg.max_tokens} tokens")
                n_eval = 0
                t_eval = t_prompt = 0.0
                n_prompt = 0
                for name, user, wants_call in PROMPTS:
                    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
                    llama_cpp.llama_perf_context_reset(llm.ctx)
                    t = time.time()
                    out = llm.create_chat_completion(
                        messages, temperature=0.0, max_tokens=cfg.max_tokens, seed=0,
                        repeat_penalty=GENERATION_CONFIG["repeat_penalty"],
                    )
                    perf = llama_cpp.llama_perf_context(llm.ctx)
                    n_eval += perf.n_eval
                    t_eval += perf.t_eval_ms / 1000
                    n_prompt += perf.n_p_eval
                    t_prompt += perf.t_p_eval_ms / 1000
                    choice = out["choices"][0]
                    text = choice["message"].get("content") or ""
                    calls = find_calls(text)
                    call_errors = [f"{c}: {e}" for c in calls for e in errors(validate_call(c, registry, party))]
                    samples.append({
                        "name": name, "user": user, "text": text, "finish_reason": choice.get("finish_reason"),
                        "completion_tokens": out["usage"]["completion_tokens"],
                        "prompt_tokens": out["usage"]["prompt_tokens"], "seconds": round(time.time() - t, 3),
                        "expects_call": wants_call, "calls": [str(c) for c in calls], "call_errors": call_errors,
                    })
                    log(f"      {name}: {choice.get('finish_reason')}, {out['usage']['completion_tokens']} tokens, "
                        f"{len(calls)} call(s)")
                tps = n_eval / t_eval if t_eval > 0 else 0.0
                pps = n_prompt / t_prompt if t_prompt > 0 else 0.0

                empty = [s["name"] for s in samples if not s["text"].strip()]
                _check(checks, "generates text", not empty,
                       f"{len(samples) - len(empty)}/{len(samples)} non-empty"
                       + (f" (empty: {', '.join(empty)})" if empty else ""))
                stops = sum(s["finish_reason"] == "stop" for s in samples)
                share = stops / len(samples)
                _check(checks, "stops at end-of-turn", share >= MIN_STOP_SHARE,
                       f"{stops}/{len(samples)} replies ended at {eot!r} (need >= {MIN_STOP_SHARE:.0%})")
                leaks = sorted({m.strip() for s in samples for m in ROLE_MARKERS if m in s["text"]})
                _check(checks, "no role markers leak", not leaks,
                       "clean" if not leaks else f"found {', '.join(repr(m) for m in leaks)}")
                good = [s["name"] for s in samples if s["expects_call"] and s["calls"] and not s["call_errors"]]
                n_dnd = sum(s["expects_call"] for s in samples)
                bad = [e for s in samples for e in s["call_errors"]]
                _check(checks, "tool calls parse and validate", len(good) >= MIN_PROMPTS_WITH_VALID_CALLS,
                       f"{len(good)}/{n_dnd} D&D prompts with valid calls"
                       + (f" ({', '.join(good)})" if good else "") + (f"; invalid: {bad[0]}" if bad else ""))
            else:
                _check(checks, "generates text", False, "skipped: no chat template")
        finally:
            llm.close()

    passed = bool(checks) and all(c["passed"] for c in checks)
    result = RuntimeTestResult(passed=passed, checks=checks, tokens_per_s=tps, samples=samples, model=model,
                               prompt_tokens_per_s=pps, threads=threads, wall_time_s=time.time() - t0)
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": str(model), "deployed": deployed, "passed": passed, "checks": checks,
        "tokens_per_s": round(tps, 2), "prompt_tokens_per_s": round(pps, 2), "threads": threads,
        "n_ctx": cfg.n_ctx, "max_tokens": cfg.max_tokens,
        "thresholds": {"min_stop_share": MIN_STOP_SHARE, "min_prompts_with_valid_calls": MIN_PROMPTS_WITH_VALID_CALLS},
        "samples": samples, "wall_time_s": round(result.wall_time_s, 2),
    }
    targets = [paths.integration_results] + ([model.parent / RESULTS_FILE] if deployed else [])
    for p in targets:
        _write_json_atomic(p, report)
    result.results_paths = targets
    return result

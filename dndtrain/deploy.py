"""Stage 6: copy the exported model into the app's assets folder (`assets/models/custom-dnd-trained-model/`).

The folder is assembled in a temp folder next to the target, every file's sha256 is recomputed and compared with
`manifest.json` (and the GGUF with the hash the export recorded), and only then is it swapped in. The previous
deployment stays in place until the new one is complete, so a failure never leaves a half-written folder.

Contents: the merged model (model.safetensors, config.json, tokenizer.json, tokenizer_config.json), `dnd_model.gguf`
(the configured quant), `deployment_config.json`, `cactus_config.json` (model path, the trained system prompt,
generation settings and tool schemas), `integration-example.ts`, `README.md` and `manifest.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dndtrain.config import Config
from dndtrain.paths import DEPLOY_NAME, Paths
from dndtrain.stages import StageError, read_json_object, require

GGUF_NAME = "dnd_model.gguf"
MODEL_NAME = "dnd_model"
MANIFEST = "manifest.json"
MERGED_FILES = ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json")
GENERATION_CONFIG = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1, "max_tokens": 512}
"""Sampling settings written to cactus_config.json (the runtime test decodes greedily with the same repeat penalty)."""
TOOL_FORMAT = "[{tool_name}: {arguments}]"
DEFAULT_CONTEXT = 2048


@dataclass
class DeployResult:
    deploy_dir: Path
    files: dict[str, int]
    """File name -> size in bytes (manifest.json included)."""
    quant: str
    wall_time_s: float
    manifest: Path
    replaced_previous: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def total_mb(self) -> float:
        return sum(self.files.values()) / 1e6

    def summary(self) -> str:
        verb = "Replaced the deployment in" if self.replaced_previous else "Deployed to"
        lines = [f"{verb} {self.deploy_dir} ({len(self.files)} files, {self.total_mb:.1f} MB, "
                 f"{self.quant} GGUF, hashes verified, {self.wall_time_s:.1f} s):"]
        width = max(len(n) for n in self.files)
        for name, size in self.files.items():
            lines.append(f"  {name:<{width}}  {_human(size):>9}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _human(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.1f} KB"
    return f"{n} B"


def _copy_file(src: Path, dst: Path) -> None:
    """One file copy (a separate function so tests can make it fail midway)."""
    shutil.copyfile(src, dst)



def _scalars(data, depth: int = 2, prefix: str = "") -> dict:
    """Numbers, strings and booleans from a nested dict (lists skipped), for a compact metadata summary."""
    out: dict = {}
    if not isinstance(data, dict):
        return out
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, (int, float, str, bool)) and not (isinstance(value, str) and len(value) > 200):
            out[name] = value
        elif isinstance(value, dict) and depth > 1:
            out.update(_scalars(value, depth - 1, f"{name}."))
        if len(out) >= 60:
            break
    return out


def deploy_system_prompt(paths: Paths) -> str:
    """The system prompt the model was trained with, for the default world and party (`chat.system_prompt`)."""
    from dndtrain.chat import DEFAULT_SYSTEM, default_tool_lines, system_prompt
    from dndtrain.game import default_party
    from dndtrain.registry import ToolRegistry

    return system_prompt(DEFAULT_SYSTEM, default_party(), default_tool_lines(ToolRegistry.load(paths.tool_registry)))


def cactus_config(paths: Paths, quant: str, context_length: int, end_of_turn: str) -> dict:
    from dndtrain.registry import ToolRegistry

    registry = ToolRegistry.load(paths.tool_registry)
    schemas = {}
    for tool in registry:
        d = tool.to_dict()
        schemas[tool.name] = {"description": d["description"], "syntax": tool.syntax(), "args": d["args"],
                              "examples": d["examples"], "builtin": d["builtin"]}
    return {
        "model": {
            "name": MODEL_NAME,
            "type": "gguf",
            "path": f"./assets/models/{DEPLOY_NAME}/{GGUF_NAME}",
            "quantization": quant,
            "context_length": context_length,
        },
        "system_prompt": deploy_system_prompt(paths),
        "generation_config": {**GENERATION_CONFIG, "stop": [end_of_turn]},
        "tools": {
            "enabled": True,
            "format": TOOL_FORMAT,
            "supported": registry.names(),
            "schemas": schemas,
        },
    }


def deployment_config(cfg: Config, paths: Paths, info: dict, quant: str, context_length: int,
                      files: list[str]) -> dict:
    from dndtrain import __version__

    now = datetime.now(timezone.utc)
    training = None
    if paths.training_metadata.is_file():
        try:
            meta = json.loads(paths.training_metadata.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
        if isinstance(meta, dict):
            split = meta.get("split") if isinstance(meta.get("split"), dict) else {}
            training = {
                "created": meta.get("created"), "base_model": meta.get("base_model"), "steps": meta.get("steps"),
                "epochs": meta.get("epochs"), "final_loss": meta.get("final_loss"),
                "data_hash": meta.get("data_hash"), "precision": meta.get("precision"),
                "train_files": len(split.get("train") or []), "holdout_files": len(split.get("holdout") or []),
                "wall_time_s": meta.get("wall_time_s"),
                "learning_rate": (meta.get("config") or {}).get("learning_rate"),
                "lora_r": (meta.get("config") or {}).get("lora_r"),
            }
    validation = None
    if paths.validation_results.is_file():
        try:
            validation = _scalars(json.loads(paths.validation_results.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            validation = {"error": f"unreadable {paths.validation_results.name}"}
    base_path = info.get("base_model_path")
    return {
        "model_name": MODEL_NAME,
        "version": f"{now:%Y.%m.%d-%H%M%S}",
        "created": now.isoformat(timespec="seconds"),
        "dndtrain_version": __version__,
        "files": files,
        "gguf": GGUF_NAME,
        "quantization": quant,
        "context_length": context_length,
        "end_of_turn": info.get("end_of_turn"),
        "architecture": info.get("architecture"),
        "base_model": info.get("base_model") or (Path(base_path).name if base_path else None),
        "base_model_path": base_path,
        "export": {"created": info.get("created"), "source": info.get("source"),
                   "q8_0_blocks": info.get("q8_0_blocks") or [],
                   "sizes_mb": {k: v.get("size_mb") for k, v in (info.get("files") or {}).items()}},
        "training": training,
        "validation": validation,
    }


def _readme(quant: str, gguf_mb: float, context_length: int, tools: list[str], end_of_turn: str) -> str:
    return f"""# Custom D&D Dungeon Master model

Generated by `dndtrain deploy` (`npm run train:deploy`). Do not edit these files by hand: re-run the pipeline
(`npm run train` -> `npm run train:convert` -> `npm run train:deploy` -> `npm run train:test`).

## Files

| file | what it is |
|---|---|
| `dnd_model.gguf` | the model for llama.cpp-family runtimes (llama.rn, Cactus): {quant}, {gguf_mb:.1f} MB |
| `cactus_config.json` | model path, the system prompt the model was trained with, sampling settings, tool schemas |
| `integration-example.ts` | React Native / Expo example: load the model, chat, parse and answer tool calls |
| `deployment_config.json` | version, base model, training and validation summary |
| `model.safetensors`, `config.json`, `tokenizer*.json` | the merged Hugging Face model (for server-side use or re-export; not needed by the app) |
| `manifest.json` | sha256 and size of every file (checked by `npm run train:test`) |
| `test_results.json` | written by `npm run train:test` |

## Using it in the app

1. Ship `dnd_model.gguf` with the app (in Expo add `gguf` to `resolver.assetExts` in `metro.config.js`) or download it
   on first launch; the model needs roughly {gguf_mb * 1.5:.0f} MB of RAM plus the KV cache for {context_length} tokens.
2. Load it with `initLlama({{ model, n_ctx: {context_length} }})` (llama.rn) and call `context.completion({{ messages,
   n_predict, stop: ["{end_of_turn}"] }})`. The GGUF carries its chat template; pass messages, not a hand-built prompt.
3. Use `cactus_config.json`'s `system_prompt` as the system message. It lists the tools and the party; to use your
   own party, replace the lines after `Party:` with one line per character in the same format
   (`- Name (Race Class, Level N, HP: cur/max, Skill +N, Inventory: a; b)`). Keep everything else verbatim: the
   model was trained on exactly this prompt.
4. The model starts a turn that needs the game with its tool calls, then narrates: `[name: arg1, arg2] The goblin...`. Supported: {", ".join(tools)}.
   Parse them with the regex in `integration-example.ts`, execute them in your game logic (dice, HP, inventory...),
   and send the results back as the next message with role `tool` (one result line per call, in order), then let the
   model continue. The model was trained on exactly that turn (`<|im_start|>tool ... <|im_end|>`); llama.rn renders it
   with the GGUF's chat template. If your runtime's message type has no `tool` role (Cactus v1), build that turn in
   the prompt text yourself rather than sending the results as `user`.
5. Stop generation at `{end_of_turn}` (the GGUF's EOS). If replies run on or contain `<|im_start|>`, the app is not
   using the model's chat template or stop token.
"""


def _integration_example(end_of_turn: str) -> str:
    return """// Integration example: the custom D&D Dungeon Master model in a React Native / Expo app with llama.rn.
// Generated by `dndtrain deploy`. Runtime: llama.rn (npm i llama.rn); Cactus and other llama.cpp-family runtimes
// take the same GGUF, messages and stop tokens.
//
// Expo: add 'gguf' to resolver.assetExts in metro.config.js so the model can be bundled with require().

import { initLlama, LlamaContext } from 'llama.rn';
import { Asset } from 'expo-asset';
import cactusConfig from './cactus_config.json';

export type ChatMessage = { role: 'system' | 'user' | 'assistant' | 'tool'; content: string };
export type ToolCall = { name: string; args: string[]; raw: string };
export type ToolExecutor = (call: ToolCall) => Promise<string>;

// Same grammar as dndtrain's toolcalls.CALL_RE: [name: arg1, arg2, ...] on one line, at most 200 characters.
const TOOL_CALL_RE = /\\[\\s*([A-Za-z_][A-Za-z0-9_]*)\\s*:\\s*([^\\[\\]\\n]{0,200}?)\\s*\\]/g;
const SUPPORTED_TOOLS = new Set<string>(cactusConfig.tools.supported);
const STOP = cactusConfig.generation_config.stop; // ["__EOT__"]
// Role markers that must never be shown to the player (they mean the chat template or stop token is not applied).
const ROLE_MARKERS = ['<|im_start|>', '<|im_end|>', '<|endoftext|>'];

let context: LlamaContext | null = null;

export async function loadModel(): Promise<LlamaContext> {
  if (context) return context;
  const [asset] = await Asset.loadAsync(require('./dnd_model.gguf'));
  const model = asset.localUri ?? asset.uri;
  context = await initLlama({
    model, // llama.rn accepts a file:// URI or a plain path
    n_ctx: cactusConfig.model.context_length,
    n_gpu_layers: 0, // 135M parameters run fast enough on the CPU
    use_mlock: false,
  });
  return context;
}

export function parseToolCalls(text: string): ToolCall[] {
  const calls: ToolCall[] = [];
  for (const m of text.matchAll(TOOL_CALL_RE)) {
    const name = m[1].toLowerCase();
    if (!SUPPORTED_TOOLS.has(name)) continue;
    const args = m[2].trim() ? m[2].split(',').map((a) => a.trim()) : [];
    calls.push({ name, args, raw: m[0] });
  }
  return calls;
}

export function stripToolCalls(text: string): string {
  return text.replace(TOOL_CALL_RE, '').replace(/\\s{2,}/g, ' ').trim();
}

function clean(text: string): string {
  let out = text;
  for (const marker of ROLE_MARKERS) out = out.split(marker)[0];
  return out.trim();
}

async function complete(messages: ChatMessage[]): Promise<string> {
  const ctx = await loadModel();
  const g = cactusConfig.generation_config;
  const result = await ctx.completion({
    messages, // formatted with the chat template stored in the GGUF
    n_predict: g.max_tokens,
    temperature: g.temperature,
    top_p: g.top_p,
    top_k: g.top_k,
    penalty_repeat: g.repeat_penalty,
    stop: STOP,
  });
  return clean(result.text);
}

export function newConversation(systemPrompt: string = cactusConfig.system_prompt): ChatMessage[] {
  return [{ role: 'system', content: systemPrompt }];
}

/**
 * One player turn: ask the DM, execute any tool calls, feed the results back and let the DM continue
 * (at most `maxToolRounds` rounds). Returns the DM's narration for display; `history` is updated in place.
 */
export async function playerTurn(
  history: ChatMessage[],
  playerText: string,
  executeTool: ToolExecutor,
  maxToolRounds = 3,
): Promise<{ narration: string[]; calls: ToolCall[] }> {
  history.push({ role: 'user', content: playerText });
  const narration: string[] = [];
  const allCalls: ToolCall[] = [];
  for (let round = 0; round <= maxToolRounds; round++) {
    const reply = await complete(history);
    history.push({ role: 'assistant', content: reply });
    const text = stripToolCalls(reply);
    if (text) narration.push(text);
    const calls = parseToolCalls(reply);
    if (calls.length === 0 || round === maxToolRounds) break;
    allCalls.push(...calls);
    const results: string[] = [];
    for (const call of calls) {
      try {
        results.push(await executeTool(call));
      } catch (e) {
        results.push(`${call.raw}: error: ${(e as Error).message}`);
      }
    }
    // The model was trained with tool results in a `tool` turn (<|im_start|>tool ... <|im_end|>), one line per call.
    history.push({ role: 'tool', content: results.join('\\n') });
  }
  return { narration, calls: allCalls };
}

// Example executor for [roll: d20+5]; wire health/inventory/spellcast/check/save to your game state.
export async function exampleExecutor(call: ToolCall): Promise<string> {
  if (call.name === 'roll') {
    const m = /^(\\d*)d(\\d+)([+-]\\d+)?$/.exec(call.args[0] ?? '');
    if (!m) return `${call.args[0]}: not a dice expression`;
    const n = Number(m[1] || 1), sides = Number(m[2]), mod = Number(m[3] || 0);
    const rolls = Array.from({ length: n }, () => 1 + Math.floor(Math.random() * sides));
    const total = rolls.reduce((a, b) => a + b, 0) + mod;
    return `${call.args[0]}: ${n}d${sides} (${rolls.join(', ')})${mod ? (mod > 0 ? ' + ' : ' - ') + Math.abs(mod) : ''} = *${total}*`;
  }
  return `${call.raw}: ok`;
}

export async function releaseModel(): Promise<void> {
  await context?.release();
  context = null;
}
""".replace("__EOT__", end_of_turn)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def verify_manifest(folder: Path) -> list[str]:
    """Problems found when recomputing every hash in folder/manifest.json (empty list = intact)."""
    from dndtrain.export import sha256_file

    path = folder / MANIFEST
    if not path.is_file():
        return [f"{MANIFEST} is missing"]
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return [f"{MANIFEST} is unreadable"]
    problems = []
    for name, entry in files.items():
        p = folder / name
        if Path(name).name != name or not p.is_file():
            problems.append(f"{name}: missing")
            continue
        if p.stat().st_size != entry.get("size_bytes"):
            problems.append(f"{name}: size {p.stat().st_size} != {entry.get('size_bytes')}")
        elif sha256_file(p) != entry.get("sha256"):
            problems.append(f"{name}: sha256 mismatch")
    return problems


def deploy(cfg: Config, paths: Paths, log=print) -> DeployResult:
    t0 = time.time()
    from dndtrain.export import sha256_file
    from dndtrain.train import replace_dir

    require(paths.export_info, "exported model", "npm run train:convert")
    info = read_json_object(paths.export_info, "run `npm run train:convert` again")
    quant = (cfg.export.quant or "").lower()
    files_info = info.get("files") or {}
    gguf_src = paths.gguf_file(quant)
    if quant not in files_info or not gguf_src.is_file():
        raise StageError(f"no {quant} GGUF in {paths.gguf_dir} (the last export made "
                         f"{', '.join(files_info) or 'nothing'}). "
                         f"Run `npm run train:convert -- --quant {quant}` first.")
    for name in MERGED_FILES:
        require(paths.merged_dir / name, f"merged model file {name}", "npm run train:convert")
    eot = info.get("end_of_turn") or "<|im_end|>"
    model_ctx = info.get("context_length") or DEFAULT_CONTEXT
    context_length = int(min(cfg.test.n_ctx or DEFAULT_CONTEXT, model_ctx))

    target = paths.deploy_dir
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    notes: list[str] = []
    try:
        log(f"[1/3] copy: merged model + {quant} GGUF -> {tmp.name}")
        sources = {name: paths.merged_dir / name for name in MERGED_FILES}
        sources[GGUF_NAME] = gguf_src
        expected = {name: {"sha256": sha256_file(src), "size_bytes": src.stat().st_size}
                    for name, src in sources.items()}
        recorded = files_info[quant].get("sha256")
        if recorded and expected[GGUF_NAME]["sha256"] != recorded:
            raise StageError(f"{gguf_src} changed since it was exported "
                             f"(sha256 differs from {paths.export_info.name}). "
                             f"Run `npm run train:convert` again.")
        for name, src in sources.items():
            _copy_file(src, tmp / name)
            log(f"      {name} ({_human(expected[name]['size_bytes'])})")

        log("[2/3] write: cactus_config.json, deployment_config.json, integration-example.ts, README.md")
        cactus = cactus_config(paths, quant, context_length, eot)
        _write_json(tmp / "cactus_config.json", cactus)
        _write_text(tmp / "integration-example.ts", _integration_example(eot))
        _write_text(tmp / "README.md", _readme(quant, expected[GGUF_NAME]["size_bytes"] / 1e6, context_length,
                                                cactus["tools"]["supported"], eot))
        listed = sorted(list(sources) + ["cactus_config.json", "deployment_config.json", "integration-example.ts",
                                         "README.md", MANIFEST])
        _write_json(tmp / "deployment_config.json",
                    deployment_config(cfg, paths, info, quant, context_length, listed))
        for name in ("cactus_config.json", "deployment_config.json", "integration-example.ts", "README.md"):
            p = tmp / name
            expected[name] = {"sha256": sha256_file(p), "size_bytes": p.stat().st_size}
        manifest = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": MODEL_NAME,
            "quantization": quant,
            "files": dict(sorted(expected.items())),
        }
        _write_json(tmp / MANIFEST, manifest)

        log("[3/3] verify: recompute sha256 of every file against manifest.json, then swap in")
        problems = verify_manifest(tmp)
        if problems:
            raise StageError("deployment copy is corrupt: " + "; ".join(problems))
        with open(tmp / GGUF_NAME, "rb") as f:
            if f.read(4) != b"GGUF":
                raise StageError(f"{GGUF_NAME} is not a GGUF file")
        if not paths.validation_results.is_file():
            notes.append("no validation results yet (run `npm run train:validate` to include scores)")
        replaced = target.exists()
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    files = {name: (target / name).stat().st_size for name in sorted(os.listdir(target))}
    return DeployResult(deploy_dir=target, files=files, quant=quant, wall_time_s=time.time() - t0,
                        manifest=target / MANIFEST, replaced_previous=replaced, notes=notes)

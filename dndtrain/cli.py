"""The `dndtrain` command line: a thin layer over the stage functions.

Every command returns an exit status; known failures print `error: ...` (with file and line where there is one)
and return 1, never a traceback. `main(argv) -> int` is the entry point (`python -m dndtrain`, `dndtrain`).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from dndtrain import __version__
from dndtrain.threads import set_openmp_waiting


def _common(p: argparse.ArgumentParser, model: bool = False) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML or YAML config file (see `dndtrain config`)")
    p.add_argument("--root", metavar="DIR", default=".", help="project root holding data/ (default: current folder)")
    p.add_argument("--output", metavar="DIR", help="output folder (default: <root>/trained_models)")
    p.add_argument("--assets-dir", metavar="DIR", help="app assets folder (default: <root>/assets/models)")
    if model:
        p.add_argument("--model", metavar="PATH", help="model to use instead of the default artifact of the previous step")


def _paths(args):
    from dndtrain.paths import Paths

    return Paths.make(args.root, args.output, getattr(args, "assets_dir", None))


def _config(args):
    from dndtrain.config import load_config

    cfg = load_config(args.config)
    t = cfg.train
    for name in ("base_model", "max_steps", "max_minutes"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(t, name, value)
    return cfg


def _log(*a):
    print(*a, flush=True)


# --- commands -------------------------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from dndtrain.train import train

    cfg = _config(args)
    paths = _paths(args)
    res = train(cfg.train, paths, data_dir=Path(args.data) if args.data else None, resume=args.resume, log=_log)
    from dndtrain.versions import record_version

    version = record_version(paths, kind="full", data_dir=Path(args.data) if args.data else None, log=_log)
    print()
    print(res.summary())
    print(f"Version: {version.name} ({paths.versions / version.name})")
    print("Next: npm run train:validate  (dndtrain validate)")
    return 0


def cmd_validate(args) -> int:
    from dndtrain.validate import validate

    cfg = _config(args)
    if args.limit is not None:
        cfg.validate.limit = args.limit
    if args.no_base:
        cfg.validate.compare_base = False
    paths = _paths(args)
    res = validate(cfg.validate, paths, model=Path(args.model) if args.model else None,
                   scenarios_dir=Path(args.scenarios) if args.scenarios else None, log=_log)
    if not args.model and not args.scenarios and paths.model_dir.is_dir():
        from dndtrain.versions import attach_validation

        attach_validation(paths, log=_log)
    print()
    print(res.summary())
    failures = res.threshold_failures(min_f1=args.min_f1, min_format=args.min_format, min_no_call=args.min_no_call)
    for f in failures:
        print(f"FAILED threshold: {f}", file=sys.stderr)
    return 1 if failures else 0


def cmd_convert(args) -> int:
    from dndtrain.export import convert

    cfg = _config(args)
    if args.quant:
        cfg.export.quant = args.quant
    if args.lora_gguf:
        cfg.export.lora_gguf = True
    if args.trained_blocks_q8 is not None:
        cfg.export.trained_blocks_q8 = args.trained_blocks_q8
    res = convert(cfg.export, _paths(args), model_dir=Path(args.model) if args.model else None, log=_log)
    print()
    print(res.summary())
    print("Next: npm run train:deploy  (dndtrain deploy)")
    return 0


def cmd_deploy(args) -> int:
    from dndtrain.deploy import deploy

    cfg = _config(args)
    res = deploy(cfg, _paths(args), log=_log)
    print()
    print(res.summary())
    print("Next: npm run train:test  (dndtrain test)")
    return 0


def cmd_test(args) -> int:
    from dndtrain.runtime import run_tests

    cfg = _config(args)
    res = run_tests(cfg.test, _paths(args), model=Path(args.model) if args.model else None, log=_log)
    print()
    print(res.summary())
    return 0 if res.passed else 1


def cmd_test_all(args) -> int:
    rc_validate = cmd_validate(args)
    rc_test = cmd_test(args)
    print(f"\ntest-all: validate {'ok' if rc_validate == 0 else 'FAILED'}, runtime test {'ok' if rc_test == 0 else 'FAILED'}")
    return 0 if rc_validate == 0 and rc_test == 0 else 1


def cmd_play(args) -> int:
    from dndtrain.play import play

    cfg = _config(args)
    return play(cfg, _paths(args), model=Path(args.model) if args.model else None,
                scenario=Path(args.scenario) if args.scenario else None,
                script=Path(args.script) if args.script else None, seed=args.seed,
                max_tokens=args.max_tokens)


def cmd_doctor(args) -> int:
    from dndtrain.doctor import doctor

    return doctor(_paths(args), log=_log)


def cmd_config(args) -> int:
    from dndtrain.config import reference_markdown

    print(reference_markdown())
    return 0


def cmd_incremental(args) -> int:
    from dndtrain import incremental

    return incremental.run_command(args, _config(args), _paths(args), log=_log)


# --- parser ---------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dndtrain",
        description="Turn D&D scenario markdown into a small fine-tuned Dungeon Master model for your app.",
    )
    parser.add_argument("--version", action="version", version=f"dndtrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="LoRA fine-tune the base model on data/scenarios")
    _common(p)
    p.add_argument("--data", metavar="DIR", help="scenario folder (default: <root>/data/scenarios)")
    p.add_argument("--base-model", metavar="default|PATH", help="base model: `default` or a local HF folder")
    p.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (overrides the config)")
    p.add_argument("--max-minutes", type=float, metavar="M",
                   help="fit the run into M minutes of training: fewer steps on a slower CPU (overrides the config)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.set_defaults(func=cmd_train)

    def add_validate_args(p):
        p.add_argument("--scenarios", metavar="DIR", help="score these scenario files instead of the held-out split")
        p.add_argument("--limit", type=int, metavar="N", help="score at most N DM turns (quick run)")
        p.add_argument("--no-base", action="store_true", help="skip scoring the untrained base model")
        p.add_argument("--min-f1", type=float, metavar="X", help="exit 1 if tool-name micro-F1 < X")
        p.add_argument("--min-format", type=float, metavar="X", help="exit 1 if format validity < X")
        p.add_argument("--min-no-call", type=float, metavar="X", help="exit 1 if no-call accuracy < X")

    p = sub.add_parser("validate", help="score tool calls on held-out scenario turns (trained vs base)")
    _common(p, model=True)
    add_validate_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("convert", help="merge LoRA and export GGUF (f16 + q4_k_m)")
    _common(p, model=True)
    p.add_argument("--quant", choices=["q4_k_m", "q8_0", "f16"], help="GGUF type shipped to the app")
    p.add_argument("--lora-gguf", action="store_true", help="also export the adapter as a GGUF")
    blocks = p.add_mutually_exclusive_group()
    blocks.add_argument("--trained-blocks-q8", dest="trained_blocks_q8", action="store_true", default=None,
                        help="keep the fine-tuned blocks at q8_0: 125 instead of 105 MB, closer to the trained model "
                             "(see [export] trained_blocks_q8)")
    blocks.add_argument("--no-trained-blocks-q8", dest="trained_blocks_q8", action="store_false",
                        help="plain q4_k_m (the default unless a config file turns trained_blocks_q8 on)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("deploy", help="copy the exported model and configs into the app's assets folder")
    _common(p)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("test", help="load the deployed GGUF in llama.cpp and run checks")
    _common(p, model=True)
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("test-all", help="validate + test; exit 1 if anything fails")
    _common(p, model=True)
    add_validate_args(p)
    p.set_defaults(func=cmd_test_all)

    p = sub.add_parser("play", help="play a scene with the model as Dungeon Master (real tool execution)")
    _common(p, model=True)
    p.add_argument("--scenario", metavar="FILE", help="take the party and setting from this scenario's SYSTEM")
    p.add_argument("--script", metavar="FILE", help="non-interactive: one player line per line of FILE")
    p.add_argument("--seed", type=int, default=None, help="dice seed (reproducible play)")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens per DM reply")
    p.set_defaults(func=cmd_play)

    p = sub.add_parser("doctor", help="diagnose the environment and say how to fix problems")
    _common(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("config", help="print every config field with its default and meaning")
    p.set_defaults(func=cmd_config)

    from dndtrain import cli_data, incremental

    cli_data.add_commands(sub)
    incremental.add_commands(sub, _common, cmd_incremental)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from dndtrain.basemodel import BaseModelError
    from dndtrain.chat import RenderError
    from dndtrain.config import ConfigError
    from dndtrain.registry import RegistryError
    from dndtrain.scenario import ScenarioError
    from dndtrain.stages import StageError
    from dndtrain.train import TrainError

    return (ScenarioError, ConfigError, BaseModelError, RegistryError, RenderError, TrainError, StageError, OSError)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_openmp_waiting()  # before torch is imported: brief spinning on a quiet machine, sleeping on a busy one
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # transformers renamed gradient_checkpointing (which training turns off); its FutureWarning is noise for users.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted; finished outputs are intact (training can continue with --resume)", file=sys.stderr)
        return 130
    except _known_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

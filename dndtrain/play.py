"""`dndtrain play`: play a scene in the terminal with the model as Dungeon Master, executing its tool calls for real.

Each player line goes to the model; its reply is streamed token by token. Every tool call in the reply is executed
against the game state (`dndtrain.game`): dice are rolled, HP, inventory and spell slots change. The result lines go
back to the model as a `tool` message and it continues (at most 3 tool rounds per player line), exactly like the
`# TOOLCALL` sections it was trained on. `--script FILE` plays one player line per line of FILE non-interactively.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import TextIO

from dndtrain.config import Config
from dndtrain.paths import Paths
from dndtrain.stages import StageError

MAX_TOOL_ROUNDS = 3
HISTORY_CHARS = 8000
"""Older exchanges are dropped from the prompt once the conversation grows past this many characters."""
QUIT_WORDS = {"quit", "exit", "/quit", "/exit", "bye"}
GOODBYE = "Farewell, adventurer. (session ended)"


def resolve_model(cfg: Config, paths: Paths, model: Path | None) -> Path:
    """`--model`, else the deployed GGUF, else the trained model folder."""
    if model is not None:
        if not Path(model).exists():
            raise StageError(f"model not found at {model}")
        return Path(model)
    if paths.deploy_dir.is_dir():
        ggufs = sorted(paths.deploy_dir.glob("*.gguf"))
        preferred = [g for g in ggufs if cfg.export.quant.lower() in g.name.lower()]
        if preferred or ggufs:
            return (preferred or ggufs)[0]
    if paths.model_dir.exists():
        return paths.model_dir
    raise StageError(
        f"no model to play with: no deployed GGUF in {paths.deploy_dir} and no trained model at {paths.model_dir}. "
        f"Run `npm run train` first, or pass --model PATH (a .gguf file or a model folder)"
    )


def _snapshot(state) -> list[tuple]:
    return [(c.hp, tuple(c.inventory), tuple(sorted(c.slots.items()))) for c in state.characters]


def party_status(state) -> list[str]:
    """One line per character: HP, spell slots left (casters), inventory."""
    width = max((len(c.name) for c in state.characters), default=0)
    lines = []
    for c in state.characters:
        parts = [f"HP {c.hp}/{c.max_hp}" + (" (unconscious)" if c.hp == 0 else "")]
        if c.max_slots:
            parts.append("slots " + " ".join(f"L{k}:{c.slots.get(k, 0)}/{n}" for k, n in sorted(c.max_slots.items())))
        if c.inventory:
            parts.append("items: " + ", ".join(c.inventory))
        lines.append(f"  {c.name:<{width}}  " + " | ".join(parts))
    return lines


def trim_history(messages: list[dict], limit: int = HISTORY_CHARS) -> list[dict]:
    """Drop the earliest exchanges (keeping the system prompt and the latest exchange) while the prompt is too long."""
    msgs = list(messages)
    while sum(len(m["content"]) for m in msgs[1:]) > limit:
        starts = [i for i, m in enumerate(msgs) if m["role"] == "user" and i > 0]
        if len(starts) < 2:
            break
        msgs = msgs[:1] + msgs[starts[1]:]
    return msgs


class _Session:
    def __init__(self, gen, state, system: str, rng: random.Random, max_tokens: int, out: TextIO):
        self.gen = gen
        self.state = state
        self.rng = rng
        self.max_tokens = max_tokens
        self.out = out
        self.messages: list[dict] = [{"role": "system", "content": system}]

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def reply(self) -> str:
        self.out.write("DM: ")
        self.out.flush()
        pieces = []
        for piece in self.gen.stream(trim_history(self.messages), self.max_tokens):
            pieces.append(piece)
            self.out.write(piece)
            self.out.flush()
        text = "".join(pieces).strip()
        if not text:
            self.out.write("(no reply)")
        self.out.write("\n")
        self.out.flush()
        self.messages.append({"role": "assistant", "content": text})
        return text

    def run_tools(self, text: str) -> bool:
        """Execute the calls in a reply; append their results as a tool message. False when there were none."""
        from dndtrain.game import ToolError, execute
        from dndtrain.toolcalls import find_calls

        calls = find_calls(text)
        if not calls:
            return False
        before = _snapshot(self.state)
        results = []
        for call in calls:
            try:
                line = execute(call, self.state, self.rng)
            except ToolError as exc:
                line = f"error: {exc}"
            results.append(line)
            self.say(f"  [tool] {call} -> {line}")
        self.messages.append({"role": "tool", "content": "\n".join(results)})
        if _snapshot(self.state) != before:
            self.say("  Party:")
            for line in party_status(self.state):
                self.say(line)
        return True

    def player_turn(self, line: str) -> None:
        self.messages.append({"role": "user", "content": line})
        text = self.reply()
        rounds = 0
        while self.run_tools(text):
            rounds += 1
            if rounds >= MAX_TOOL_ROUNDS:
                text = self.reply()
                if text and _has_calls(text):
                    self.say(f"  (tool limit: at most {MAX_TOOL_ROUNDS} tool rounds per player line; "
                             f"these calls were not executed)")
                break
            text = self.reply()


def _has_calls(text: str) -> bool:
    from dndtrain.toolcalls import find_calls

    return bool(find_calls(text))


def _read_script(script: Path) -> list[str]:
    if not script.is_file():
        raise StageError(f"script file not found: {script}")
    try:
        text = script.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as exc:
        raise StageError(f"{script}: cannot read ({exc.strerror or exc})") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def play(cfg: Config, paths: Paths, model: Path | None = None, scenario: Path | None = None,
         script: Path | None = None, seed: int | None = None, max_tokens: int = 200,
         out: TextIO | None = None, inp: TextIO | None = None, generator=None) -> int:
    """Play interactively (or from `script`); `out`/`inp` default to stdout/stdin. `generator` (anything with
    `stream(messages, max_new_tokens)`) replaces loading a model, for tests and embedding."""
    out = out if out is not None else sys.stdout
    inp = inp if inp is not None else sys.stdin
    from dndtrain.threads import set_openmp_waiting

    set_openmp_waiting()
    from dndtrain.chat import DEFAULT_SYSTEM, default_tool_lines, system_prompt
    from dndtrain.game import GameState
    from dndtrain.registry import ToolRegistry

    if max_tokens < 1:
        raise StageError(f"--max-tokens must be at least 1, got {max_tokens}")
    registry = ToolRegistry.load(paths.tool_registry)
    if scenario is not None:
        from dndtrain.scenario import parse_file

        if not Path(scenario).is_file():
            raise StageError(f"scenario file not found: {scenario}")
        sc = parse_file(Path(scenario))
        state = GameState.from_scenario(sc, registry)
        setting = {k: v for k, v in sc.system.items() if k.lower() != "role"} or dict(DEFAULT_SYSTEM)
    else:
        state = GameState.default(registry)
        setting = dict(DEFAULT_SYSTEM)
    lines = _read_script(Path(script)) if script is not None else None
    system = system_prompt(setting, state.party, default_tool_lines(registry))

    say = lambda text="": (out.write(text + "\n"), out.flush())  # noqa: E731
    if generator is None:
        from dndtrain.generate import load_generator

        path = resolve_model(cfg, paths, model)
        generator = load_generator(path, log=lambda *a: say(" ".join(str(x) for x in a)))
        name = path.name
    else:
        name = getattr(generator, "name", "custom generator")
    session = _Session(generator, state, system, random.Random(seed), max_tokens, out)
    say(f"Playing with {name}. " + " ".join(f"{k}: {v}." for k, v in setting.items()))
    say("Party:")
    for line in party_status(state):
        say(line)
    if lines is None:
        say("Say what your characters do. Type 'quit' or press Ctrl-D to leave.")
    say()
    try:
        k = 0
        while True:
            if lines is not None:
                if k >= len(lines):
                    break
                line = lines[k]
                k += 1
                say(f"You: {line}")
            else:
                out.write("You: ")
                out.flush()
                raw = inp.readline()
                if not raw:
                    say()
                    break
                line = raw.strip()
                if not line:
                    continue
            if line.lower() in QUIT_WORDS:
                break
            session.player_turn(line)
            say()
    except KeyboardInterrupt:
        say()
    finally:
        close = getattr(generator, "close", None)
        if callable(close):
            close()
    say(GOODBYE)
    return 0

import io
import json

import pytest

from dndtrain.config import Config
from dndtrain.paths import Paths
from dndtrain.play import GOODBYE, MAX_TOOL_ROUNDS, play, trim_history
from dndtrain.stages import StageError


class FakeGenerator:
    """Replies from a fixed list (the last one repeats) and records every prompt it was given."""

    name = "fake"

    def __init__(self, replies):
        self.replies = list(replies)
        self.prompts = []
        self.closed = False

    def stream(self, messages, max_new_tokens):
        self.prompts.append([dict(m) for m in messages])
        text = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        for word in text.split(" "):  # token-ish pieces, like a real stream
            yield word + " "

    def close(self):
        self.closed = True


def _play(tmp_path, gen, lines, scenario=None, seed=7):
    script = tmp_path / "script.txt"
    script.write_text("\n".join(lines) + "\n")
    out = io.StringIO()
    rc = play(Config(), Paths.make(tmp_path / "proj"), model=None, scenario=scenario, script=script, seed=seed,
              max_tokens=50, out=out, generator=gen)
    return rc, out.getvalue()


def test_tool_calls_are_executed_fed_back_and_shown(tmp_path, scenes_dir):
    gen = FakeGenerator([
        "The goblin's blade bites deep. [roll: d20+4] [health: Thordak, -7] [spellcast: Thordak, fireball, 3]",
        "Thordak staggers but keeps his feet.",
        "The goblins flee into the rain.",
    ])
    rc, text = _play(tmp_path, gen, ["I charge the goblins.", "I chase them."],
                     scenario=scenes_dir / "combat/goblin_ambush.md")
    assert rc == 0 and gen.closed
    assert "You: I charge the goblins." in text and "You: I chase them." in text
    assert "[tool] [roll: d20+4] -> d20+4: 1d20 (" in text
    assert "[tool] [health: Thordak, -7] -> Thordak HP: 45 - 7 = *38*/45" in text
    assert "-> error: Thordak is a Fighter and has no spell slots" in text  # invalid calls become error lines
    # the party display after the state change shows the new HP and the wizard's slots
    party = text.split("  Party:\n", 1)[1]
    assert "Thordak  HP 38/45" in party and "slots L1:4/4 L2:3/3 L3:2/2" in party
    # the results went back to the model as one tool message, and it continued from them
    second = gen.prompts[1]
    assert second[-2]["role"] == "assistant" and "[roll: d20+4]" in second[-2]["content"]
    assert second[-1]["role"] == "tool"
    lines = second[-1]["content"].split("\n")
    assert len(lines) == 3 and lines[1] == "Thordak HP: 45 - 7 = *38*/45" and lines[2].startswith("error: ")
    assert "DM: Thordak staggers" in text
    # the system prompt carries the scenario's setting and party
    assert "Location: The Triboar Trail" in gen.prompts[0][0]["content"]
    assert "- Thordak (Dragonborn Fighter, Level 5, HP: 45/45)" in gen.prompts[0][0]["content"]
    assert len(gen.prompts) == 3 and gen.prompts[2][-1] == {"role": "user", "content": "I chase them."}
    assert text.rstrip().endswith(GOODBYE)


def test_seed_makes_dice_reproducible(tmp_path):
    def once(sub):
        d = tmp_path / sub
        d.mkdir()
        return _play(d, FakeGenerator(["Roll it. [roll: 3d6]", "Done."]), ["Roll."], seed=3)[1]

    assert once("a") == once("b")


def test_tool_rounds_are_capped(tmp_path):
    gen = FakeGenerator(["Again! [roll: d6]"])
    rc, text = _play(tmp_path, gen, ["Keep rolling."])
    assert rc == 0
    assert len(gen.prompts) == MAX_TOOL_ROUNDS + 1
    assert text.count("[tool] [roll: d6]") == MAX_TOOL_ROUNDS
    assert "tool limit" in text


def test_default_party_without_scenario(tmp_path):
    gen = FakeGenerator(["Welcome to the inn."])
    rc, text = _play(tmp_path, gen, ["Hello?"])
    assert rc == 0
    system = gen.prompts[0][0]["content"]
    assert "Location: a roadside inn" in system and "- Elara (Elf Wizard" in system
    assert "Elara" in text.split("Party:", 1)[1] and "[tool]" not in text


def test_interactive_eof_quit_and_ctrl_c(tmp_path):
    paths = Paths.make(tmp_path / "proj")
    out = io.StringIO()
    gen = FakeGenerator(["Yes?"])
    assert play(Config(), paths, None, None, None, 1, 20, out=out, inp=io.StringIO("hello\n\nquit\nnever read\n"),
                generator=gen) == 0
    assert len(gen.prompts) == 1 and out.getvalue().rstrip().endswith(GOODBYE)

    out = io.StringIO()
    assert play(Config(), paths, None, None, None, 1, 20, out=out, inp=io.StringIO("hello\n"),
                generator=FakeGenerator(["Yes?"])) == 0  # EOF after one line
    assert out.getvalue().rstrip().endswith(GOODBYE)

    class Interrupted(FakeGenerator):
        def stream(self, messages, max_new_tokens):
            yield "The door"
            raise KeyboardInterrupt

    out = io.StringIO()
    assert play(Config(), paths, None, None, None, 1, 20, out=out, inp=io.StringIO("hello\n"),
                generator=Interrupted(["x"])) == 0
    assert out.getvalue().rstrip().endswith(GOODBYE)


def test_missing_model_and_script_are_clear_errors(tmp_path):
    paths = Paths.make(tmp_path / "proj")
    with pytest.raises(StageError, match="npm run train"):
        play(Config(), paths, None, None, None, 1, 20, out=io.StringIO(), inp=io.StringIO(""))
    with pytest.raises(StageError, match="script file not found"):
        play(Config(), paths, None, None, tmp_path / "nope.txt", 1, 20, out=io.StringIO(), generator=FakeGenerator(["x"]))


def test_trim_history_keeps_system_and_latest_exchange():
    msgs = [{"role": "system", "content": "S"}]
    for i in range(10):
        msgs += [{"role": "user", "content": f"u{i} " * 100}, {"role": "assistant", "content": "a " * 100}]
    trimmed = trim_history(msgs, limit=1000)
    assert trimmed[0]["content"] == "S" and trimmed[1]["role"] == "user"
    assert trimmed[-1] == msgs[-1] and len(trimmed) < len(msgs)
    assert sum(len(m["content"]) for m in trimmed[1:]) <= 1000


def test_play_script_with_the_tiny_trained_model(tiny_trained, tmp_path, capsys):
    from dndtrain.cli import main

    script = tmp_path / "lines.txt"
    script.write_text("# comment lines are skipped\nI look around.\n\nI draw my sword.\n")
    scenario = tiny_trained.scenarios / "combat" / "goblin_ambush.md"
    rc = main(["play", "--root", str(tiny_trained.root), "--script", str(script), "--scenario", str(scenario),
               "--seed", "1", "--max-tokens", "6"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "Playing with dnd_model" in text
    assert text.count("You: ") == 2 and "You: I look around." in text and "You: I draw my sword." in text
    assert text.count("DM: ") >= 2
    assert "comment" not in text
    assert "Thordak" in text.split("Party:", 1)[1]
    assert text.rstrip().endswith(GOODBYE)
    made = json.loads((tiny_trained.model_dir / "dndtrain_config.json").read_text())
    assert made["end_of_turn"] == "<|im_end|>"

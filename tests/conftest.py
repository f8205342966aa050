"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, and a handful of scenario files.

The tiny model (hidden 64, 2 layers) keeps the real vocabulary and tokenizer so llama.cpp's converter recognises it
(`smollm` pre-tokenizer) and the whole pipeline (train -> merge -> GGUF -> quantize -> llama.cpp) runs in seconds.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

SCENES = {
    "combat/goblin_ambush.md": """
        # SYSTEM
        Role: Dungeon Master
        World: Forgotten Realms
        Location: The Triboar Trail
        Party:
        - Thordak (Dragonborn Fighter, Level 5, HP: 45/45)
        - Elara (Elf Wizard, Level 5, HP: 28/28)

        # USER
        I swing my greataxe at the nearest goblin.

        # DM
        Thordak's axe whistles through the rain toward the goblin's shield. [roll: d20+7]

        # TOOLCALL
        d20+7: 1d20 (13) + 7 = *20*

        # DM
        The blow lands and the goblin folds into the mud.
        """,
    "combat/trap_hall.md": """
        # SYSTEM
        Role: Dungeon Master
        World: Greyhawk
        Location: A collapsing hall
        Party:
        - Lyra (Halfling Rogue, Level 3, HP: 21/21, Stealth +7)

        # USER
        I sprint across the cracked floor.

        # DM
        The flagstones give way under your heels. [save: dexterity, Lyra, 13]

        # TOOLCALL
        dexterity save (Lyra): 6 + 5(save) = *11* vs DC 13: *failure*

        # DM
        You drop into the pit below and land hard. [health: Lyra, -4]

        # TOOLCALL
        Lyra HP: 21 - 4 = *17*/21

        # DM
        Bruised but alive, you look up at the square of torchlight far above.
        """,
    "roleplay/tavern_rumors.md": """
        # SYSTEM
        Role: Dungeon Master
        World: Forgotten Realms
        Location: The Yawning Portal
        Party:
        - Brom (Dwarf Cleric, Level 2, HP: 17/17)

        # USER
        Brom asks the barkeep about the old tower.

        # DM
        The barkeep wipes a mug. "Lights up there every new moon," she says. "Nobody who climbs it talks about it after."

        # USER
        I buy a round and leave a healing potion as a tip.

        # DM
        She pockets the vial with a grin. [inventory: Brom, remove, potion of healing]

        # TOOLCALL
        Brom inventory: removed potion of healing

        # DM
        "Generous," she murmurs. "The tower door opens to a song, not a key."
        """,
    "exploration/moonlit_ruins.md": """
        # SYSTEM
        Role: Dungeon Master
        World: Eberron
        Location: Ruins in the Mournland
        Party:
        - Sable (Tiefling Warlock, Level 4, HP: 27/27)
        - Kell (Human Ranger, Level 4, HP: 32/32)

        # USER
        Kell sneaks ahead to scout the ruins.

        # DM
        Grey mist curls around the broken pillars as Kell slips forward. [check: stealth, Kell]

        # TOOLCALL
        stealth (Kell): 14 + 5(skill) = *19*

        # DM
        Kell reaches the courtyard unseen and spots a warforged sentry standing motionless by the well.

        # USER
        Sable lights the way with a cantrip.

        # DM
        A flicker of violet fire dances over Sable's palm. [spellcast: Sable, light, 0]

        # TOOLCALL
        Sable casts light (cantrip)

        # DM
        The glow reveals old runes carved into the well's rim, still faintly warm.
        """,
    "exploration/river_crossing.md": """
        # SYSTEM
        Role: Dungeon Master
        World: Exandria
        Location: The Lotusden Greenwood
        Party:
        - Wren (Wood Elf Druid, Level 3, HP: 24/24)

        # USER
        What does the river look like?

        # DM
        Wide and brown with spring melt, the river drags whole branches past you; a rope bridge sags across it downstream.
        """,
    "roleplay/guard_bribe.md": """
        # SYSTEM
        Role: Dungeon Master
        World: Forgotten Realms
        Location: The gates of Baldur's Gate
        Party:
        - Mira (Human Bard, Level 3, HP: 20/20)

        # USER
        I try to talk the guard into letting us through.

        # DM
        The guard folds his arms and waits for you to impress him. [check: persuasion, Mira]

        # TOOLCALL
        persuasion (Mira): 15 + 5(skill) = *20*

        # DM
        "Fine, fine," he sighs, swinging the gate wide. "But I never saw you."
        """,
}


def write_scenes(root: Path, scenes: dict[str, str] = SCENES) -> Path:
    for rel, text in scenes.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return root


@pytest.fixture
def scenes_dir(tmp_path) -> Path:
    return write_scenes(tmp_path / "scenarios")


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The real default base model folder (dequantized once into the cache)."""
    from dndtrain.basemodel import ensure_default_model

    return ensure_default_model(log=lambda *a: None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_dir) -> Path:
    """A random 2-layer Llama (hidden 64) with the real SmolLM2 tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(str(smollm_dir))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


@pytest.fixture
def project(tmp_path, scenes_dir):
    """A Paths object for a throwaway project whose data/scenarios holds the fixture scenes."""
    import shutil

    from dndtrain.paths import Paths

    root = tmp_path / "proj"
    (root / "data").mkdir(parents=True)
    shutil.copytree(scenes_dir, root / "data" / "scenarios")
    return Paths.make(root)


@pytest.fixture
def tiny_train_config(tiny_model_dir):
    from dndtrain.config import TrainConfig

    return TrainConfig(base_model=str(tiny_model_dir), max_steps=2, logging_steps=1, save_steps=1,
                       warmup_steps=0, learning_rate=1e-3, holdout_fraction=0.34)


@pytest.fixture
def tiny_trained(project, tiny_train_config):
    """A project with a 2-step tiny adapter trained into trained_models/dnd_model."""
    from dndtrain.train import train

    train(tiny_train_config, project, log=lambda *a: None)
    return project

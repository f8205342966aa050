"""D&D 5e SRD facts used by the tool layer, as plain constants (no logic beyond small lookups).

Sources: the 5e System Reference Document 5.1 (abilities, skills, classes, spell slots, proficiency bonus, spells) and
`data/FORMAT.md`, which fixes the spell-slot rules the executor follows. Names are lowercase except class names, which
are capitalised as in the Party lines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ABILITIES: tuple[str, ...] = ("strength", "dexterity", "constitution", "intelligence", "wisdom", "charisma")

ABILITY_ABBREVIATIONS: dict[str, str] = {
    "str": "strength", "dex": "dexterity", "con": "constitution",
    "int": "intelligence", "wis": "wisdom", "cha": "charisma",
}

SKILLS: dict[str, str] = {
    "acrobatics": "dexterity",
    "animal handling": "wisdom",
    "arcana": "intelligence",
    "athletics": "strength",
    "deception": "charisma",
    "history": "intelligence",
    "insight": "wisdom",
    "intimidation": "charisma",
    "investigation": "intelligence",
    "medicine": "wisdom",
    "nature": "intelligence",
    "perception": "wisdom",
    "performance": "charisma",
    "persuasion": "charisma",
    "religion": "intelligence",
    "sleight of hand": "dexterity",
    "stealth": "dexterity",
    "survival": "wisdom",
}
"""The 18 skills and the ability each one uses."""

FULL, HALF, PACT, NONE = "full", "half", "pact", "none"


@dataclass(frozen=True)
class ClassInfo:
    name: str
    hit_die: int
    """Hit die size (d12 for a Barbarian -> 12)."""
    casting: str
    """Spellcasting type: `full`, `half`, `pact` or `none` (see FORMAT.md for the slot rules)."""
    saves: tuple[str, str]
    """The two saving-throw proficiencies."""
    primary: str
    """Primary ability (the one the executor guesses highest)."""
    ability_guess: tuple[int, int, int, int, int, int]
    """Guessed ability modifiers at level 1-3, in ABILITIES order (primary +3, a few +1/+2, the rest 0)."""
    skills: tuple[str, ...]
    """Skills a typical character of the class is proficient in (the executor's deterministic guess)."""


CLASSES: dict[str, ClassInfo] = {
    c.name: c
    for c in (
        #                                         str dex con int wis cha
        ClassInfo("Barbarian", 12, NONE, ("strength", "constitution"), "strength", (3, 1, 2, 0, 1, 0),
                  ("athletics", "intimidation", "perception", "survival")),
        ClassInfo("Bard", 8, FULL, ("dexterity", "charisma"), "charisma", (0, 2, 1, 0, 0, 3),
                  ("deception", "insight", "performance", "persuasion")),
        ClassInfo("Cleric", 8, FULL, ("wisdom", "charisma"), "wisdom", (1, 0, 2, 0, 3, 1),
                  ("insight", "medicine", "religion")),
        ClassInfo("Druid", 8, FULL, ("intelligence", "wisdom"), "wisdom", (0, 1, 2, 1, 3, 0),
                  ("animal handling", "nature", "perception", "survival")),
        ClassInfo("Fighter", 10, NONE, ("strength", "constitution"), "strength", (3, 1, 2, 0, 1, 0),
                  ("athletics", "intimidation", "perception")),
        ClassInfo("Monk", 8, NONE, ("strength", "dexterity"), "dexterity", (1, 3, 1, 0, 2, 0),
                  ("acrobatics", "insight", "stealth")),
        ClassInfo("Paladin", 10, HALF, ("wisdom", "charisma"), "strength", (3, 0, 1, 0, 0, 2),
                  ("athletics", "persuasion", "religion")),
        ClassInfo("Ranger", 10, HALF, ("strength", "dexterity"), "dexterity", (1, 3, 1, 0, 2, 0),
                  ("nature", "perception", "stealth", "survival")),
        ClassInfo("Rogue", 8, NONE, ("dexterity", "intelligence"), "dexterity", (0, 3, 1, 1, 1, 0),
                  ("acrobatics", "deception", "investigation", "perception", "sleight of hand", "stealth")),
        ClassInfo("Sorcerer", 6, FULL, ("constitution", "charisma"), "charisma", (0, 1, 2, 0, 0, 3),
                  ("arcana", "persuasion")),
        ClassInfo("Warlock", 8, PACT, ("wisdom", "charisma"), "charisma", (0, 1, 2, 0, 0, 3),
                  ("arcana", "deception")),
        ClassInfo("Wizard", 6, FULL, ("intelligence", "wisdom"), "intelligence", (0, 1, 1, 3, 1, 0),
                  ("arcana", "history", "investigation")),
    )
}

FULL_CASTER_SLOTS: dict[int, tuple[int, ...]] = {
    1: (2,), 2: (3,), 3: (4, 2), 4: (4, 3), 5: (4, 3, 2), 6: (4, 3, 3), 7: (4, 3, 3, 1), 8: (4, 3, 3, 2),
    9: (4, 3, 3, 3, 1), 10: (4, 3, 3, 3, 2), 11: (4, 3, 3, 3, 2, 1), 12: (4, 3, 3, 3, 2, 1),
    13: (4, 3, 3, 3, 2, 1, 1), 14: (4, 3, 3, 3, 2, 1, 1), 15: (4, 3, 3, 3, 2, 1, 1, 1), 16: (4, 3, 3, 3, 2, 1, 1, 1),
    17: (4, 3, 3, 3, 2, 1, 1, 1, 1), 18: (4, 3, 3, 3, 3, 1, 1, 1, 1), 19: (4, 3, 3, 3, 3, 2, 1, 1, 1),
    20: (4, 3, 3, 3, 3, 2, 2, 1, 1),
}
"""Full-caster slots by character level: counts of level-1, level-2, ... slots."""


def pact_slots(level: int) -> dict[int, int]:
    """Warlock pact slots: {slot level: count}."""
    count = 1 if level == 1 else 2 if level <= 10 else 3 if level <= 16 else 4
    return {min(5, math.ceil(level / 2)): count}


def slots_for(char_class: str, level: int) -> dict[int, int] | None:
    """Spell slots {slot level: count} for a class at a level; None for a class not in the SRD's 12."""
    info = CLASSES.get(char_class.strip().capitalize())
    if info is None:
        return None
    level = max(1, min(20, level))
    if info.casting == FULL:
        row = FULL_CASTER_SLOTS[level]
    elif info.casting == HALF:
        row = FULL_CASTER_SLOTS[math.ceil(level / 2)] if level >= 2 else ()
    elif info.casting == PACT:
        return pact_slots(level)
    else:
        row = ()
    return {i + 1: n for i, n in enumerate(row)}


def proficiency_bonus(level: int) -> int:
    """+2 at levels 1-4, +3 at 5-8, +4 at 9-12, +5 at 13-16, +6 at 17-20."""
    return 2 + (max(1, min(20, level)) - 1) // 4


PROFICIENCY_BY_LEVEL: dict[int, int] = {lvl: 2 + (lvl - 1) // 4 for lvl in range(1, 21)}

SRD_SPELLS: dict[str, int] = {
    # cantrips
    "acid splash": 0, "chill touch": 0, "dancing lights": 0, "druidcraft": 0, "eldritch blast": 0, "fire bolt": 0,
    "guidance": 0, "light": 0, "mage hand": 0, "mending": 0, "message": 0, "minor illusion": 0, "poison spray": 0,
    "prestidigitation": 0, "produce flame": 0, "ray of frost": 0, "resistance": 0, "sacred flame": 0,
    "shillelagh": 0, "shocking grasp": 0, "spare the dying": 0, "thaumaturgy": 0, "true strike": 0,
    "vicious mockery": 0,
    # level 1
    "alarm": 1, "animal friendship": 1, "bane": 1, "bless": 1, "burning hands": 1, "charm person": 1,
    "color spray": 1, "command": 1, "comprehend languages": 1, "create or destroy water": 1, "cure wounds": 1,
    "detect evil and good": 1, "detect magic": 1, "detect poison and disease": 1, "disguise self": 1,
    "divine favor": 1, "entangle": 1, "expeditious retreat": 1, "faerie fire": 1, "false life": 1,
    "feather fall": 1, "find familiar": 1, "floating disk": 1, "tenser's floating disk": 1, "fog cloud": 1,
    "goodberry": 1, "grease": 1, "guiding bolt": 1, "healing word": 1, "hellish rebuke": 1, "heroism": 1,
    "hideous laughter": 1, "tasha's hideous laughter": 1, "hunter's mark": 1, "identify": 1,
    "illusory script": 1, "inflict wounds": 1, "jump": 1, "longstrider": 1, "mage armor": 1, "magic missile": 1,
    "protection from evil and good": 1, "purify food and drink": 1, "sanctuary": 1, "shield": 1,
    "shield of faith": 1, "silent image": 1, "sleep": 1, "speak with animals": 1, "thunderwave": 1,
    "unseen servant": 1,
    # level 2
    "acid arrow": 2, "melf's acid arrow": 2, "aid": 2, "alter self": 2, "animal messenger": 2, "arcane lock": 2,
    "arcanist's magic aura": 2, "magic aura": 2, "nystul's magic aura": 2, "augury": 2, "barkskin": 2,
    "blindness/deafness": 2, "blur": 2, "calm emotions": 2, "continual flame": 2, "darkness": 2,
    "darkvision": 2, "detect thoughts": 2, "enhance ability": 2, "enlarge/reduce": 2, "enthrall": 2,
    "find steed": 2, "find traps": 2, "flame blade": 2, "flaming sphere": 2, "gentle repose": 2,
    "gust of wind": 2, "heat metal": 2, "hold person": 2, "invisibility": 2, "knock": 2,
    "lesser restoration": 2, "levitate": 2, "locate animals or plants": 2, "locate object": 2,
    "magic mouth": 2, "magic weapon": 2, "mirror image": 2, "misty step": 2, "moonbeam": 2,
    "pass without trace": 2, "phantasmal force": 2, "prayer of healing": 2, "protection from poison": 2,
    "ray of enfeeblement": 2, "rope trick": 2, "scorching ray": 2, "see invisibility": 2, "shatter": 2,
    "silence": 2, "spider climb": 2, "spike growth": 2, "spiritual weapon": 2, "suggestion": 2,
    "warding bond": 2, "web": 2, "zone of truth": 2,
    # level 3
    "animate dead": 3, "beacon of hope": 3, "bestow curse": 3, "blink": 3, "call lightning": 3,
    "clairvoyance": 3, "conjure animals": 3, "counterspell": 3, "create food and water": 3, "daylight": 3,
    "dispel magic": 3, "fear": 3, "feign death": 3, "fireball": 3, "fly": 3, "gaseous form": 3,
    "glyph of warding": 3, "haste": 3, "hypnotic pattern": 3, "lightning bolt": 3, "magic circle": 3,
    "major image": 3, "mass healing word": 3, "meld into stone": 3, "nondetection": 3, "phantom steed": 3,
    "plant growth": 3, "protection from energy": 3, "remove curse": 3, "revivify": 3, "sending": 3,
    "sleet storm": 3, "slow": 3, "speak with dead": 3, "speak with plants": 3, "spirit guardians": 3,
    "stinking cloud": 3, "tiny hut": 3, "leomund's tiny hut": 3, "tongues": 3, "vampiric touch": 3,
    "water breathing": 3, "water walk": 3, "wind wall": 3,
    # level 4
    "arcane eye": 4, "banishment": 4, "black tentacles": 4, "evard's black tentacles": 4, "blight": 4,
    "compulsion": 4, "confusion": 4, "conjure minor elementals": 4, "conjure woodland beings": 4,
    "control water": 4, "death ward": 4, "dimension door": 4, "divination": 4, "dominate beast": 4,
    "fabricate": 4, "faithful hound": 4, "mordenkainen's faithful hound": 4, "fire shield": 4,
    "freedom of movement": 4, "giant insect": 4, "greater invisibility": 4, "guardian of faith": 4,
    "hallucinatory terrain": 4, "ice storm": 4, "locate creature": 4, "phantasmal killer": 4, "polymorph": 4,
    "private sanctum": 4, "mordenkainen's private sanctum": 4, "resilient sphere": 4,
    "otiluke's resilient sphere": 4, "secret chest": 4, "leomund's secret chest": 4, "stone shape": 4,
    "stoneskin": 4, "wall of fire": 4,
    # level 5
    "animate objects": 5, "antilife shell": 5, "arcane hand": 5, "bigby's hand": 5, "awaken": 5, "commune": 5,
    "commune with nature": 5, "cone of cold": 5, "conjure elemental": 5, "contact other plane": 5,
    "contagion": 5, "creation": 5, "dispel evil and good": 5, "dominate person": 5, "dream": 5,
    "flame strike": 5, "geas": 5, "greater restoration": 5, "hallow": 5, "hold monster": 5,
    "insect plague": 5, "legend lore": 5, "mass cure wounds": 5, "mislead": 5, "modify memory": 5,
    "passwall": 5, "planar binding": 5, "raise dead": 5, "scrying": 5, "seeming": 5, "telekinesis": 5,
    "telepathic bond": 5, "rary's telepathic bond": 5, "teleportation circle": 5, "tree stride": 5,
    "wall of force": 5, "wall of stone": 5,
    # level 6
    "blade barrier": 6, "chain lightning": 6, "circle of death": 6, "conjure fey": 6, "contingency": 6,
    "create undead": 6, "disintegrate": 6, "eyebite": 6, "find the path": 6, "flesh to stone": 6,
    "forbiddance": 6, "freezing sphere": 6, "otiluke's freezing sphere": 6, "globe of invulnerability": 6,
    "guards and wards": 6, "harm": 6, "heal": 6, "heroes' feast": 6, "instant summons": 6,
    "drawmij's instant summons": 6, "irresistible dance": 6, "otto's irresistible dance": 6, "magic jar": 6,
    "mass suggestion": 6, "move earth": 6, "planar ally": 6, "programmed illusion": 6, "sunbeam": 6,
    "transport via plants": 6, "true seeing": 6, "wall of ice": 6, "wall of thorns": 6, "wind walk": 6,
    "word of recall": 6,
    # level 7
    "arcane sword": 7, "mordenkainen's sword": 7, "conjure celestial": 7, "delayed blast fireball": 7,
    "divine word": 7, "etherealness": 7, "finger of death": 7, "fire storm": 7, "forcecage": 7,
    "magnificent mansion": 7, "mordenkainen's magnificent mansion": 7, "mirage arcane": 7, "plane shift": 7,
    "prismatic spray": 7, "project image": 7, "regenerate": 7, "resurrection": 7, "reverse gravity": 7,
    "sequester": 7, "simulacrum": 7, "symbol": 7, "teleport": 7,
    # level 8
    "animal shapes": 8, "antimagic field": 8, "antipathy/sympathy": 8, "clone": 8, "control weather": 8,
    "demiplane": 8, "dominate monster": 8, "earthquake": 8, "feeblemind": 8, "glibness": 8, "holy aura": 8,
    "incendiary cloud": 8, "maze": 8, "mind blank": 8, "power word stun": 8, "sunburst": 8,
    # level 9
    "astral projection": 9, "foresight": 9, "gate": 9, "imprisonment": 9, "mass heal": 9, "meteor swarm": 9,
    "power word kill": 9, "prismatic wall": 9, "shapechange": 9, "storm of vengeance": 9, "time stop": 9,
    "true polymorph": 9, "true resurrection": 9, "weird": 9, "wish": 9,
}
"""SRD 5.1 spells -> base level (0 = cantrip), including the SRD's generic names and the familiar named variants."""

COMMON_NON_SRD_SPELLS: dict[str, int] = {
    "blade ward": 0, "booming blade": 0, "green-flame blade": 0, "toll the dead": 0, "word of radiance": 0,
    "mind sliver": 0, "frostbite": 0, "thunderclap": 0, "sword burst": 0, "infestation": 0,
    "primal savagery": 0, "create bonfire": 0, "control flames": 0, "gust": 0, "mold earth": 0,
    "shape water": 0, "magic stone": 0, "thorn whip": 0, "lightning lure": 0, "friends": 0,
    "hex": 1, "witch bolt": 1, "chromatic orb": 1, "dissonant whispers": 1, "ray of sickness": 1,
    "armor of agathys": 1, "arms of hadar": 1, "compelled duel": 1, "ensnaring strike": 1, "hail of thorns": 1,
    "searing smite": 1, "thunderous smite": 1, "wrathful smite": 1, "absorb elements": 1, "ice knife": 1,
    "catapult": 1, "earth tremor": 1, "cause fear": 1, "silvery barbs": 1,
    "cloud of daggers": 2, "crown of madness": 2, "shadow blade": 2, "dragon's breath": 2, "healing spirit": 2,
    "branding smite": 2, "mind spike": 2, "earthbind": 2,
    "hunger of hadar": 3, "elemental weapon": 3, "crusader's mantle": 3, "lightning arrow": 3,
    "blinding smite": 3, "conjure barrage": 3, "aura of vitality": 3, "spirit shroud": 3, "thunder step": 3,
    "erupting earth": 3, "intellect fortress": 3, "catnap": 3,
    "staggering smite": 4, "aura of purity": 4, "aura of life": 4, "shadow of moil": 4, "sickening radiance": 4,
    "storm sphere": 4, "vitriolic sphere": 4, "summon beast": 2, "summon fey": 3, "summon undead": 3,
    "banishing smite": 5, "destructive wave": 5, "circle of power": 5, "swift quiver": 5,
    "steel wind strike": 5, "synaptic static": 5, "far step": 5, "conjure volley": 5,
    "mental prison": 6, "crown of stars": 7, "power word pain": 7, "tsunami": 8, "psychic scream": 9,
    "power word heal": 9, "mass polymorph": 9,
}
"""Common Player's Handbook / Xanathar's spells that are not in the SRD, so they get no 'unknown spell' warning."""

KNOWN_SPELLS: dict[str, int] = {**COMMON_NON_SRD_SPELLS, **SRD_SPELLS}
"""Every spell the validator knows, name -> base level."""

COMMON_ITEMS: tuple[str, ...] = (
    "potion of healing", "potion of greater healing", "potion of superior healing", "potion of supreme healing",
    "antitoxin", "holy water", "alchemist's fire", "acid", "oil", "rope", "hempen rope", "silk rope", "torch",
    "lantern", "hooded lantern", "bullseye lantern", "candle", "tinderbox", "rations", "waterskin", "bedroll",
    "backpack", "blanket", "crowbar", "hammer", "piton", "grappling hook", "chain", "manacles", "lock",
    "caltrops", "ball bearings", "healer's kit", "thieves' tools", "spellbook", "component pouch",
    "arcane focus", "holy symbol", "druidic focus", "herbalism kit", "climber's kit", "mirror", "map",
    "scroll", "spell scroll", "ink", "quill", "parchment", "vial", "flask", "pouch", "sack", "shovel",
    "spyglass", "whistle", "mess kit", "tent", "dagger", "shortsword", "longsword", "greatsword", "rapier",
    "scimitar", "handaxe", "battleaxe", "greataxe", "warhammer", "maul", "mace", "quarterstaff", "spear",
    "javelin", "shortbow", "longbow", "light crossbow", "hand crossbow", "heavy crossbow", "arrows",
    "crossbow bolts", "sling", "shield", "chain mail", "leather armor", "studded leather armor",
    "gold pieces", "silver pieces", "copper pieces", "gem", "key",
)
"""Common SRD adventuring gear, weapons and consumables (items are free text; this is only for hints)."""

"""A/B data experiment: rewrite a copy of the corpus so some attacks roll their damage in the same DM turn.

The corpus rolls an attack, waits for the result, then rolls damage on a hit (two DM turns); the blind eval-set writer
(data/evalset) rolls attack and damage together in one turn for 13 of its 33 attack turns, which the corpus almost
never does (2 of 660). This script rewrites a deterministic share of the corpus's attack-then-damage sequences

    DM: ... [roll: d20+5]  ->  TOOLCALL  ->  DM: <hit narration> [roll: 1d8+3]  ->  TOOLCALL  ->  DM: <outcome>

into the one-turn style

    DM: ... [roll: d20+5] [roll: 1d8+3]  ->  TOOLCALL (both lines)  ->  DM: <hit narration> <outcome>

leaving every result line, HP number and later turn as it was, so `dndtrain data check` still passes.

Usage:
  .venv/bin/python bench/combined_rolls.py data/scenarios /tmp/combined --share 0.4
  then train and validate with the copy in place of data/scenarios (e.g. in a git worktree), on two seeds.

Measured 2026-12-07 (bench/results/combined-rolls-20261207.json): share 0.4 rewrote 85 sequences in 74 files; eval-set
tool F1 +0.05 (seed 43) and -0.02 (seed 42), held-out F1 on the files it did not touch +0.01 / -0.03: no gain beyond
seed noise, so the shipped corpus keeps one style.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dndtrain.toolcalls import find_calls, strip_calls  # noqa: E402

HEADING = re.compile(r"^# (SYSTEM|USER|DM|TOOLCALL)\s*$")
DAMAGE_DICE = re.compile(r"^\d*d(4|6|8|10|12)\b")


def sections(text: str) -> list[tuple[str, str]]:
    out: list[list] = []
    for line in text.split("\n"):
        m = HEADING.match(line)
        if m:
            out.append([m.group(1), []])
        elif out:
            out[-1][1].append(line)
    return [(name, "\n".join(body).strip()) for name, body in out]


def render(secs: list[tuple[str, str]]) -> str:
    return "\n\n".join(f"# {name}\n{body}" for name, body in secs) + "\n"


def is_attack_turn(text: str) -> bool:
    calls = find_calls(text)
    rolls = [c for c in calls if c.name == "roll"]
    return bool(rolls) and all("d20" in c.args[0] for c in rolls) and all(c.name in ("roll", "spellcast") for c in calls)


def is_damage_turn(text: str) -> bool:
    calls = find_calls(text)
    return bool(calls) and all(c.name == "roll" and DAMAGE_DICE.match(c.args[0].strip()) for c in calls)


def chosen(key: str, share: float) -> bool:
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 1000 < share * 1000


def combine(text: str, name: str, share: float) -> tuple[str, int, int]:
    """The file's text with a share of its attack -> damage sequences in one turn; (text, candidates, rewritten)."""
    secs = sections(text)
    out, i, seen, done = secs[:1], 1, 0, 0
    while i < len(secs):
        w = secs[i:i + 5]
        if ([n for n, _ in w] == ["DM", "TOOLCALL", "DM", "TOOLCALL", "DM"]
                and is_attack_turn(w[0][1]) and is_damage_turn(w[2][1])):
            seen += 1
            if chosen(f"{name}:{i}", share):
                done += 1
                damage_calls = " ".join(c.raw for c in find_calls(w[2][1]))
                hit = strip_calls(w[2][1]).strip()
                out += [("DM", w[0][1].rstrip() + " " + damage_calls),
                        ("TOOLCALL", w[1][1].rstrip() + "\n" + w[3][1].strip()),
                        ("DM", (hit + " " + w[4][1].lstrip()) if hit else w[4][1])]
                i += 5
                continue
        out.append(secs[i])
        i += 1
    return (render(out) if done else text), seen, done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path, help="scenario folder to read (e.g. data/scenarios)")
    ap.add_argument("dst", type=Path, help="new folder for the rewritten copy (must not exist)")
    ap.add_argument("--share", type=float, default=0.4, help="share of attack -> damage sequences to rewrite")
    args = ap.parse_args(argv)
    if args.dst.exists():
        print(f"error: {args.dst} exists; choose a new folder", file=sys.stderr)
        return 1
    shutil.copytree(args.src, args.dst)
    seen = done = files = 0
    for path in sorted(args.dst.rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        if render(sections(text)) != text:
            continue  # not in the canonical layout: leave it alone
        new, s, d = combine(text, path.name, args.share)
        seen, done = seen + s, done + d
        if d:
            path.write_text(new, encoding="utf-8")
            files += 1
    print(f"{done} of {seen} attack -> damage sequences rewritten in {files} files under {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

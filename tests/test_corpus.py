"""The shipped corpus: it checks clean, meets the counts promised in data/README.md, and has no near-duplicates."""

import re
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import pytest

from dndtrain.datacheck import check_paths, corpus_stats
from dndtrain.registry import ToolRegistry
from dndtrain.scenario import load_scenarios
from dndtrain.toolcalls import strip_calls

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "data" / "scenarios"
BUILTIN = ("roll", "health", "inventory", "spellcast", "check", "save")


@pytest.fixture(scope="module")
def corpus():
    return load_scenarios(SCENARIOS)


def test_corpus_checks_clean():
    report = check_paths(SCENARIOS, ToolRegistry.builtin())
    errors = [str(l) for l in report.lines if l.level == "error"]
    assert report.files_checked >= 300
    assert errors == []


def test_corpus_counts(corpus):
    stats = corpus_stats(corpus, ToolRegistry.builtin())
    assert stats["files"] >= 300
    for cat in ("combat", "roleplay", "exploration"):
        assert stats["categories"][cat]["files"] >= 60
    for tool in BUILTIN:
        assert stats["calls_per_tool"].get(tool, 0) >= 60, tool
    assert stats["dm_turns_no_call_share"] >= 0.15
    assert stats["dm_turns_multi_call"] > 0 and stats["dm_turns_one_call"] > 0
    classes = {c.char_class for s in corpus for c in s.party}
    assert len(classes) == 12
    levels = {c.level for s in corpus for c in s.party}
    assert levels == set(range(1, 21))
    assert {len(s.party) for s in corpus} >= {1, 2, 3, 4, 5}


def _shingles(text: str, n: int = 3) -> frozenset:
    words = re.findall(r"[a-z0-9']+", strip_calls(text).lower())
    return frozenset(tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1)))


def near_duplicates(texts: list[tuple[str, str]], threshold: float = 0.5) -> list[tuple[str, str, float]]:
    """Pairs of texts whose word-3-gram Jaccard similarity is >= threshold (candidate pairs via an inverted index)."""
    shingles = [_shingles(t) for _, t in texts]
    index = defaultdict(list)
    for i, sh in enumerate(shingles):
        for g in sh:
            index[g].append(i)
    pairs = set()
    for ids in index.values():
        if len(ids) < 50:  # very common 3-grams ("you can see") say nothing about duplication
            pairs.update(combinations(ids, 2))
    out = []
    for i, j in pairs:
        a, b = shingles[i], shingles[j]
        sim = len(a & b) / len(a | b)
        if sim >= threshold:
            out.append((texts[i][0], texts[j][0], round(sim, 2)))
    return out


def test_near_duplicate_detector_catches_copies():
    texts = [("a", "The goblin snarls and swings its rusty blade at Thordak's knees, missing by a hair."),
             ("b", "The goblin snarls and swings its rusty blade at Elara's knees, missing by a hair."),
             ("c", "Rain hammers the slate roof of the chapel while the priest lights a single candle.")]
    found = near_duplicates(texts)
    assert [(a, b) for a, b, _ in found] in ([("a", "b")], [("b", "a")])


def test_no_near_duplicate_dm_turns(corpus):
    texts = [(f"{Path(s.path).name}:{t.line}", t.text) for s in corpus for t in s.turns if t.role == "dm"]
    assert len(texts) > 1000
    assert near_duplicates(texts) == []


def test_independent_evalset_checks_clean_and_is_not_trained_on():
    evalset = ROOT / "data" / "evalset"
    report = check_paths(evalset, ToolRegistry.builtin())
    assert report.files_checked >= 16
    assert [str(l) for l in report.lines if l.level == "error"] == []
    trained = {p.name for p in SCENARIOS.rglob("*.md")}
    assert not trained & {p.name for p in evalset.rglob("*.md")}

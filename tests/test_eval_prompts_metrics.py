"""Prompts byte for byte, the metric against the reference normalisation, and the statistics."""

import re
import string

import numpy as np
import pytest

from pear.evaluate import metrics, prompts, stats


# ------------------------------------------------------------------ prompts
def _readme_blocks(data_dir):
    """The indented prompt templates of the data folder's README, un-indented."""
    text = (data_dir / "README.md").read_text()
    blocks, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("    ") or (cur and line == ""):
            cur.append(line[4:])
        elif cur:
            blocks.append("\n".join(cur).strip("\n"))
            cur = []
    return text, blocks


@pytest.mark.data
def test_qa_prompt_matches_documented_format(data_dir):
    text, blocks = _readme_blocks(data_dir)
    template = next(b for b in blocks if "{search_results}" in b)
    doc_fmt = re.search(r"`(Document \[i\]\(Title: \{title\}\) \{text\})`", text).group(1)
    docs = [("First doc", "first text."), ("Second, doc", "x  y"), ("Third", "z")]
    results = "\n".join(doc_fmt.replace("[i]", f"[{i + 1}]").format(title=t, text=x) for i, (t, x) in enumerate(docs))
    expected = template.format(search_results=results, question="who?")
    assert prompts.qa_prompt("who?", docs) == expected
    assert "Document [1](Title: First doc) first text.\nDocument [2](Title: Second, doc) x  y\nDocument [3]" in expected


@pytest.mark.data
def test_kv_prompt_matches_documented_format(data_dir):
    _, blocks = _readme_blocks(data_dir)
    template = next(b for b in blocks if b.startswith("Extract the value"))
    expected = template.replace(', ...}', '}').replace("{key}", "k2")
    assert prompts.kv_prompt([("k1", "v1"), ("k2", "v2")], "k2") == expected


def test_prompts_match_reference_tests():
    """The expected strings of nelson-liu/lost-in-the-middle tests/test_prompting.py."""
    instr = ("Write a high-quality answer for the given question using only "
             "the provided search results (some of which might be irrelevant).")
    gold = (f"{instr}\n\nDocument [1](Title: first doc) first doc text\n"
            "Document [2](Title: second doc) second doc text\n\nQuestion: test question\nAnswer:")
    docs = [("first doc", "first doc text"), ("second doc", "second doc text")]
    assert prompts.qa_prompt("test question", docs) == gold
    assert prompts.closedbook_prompt("test question") == "Question: test question\nAnswer:"
    kv = [("test key1", "test value1"), ("test key2", "test value2"), ("test key3", "test value3")]
    assert prompts.kv_prompt(kv, "test key2") == "\n".join([
        "Extract the value corresponding to the specified key in the JSON object below.", "", "JSON data:",
        '{"test key1": "test value1",', ' "test key2": "test value2",', ' "test key3": "test value3"}', "",
        'Key: "test key2"', "Corresponding value:"])


def test_mmlu_prompt_is_lm_eval_format():
    p = prompts.mmlu_prompt("high_school_physics", " What? ", ["a", "b", "c", "d"], [("Q1", ["w", "x", "y", "z"], 2)])
    assert p == ("The following are multiple choice questions (with answers) about high school physics.\n\n"
                 "Q1\nA. w\nB. x\nC. y\nD. z\nAnswer: C\n\n"
                 "What?\nA. a\nB. b\nC. c\nD. d\nAnswer:")


# ------------------------------------------------------------------ metric
def _reference_normalize(s):
    """nelson-liu/lost-in-the-middle metrics.normalize_answer (with `regex` as there)."""
    import regex

    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = regex.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


@pytest.mark.parametrize("pred,answers,expected", [
    ("The Beatles", ["Beatles"], 1.0),          # article dropped
    ("beatles", ["The Beatles"], 1.0),
    ("It was in 1972.", ["1"], 1.0),            # substring on characters: "1" inside "1972"
    ("It was in 1972.", ["1973"], 0.0),
    ("the U.S.A.", ["USA"], 1.0),               # punctuation dropped
    ("Joseph Kearns", ["Joseph Sherrard Kearns"], 0.0),  # the FINDINGS example
    ("Anna  Karenina", ["anna karenina"], 1.0),  # "an" inside a word stays; spaces collapse
    ("an apple", ["apple"], 1.0),
    ("Paris\nLondon", ["London"], 0.0),          # first line only
    ("\nLondon", ["London"], 0.0),               # empty first line, as in the reference
    ("  London is the answer\n", ["london"], 1.0),
    ("", ["x"], 0.0),
])
def test_qa_score_edge_cases(pred, answers, expected):
    assert metrics.qa_score(pred, answers) == expected


def test_normalize_matches_reference_on_many_strings():
    rng = np.random.default_rng(0)
    alphabet = list("aAnNtThHe  .,;:'\"!?-()1972éÖ–\t") + ["the ", "an ", "a ", " The", "an."]
    for _ in range(2000):
        s = "".join(rng.choice(alphabet, size=rng.integers(0, 20)))
        assert metrics.normalize_answer(s) == _reference_normalize(s), repr(s)


def test_kv_score_and_done():
    assert metrics.kv_score("The value is ABC-def.", "abc-DEF") == 1.0
    assert metrics.kv_score("abc def", "abc-def") == 0.0
    assert metrics.qa_done("Paris") is False and metrics.qa_done("Paris\n") is True


def test_contains_answer():
    assert metrics.contains_answer("In 1972 the band split", ["1"])
    assert not metrics.contains_answer("In 1972 the band split", ["1999"])
    assert not metrics.contains_answer("anything", ["The"])  # empty after normalisation: never matches


# ------------------------------------------------------------------ statistics
def test_wilson_interval():
    lo, hi = stats.wilson(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = stats.wilson(50, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))


def test_mcnemar_exact():
    a, b = [1] * 5 + [0] * 5, [0] * 5 + [0] * 5  # 5 discordant, all one way
    n10, n01, p = stats.mcnemar_exact(a, b)
    assert (n10, n01) == (5, 0) and p == pytest.approx(0.0625)
    assert stats.mcnemar_exact([1, 0], [1, 0])[2] == 1.0
    # thousands of discordant pairs (MMLU, 14k questions): no float overflow; a balanced split
    # is p ~ 1 and a lopsided one underflows towards 0
    bal = stats.mcnemar_exact([1, 0] * 1500, [0, 1] * 1500)
    assert bal[:2] == (1500, 1500) and bal[2] == pytest.approx(1.0, abs=0.03)
    assert stats.mcnemar_exact([1] * 1400 + [0] * 1600, [0] * 1400 + [1] * 1600)[2] < 1e-3


def test_paired_bootstrap_seeded_and_sensible():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 300)
    b = np.where(rng.random(300) < 0.2, 1, a)  # b = a plus some extra right answers
    r1, r2 = stats.compare(a, b, seed=3), stats.compare(a, b, seed=3)
    assert r1 == r2
    assert r1["diff"] == pytest.approx(b.mean() - a.mean())
    assert r1["ci95"][0] > 0 and r1["p_bootstrap"] < 0.01 and r1["p_mcnemar"] < 0.01
    same = stats.compare(a, a)
    assert same["diff"] == 0 and same["p_bootstrap"] == 1.0 and same["p_mcnemar"] == 1.0

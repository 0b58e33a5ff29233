"""The passkey and copy tasks over the essays: the gold is where it is said to be, the
answer is determined by the context, the scores read outputs as documented."""

import random
import re

import pytest

from pear.errors import PearError
from pear.evaluate.registry import BuildContext, build_task
from pear.evaluate.tasks.copy import PREFIX_WORDS, copy_example, copy_score
from pear.evaluate.tasks.haystack import N_SLOTS, Sentences, haystack, slot_index, split_sentences
from pear.evaluate.tasks.passkey import needle, passkey_score

pytestmark = pytest.mark.data


def test_passkey_needle_once_at_increasing_depth(data_dir):
    task = build_task("passkey-120", BuildContext(data_dir, limit=3, positions=["0%", "50%", "100%"]))
    assert task.conditions == ["1", "6", "11"] and len(task.examples) == 9 and task.positional
    for rec in range(3):
        exs = [e for e in task.examples if e.id == f"passkey{rec}"]
        key = exs[0].answers[0]
        assert re.fullmatch(r"\d{5}", key) and all(e.answers == [key] for e in exs)
        depths = []
        for e in exs:
            assert e.prompt.count(needle(key)) == 1 and e.prompt.count(key) == 2
            body = e.prompt.split("\n\n")[1]
            depths.append(body.index(needle(key)) / len(body))
        assert depths[0] == 0.0 and depths[0] < depths[1] < depths[2] and depths[2] > 0.9
        # the haystack is the same text at every depth: only the needle moves
        assert len({e.prompt.replace(needle(key) + " ", "").replace(" " + needle(key), "") for e in exs}) == 1
    again = build_task("passkey-120", BuildContext(data_dir, limit=3, positions=["0%", "50%", "100%"]))
    assert [e.prompt for e in again.examples] == [e.prompt for e in task.examples]  # seeded


def test_passkey_score_reads_the_first_number():
    assert passkey_score(" 71432.", "71432") == 1.0
    assert passkey_score("The pass key is 71432. Remember it.", "71432") == 1.0
    assert passkey_score(" 7143", "71432") == 0.0
    assert passkey_score(" 12345, or 71432", "71432") == 0.0
    assert passkey_score(" a secret", "71432") == 0.0


def test_copy_continuation_follows_unique_prefix(data_dir):
    task = build_task("copy-150", BuildContext(data_dir, limit=4))
    assert task.conditions == ["1", "3", "6", "8", "11"] and len(task.examples) == 20 and not task.chat
    for e in task.examples:
        text, tail = e.prompt.rsplit('\n\nContinue the sentence from the text above: "', 1)
        assert len(tail.split()) == PREFIX_WORDS
        assert text.count(tail) == 1  # the prefix determines where to copy from
        assert f"{tail} {e.answers[0]}" in text  # and the gold is what follows it
    for rec in range(4):  # deeper slots take the gold sentence from further on in the haystack
        exs = [e for e in task.examples if e.id == f"copy{rec}"]
        where = [e.prompt.index(e.prompt.rsplit('"', 1)[1]) for e in exs]
        assert where == sorted(where) and where[0] < where[-1]


def test_copy_score_and_unusable_haystack():
    assert copy_score(" doesn't merely yield few good ideas; it yields more", "doesn't merely yield few good ideas; it yields")
    assert copy_score(" Doesn't merely yield few good ideas, it yields", "doesn't merely yield few good ideas; it yields")
    assert not copy_score(" doesn't merely yield few ideas", "doesn't merely yield few good ideas; it yields")
    assert not copy_score(" doesn't merely yield few good ideas; it yieldsX", "doesn't merely yield few good ideas; it yields")
    assert copy_example(["Too short.", "Also short."], 3) is None


def test_haystack_helpers():
    s = split_sentences("One two three. Four five!  Six? \"Seven\" eight. e.g. nine")
    assert s == ["One two three.", "Four five!", "Six?", "\"Seven\" eight. e.g. nine"] and s.n_words == 10
    rng = random.Random(0)
    hs = haystack(Sentences([f"Word{i} a b c." for i in range(100)]), 20, rng)
    assert sum(len(x.split()) for x in hs) >= 20 and len(hs) == 5
    assert [slot_index(k, 21) for k in (0, 5, N_SLOTS - 1)] == [0, 10, 20]
    with pytest.raises(PearError, match="only 10 words"):
        haystack(s, 6, rng)


def test_bad_parameters(data_dir):
    with pytest.raises(PearError, match="haystack length in words"):
        build_task("passkey-abc", BuildContext(data_dir, limit=1))
    with pytest.raises(PearError, match="haystack length in words"):
        build_task("copy-0", BuildContext(data_dir, limit=1))


def test_missing_essays(tmp_path):
    with pytest.raises(PearError, match="haystack/PaulGrahamEssays.json.gz' not found"):
        build_task("passkey", BuildContext(tmp_path, limit=1))


def test_lm_eval_export_refuses_what_it_cannot_score(data_dir, tmp_path):
    from pear.evaluate.lm_eval_export import export

    with pytest.raises(PearError, match="cannot be exported"):
        export(["passkey-40"], tmp_path, BuildContext(data_dir, limit=1))

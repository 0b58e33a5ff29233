"""Task construction from the real data files: the gold is where it is said to be,
distractors contain no answer, positions resolve as documented, missing files fail clearly."""

import json
import re
import uuid

import pytest

from pear.errors import PearError
from pear.evaluate import data
from pear.evaluate.metrics import contains_answer
from pear.evaluate.prompts import QA_INSTRUCTION
from pear.evaluate.registry import BuildContext, build_task, parse_positions, resolve_positions
from pear.evaluate.tasks.kv import make_kv_records
from pear.evaluate.tasks.mdqa import load_oracle

DOC = re.compile(r"^Document \[(\d+)\]\(Title: (.*?)\) (.*)$", re.S)

pytestmark = pytest.mark.data


def _docs(prompt):
    """[(number, title, text)] parsed back from a QA prompt (a few NQ passages hold newlines)."""
    body = prompt[len(QA_INSTRUCTION) + 2: prompt.rindex("\n\nQuestion: ")]
    return [DOC.match(d).groups() for d in re.split(r"\n(?=Document \[\d+\]\(Title: )", body)]


def test_positions_resolve_as_documented():
    q = ["0%", "25%", "50%", "75%", "100%"]
    assert [p + 1 for p in resolve_positions(q, 10)] == [1, 3, 5, 8, 10]
    assert [p + 1 for p in resolve_positions(q, 20)] == [1, 6, 10, 15, 20]
    assert [p + 1 for p in resolve_positions(["first", "middle", "last"], 75)] == [1, 38, 75]
    assert resolve_positions(["first", "last", "1"], 1) == [0]
    with pytest.raises(PearError, match="outside 1..10"):
        resolve_positions(["11"], 10)
    with pytest.raises(PearError, match="bad position"):
        parse_positions("1,centre")


@pytest.mark.parametrize("k", [10, 20])
def test_mdqa_gold_position_and_distractors(data_dir, k):
    task = build_task(f"mdqa-{k}", BuildContext(data_dir, limit=40))
    qs = load_oracle(data_dir)
    assert task.conditions == [str(p) for p in ([1, 3, 5, 8, 10] if k == 10 else [1, 6, 10, 15, 20])]
    assert len(task.examples) == 40 * 5
    by_q = {}
    for ex in task.examples:
        q = qs[int(ex.id[1:])]
        docs = _docs(ex.prompt)
        assert [int(n) for n, _, _ in docs] == list(range(1, k + 1))  # numbering 1..K
        gold = int(ex.condition) - 1
        assert (docs[gold][1], docs[gold][2]) == (q["title"], q["text"])  # gold where it is said to be
        for i, (_, t, x) in enumerate(docs):
            if i != gold:
                assert not contains_answer(f"{t} {x}", q["answers"], ex.meta["whole_word_exclusion"]), (ex.id, t)
        assert len({(t, x) for _, t, x in docs}) == k  # no duplicates
        assert ex.prompt.endswith(f"\n\nQuestion: {q['question']}\nAnswer:")
        by_q.setdefault(ex.id, []).append([(t, x) for i, (_, t, x) in enumerate(docs) if i != gold])
    for lists in by_q.values():  # the same distractors, in the same order, at every position
        assert all(lst == lists[0] for lst in lists)


def test_mdqa_all_questions_distractors_clean(data_dir):
    """Every question of the file: no distractor contains an answer (as a substring of the
    normalised text; as whole words only for the few one- or two-letter answers like "S")."""
    task = build_task("mdqa-10", BuildContext(data_dir, positions=["first"]))
    qs = load_oracle(data_dir)
    assert len(task.examples) == len(qs) == 1770
    loose = [e for e in task.examples if e.meta["whole_word_exclusion"]]
    assert task.info["whole_word_exclusion"] == len(loose) < 20
    assert all(min(len(a) for a in qs[int(e.id[1:])]["answers"]) <= 3 for e in loose)
    for ex in task.examples:
        q = qs[int(ex.id[1:])]
        for _, t, x in _docs(ex.prompt)[1:]:
            assert not contains_answer(f"{t} {x}", q["answers"], ex.meta["whole_word_exclusion"])


def test_mdqa_is_deterministic_and_oracle_is_gold_only(data_dir):
    a = build_task("mdqa", BuildContext(data_dir, limit=5, positions=["middle"]))
    b = build_task("mdqa", BuildContext(data_dir, limit=5, positions=["middle"]))
    assert [e.prompt for e in a.examples] == [e.prompt for e in b.examples]
    o = build_task("oracle", BuildContext(data_dir, limit=3))
    assert o.conditions == ["1"] and all(len(_docs(e.prompt)) == 1 for e in o.examples)


def test_kv_gold_moved_and_order_kept(data_dir):
    task = build_task("kv", BuildContext(data_dir, limit=4))
    records = data.read_jsonl(data.data_file(data_dir, data.KV_75))
    assert task.conditions == ["1", "38", "75"]
    for ex in task.examples:
        rec = records[int(ex.id[2:])]
        blob = ex.prompt.split("JSON data:\n")[1].split("\n\nKey:")[0]
        pairs = list(json.loads(blob).items())  # the rendered object is valid JSON
        assert len(pairs) == 75 and pairs[int(ex.condition) - 1] == (rec["key"], rec["value"])
        rest = [tuple(p) for p in rec["ordered_kv_records"] if p[0] != rec["key"]]
        assert [p for p in pairs if p[0] != rec["key"]] == rest
        assert ex.prompt.endswith(f'Key: "{rec["key"]}"\nCorresponding value:') and ex.answers == [rec["value"]]


def test_kv_generator(data_dir):
    recs = make_kv_records(3, 12, seed=5)
    assert recs == make_kv_records(3, 12, seed=5) and recs != make_kv_records(3, 12, seed=6)
    for r in recs:
        assert len(r["ordered_kv_records"]) == 12 and [r["key"], r["value"]] in r["ordered_kv_records"]
        assert all(uuid.UUID(x).version == 4 for p in r["ordered_kv_records"] for x in p)
    task = build_task("kv-12", BuildContext(data_dir, limit=2, positions=["first", "last"]))
    assert task.conditions == ["1", "12"] and len(task.examples) == 4


def test_hotpotqa_gold_paragraphs_moved(data_dir):
    task = build_task("hotpotqa", BuildContext(data_dir, limit=10))
    assert task.conditions == ["1", "5", "9"]
    records = {r["_id"]: r for r in data.read_json(data.data_file(data_dir, data.HOTPOTQA))}
    for ex in task.examples:
        gold_titles = {t for t, _ in records[ex.id]["supporting_facts"]}
        docs = _docs(ex.prompt)
        p = int(ex.condition) - 1
        assert len(docs) == 10 and {docs[p][1], docs[p + 1][1]} == gold_titles
        assert not gold_titles & {t for i, (_, t, _) in enumerate(docs) if i not in (p, p + 1)}


def test_closedbook_and_mmlu(data_dir):
    cb = build_task("closedbook", BuildContext(data_dir, limit=3))
    assert [e.prompt for e in cb.examples] == [f"Question: {q['question']}\nAnswer:" for q in load_oracle(data_dir)[:3]]
    m0 = build_task("mmlu", BuildContext(data_dir, limit=57))
    assert len({e.meta["subject"] for e in m0.examples}) == 57  # round-robin over subjects
    assert all(e.answers[0] in "ABCD" and e.prompt.endswith("\nAnswer:") for e in m0.examples)
    m5 = build_task("mmlu-5shot", BuildContext(data_dir, limit=3))
    assert all(len(re.findall(r"\nAnswer: [ABCD]\n\n", e.prompt)) == 5 for e in m5.examples)


def test_missing_data_file_and_folder(tmp_path):
    where = r"'litm/nq-open-oracle.dev.jsonl.gz' not found in .*" + re.escape(tmp_path.name)
    with pytest.raises(PearError, match=where):
        build_task("mdqa", BuildContext(tmp_path, limit=2))
    with pytest.raises(PearError, match="does not exist"):
        data.resolve_data_dir(tmp_path / "nope")
    with pytest.raises(PearError, match="unknown task"):
        build_task("squad", BuildContext(tmp_path))


def test_lm_eval_export(data_dir, tmp_path):
    import yaml

    from pear.evaluate.lm_eval_export import export

    ctx = BuildContext(data_dir, limit=2)
    names = export(["mdqa-10", "kv", "mmlu"], tmp_path, ctx)
    assert names == ([f"pear_mdqa-10_pos{p}" for p in (1, 3, 5, 8, 10)]
                     + ["pear_kv_pos1", "pear_kv_pos38", "pear_kv_pos75", "pear_mmlu"])

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_multi_constructor("!", lambda loader, tag, node: f"{tag} {node.value}")
    cfg = yaml.load((tmp_path / "pear_mdqa-10_pos5.yaml").read_text(), Loader=Loader)
    assert cfg["generation_kwargs"] == {"until": ["\n"], "do_sample": False, "max_gen_toks": 100}
    assert cfg["process_results"] == "function pear_utils.process_qa"
    rows = [json.loads(x) for x in open(cfg["dataset_kwargs"]["data_files"]["test"])]
    task = build_task("mdqa-10", ctx)
    assert [r["prompt"] for r in rows] == [e.prompt for e in task.examples if e.condition == "5"]
    kv = yaml.load((tmp_path / "pear_kv_pos38.yaml").read_text(), Loader=Loader)
    assert kv["generation_kwargs"]["until"] == [] and kv["generation_kwargs"]["max_gen_toks"] == 128
    mm = yaml.load((tmp_path / "pear_mmlu.yaml").read_text(), Loader=Loader)
    assert mm["output_type"] == "multiple_choice" and mm["doc_to_choice"] == ["A", "B", "C", "D"]
    row = json.loads(open(tmp_path / "pear_mmlu.jsonl").readline())
    assert "ABCD"[row["target"]] == row["answers"][0]
    assert "from pear.evaluate.metrics import" in (tmp_path / "pear_utils.py").read_text()

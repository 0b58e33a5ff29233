"""Key-value retrieval (Liu et al., 2023): find one UUID key's value in a JSON object.

`kv` reads the 75-key development file; `kv-N` generates records with N pairs by the same
recipe (uuid4 keys and values, seeded). The gold pair is moved to each requested position,
the other pairs keep their order. Scored on the whole output (reference
`evaluate_kv_responses.py`): 1 if the value appears in it, case-insensitive.
"""

from __future__ import annotations

import random
import uuid

from ...errors import PearError
from .. import data
from ..metrics import kv_score
from ..prompts import kv_prompt
from ..registry import BuildContext, Example, Task, register_task, resolve_positions, take

DEFAULT_POSITIONS = ["first", "middle", "last"]
GENERATED_RECORDS = 500
MAX_NEW_TOKENS = 128  # a UUID is ~32 Qwen tokens, and models often say a sentence first


def make_kv_records(n_records: int, n_pairs: int, seed: int = 0) -> list[dict]:
    """Records in the file's format: {ordered_kv_records: [[k, v], ...], key, value}."""
    if n_pairs < 2:
        raise PearError(f"kv: need at least 2 pairs, got {n_pairs}")
    rng = random.Random(seed)

    def u() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    out = []
    for _ in range(n_records):
        pairs = [[u(), u()] for _ in range(n_pairs)]
        k, v = pairs[rng.randrange(n_pairs)]
        out.append({"ordered_kv_records": pairs, "key": k, "value": v})
    return out


def move_gold(pairs: list, key: str, index: int) -> list[tuple[str, str]]:
    gold = [tuple(p) for p in pairs if p[0] == key]
    if len(gold) != 1:
        raise PearError(f"kv: key {key} occurs {len(gold)} times in its record")
    rest = [tuple(p) for p in pairs if p[0] != key]
    return rest[:index] + gold + rest[index:]


@register_task("kv", "key-value retrieval, 75 keys from the data file (kv-N: N generated pairs)")
def kv(param: str | None, ctx: BuildContext) -> Task:
    if param is None:
        records, source = data.read_jsonl(data.data_file(ctx.data_dir, data.KV_75)), data.KV_75
    elif param.isdigit():
        records, source = make_kv_records(GENERATED_RECORDS, int(param), ctx.seed), f"generated (seed {ctx.seed})"
    else:
        raise PearError(f"kv-{param}: the parameter is the number of pairs, e.g. kv-140")
    records = take(records, ctx.limit, ctx.half)
    n_pairs = {len(r["ordered_kv_records"]) for r in records}
    if len(n_pairs) != 1:
        raise PearError(f"kv: records have different numbers of pairs {sorted(n_pairs)}")
    n = n_pairs.pop()
    positions = resolve_positions(ctx.positions or DEFAULT_POSITIONS, n)
    examples = [Example(id=f"kv{i}", condition=str(p + 1),
                        prompt=kv_prompt(move_gold(r["ordered_kv_records"], r["key"], p), r["key"]),
                        answers=[r["value"]], meta={"gold_index": p, "key": r["key"]})
                for i, r in enumerate(records) for p in positions]
    return Task(name="kv", kind="generate", examples=examples, metric="value_in_output",
                score=lambda out, ex: kv_score(out, ex.answers[0]),
                done=lambda out, ex: kv_score(out, ex.answers[0]) == 1.0,
                max_new_tokens=MAX_NEW_TOKENS, positional=True,
                info={"pairs": n, "records": len(records), "source": source, "positions": [p + 1 for p in positions]})

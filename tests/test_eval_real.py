"""On the real default model: our decoder equals `generate`, and a small eval shows that the
model uses its context (oracle-passage accuracy above closed-book accuracy)."""

import pytest
import torch

from pear.evaluate import evaluate
from pear.evaluate.generate import eos_token_ids, greedy_generate
from pear.evaluate.prompts import render

pytestmark = [pytest.mark.real, pytest.mark.data]


def test_greedy_decoder_equals_generate(smollm2):
    model, tok = smollm2
    prompts = ["Question: what is the capital of France?\nAnswer:", "Name three colours.",
               "Write a high-quality answer for the given question.\n\nQuestion: who wrote Hamlet?\nAnswer:"]
    ids = [tok(render(tok, p, True), add_special_tokens=False).input_ids for p in prompts]
    eos = eos_token_ids(model, tok)
    ours = greedy_generate(model, ids, pad_id=tok.pad_token_id, eos_ids=eos, max_new_tokens=12, device="cpu",
                           batch_size=3)  # one left-padded batch
    for x, o in zip(ids, ours):
        ref = model.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long), do_sample=False,
                             max_new_tokens=12, eos_token_id=sorted(eos), pad_token_id=tok.pad_token_id)[0, len(x):]
        assert o == [t for t in ref.tolist() if t not in eos]
    assert "Paris" in tok.decode(ours[0])


def test_oracle_beats_closedbook(smollm2_fast, data_dir):
    res = evaluate([smollm2_fast], ["oracle", "closedbook"], data_dir=data_dir, limit=16, batch_size=16,
                   progress=False, n_resamples=200, log_samples=True)
    oracle = res["tasks"]["oracle"]["models"]["smollm2-135m"]["1"]
    closed = res["tasks"]["closedbook"]["models"]["smollm2-135m"]["all"]
    assert oracle["n"] == closed["n"] == 16
    assert oracle["accuracy"] > closed["accuracy"]
    outs = [s for s in res["samples"] if s["task"] == "oracle"]
    assert all(s["n_new_tokens"] <= 100 and "\n" not in s["output"].strip() for s in outs)  # stopped at the line


def test_static_decoding_equals_eager_on_mdqa(smollm2, data_dir):
    """`pear eval --decode static` on the real model: the same answers on multi-document QA as
    the eager loop (fp32, on CPU: the static cache without compilation)."""
    kw = dict(data_dir=data_dir, limit=1, positions="1,10", max_new_tokens=16, batch_size=2, progress=False,
              n_resamples=10, log_samples=True)
    eager = evaluate([smollm2], ["mdqa-10"], **kw)
    static = evaluate([smollm2], ["mdqa-10"], decode="static", **kw)
    assert static["models"][0]["decode"] == "static"
    outs = [[(s["output"], s["n_new_tokens"]) for s in r["samples"]] for r in (eager, static)]
    assert len(outs[0]) == 2 and outs[0] == outs[1]
    assert any(n > 1 for _, n in outs[0])  # real answers, not an immediate stop

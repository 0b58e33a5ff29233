"""``copy``: the paper's proxy, unchanged — [BOS] x1..xn x1..xn of distinct random tokens,
cross-entropy of x2..xn of the second copy (`pear.proxy`). ``length`` is n."""

from __future__ import annotations

from ..proxy import ProxyBatch, make_model_batch
from . import Objective, register


@register("copy")
class Copy(Objective):
    OPTIONS = {"length": 50}
    short = True  # 2n + 1 tokens

    def batch(self, model, tokenizer, n: int, seed: int) -> ProxyBatch:
        return make_model_batch(model, tokenizer, n, self.options["length"], seed=seed)

    def split(self, batch: ProxyBatch, size: int | None) -> list[ProxyBatch]:
        return [ProxyBatch(c, batch.n, batch.offset) for c in batch.input_ids.split(size or len(batch.input_ids))]

    def loss(self, model, batch: ProxyBatch, scaling):
        from ..fit import _nll, scored_logits

        return _nll(scored_logits(model, batch), batch).mean()

"""``long-copy``: copying at the range where lost-in-the-middle happens.

Sequence ([BOS] +) filler[:d] + span + filler[d:] + span, ``context`` tokens in all; span =
``span`` distinct random tokens, placed at a uniformly random depth d; filler = random tokens
that never occur in the span (so the continuation is determined). Loss: cross-entropy of the
span's tokens 2..n in the final repeat, as in the paper's proxy, but the copy source now sits
anywhere in a long context instead of right before the repeat.
"""

from __future__ import annotations

import torch

from ..errors import PearError
from ..proxy import allowed_token_ids
from . import Objective, Sequence, pad_id_of, register, target_nll


@register("long-copy")
class LongCopy(Objective):
    OPTIONS = {"context": 2048, "span": 50}

    def check(self):
        c, s = self.options["context"], self.options["span"]
        if s < 2 or c < 2 * s + 1:
            raise PearError(f"long-copy: need span >= 2 and context >= 2 * span + 1, got context {c}, span {s}")

    def batch(self, model, tokenizer, n: int, seed: int) -> list[Sequence]:
        g = torch.Generator().manual_seed(seed)
        vocab = model.get_input_embeddings().weight.shape[0]
        allowed = allowed_token_ids(tokenizer, vocab)
        c, s = self.options["context"], self.options["span"]
        if s >= len(allowed):
            raise PearError(f"long-copy: span {s} exceeds the {len(allowed)} usable tokens")
        bos = getattr(tokenizer, "bos_token_id", None)
        body = c - (bos is not None)
        n_fill = body - 2 * s
        out = []
        for _ in range(n):
            perm = allowed[torch.randperm(len(allowed), generator=g)]
            span, rest = perm[:s], perm[s:]
            filler = rest[torch.randint(len(rest), (n_fill,), generator=g)]
            d = int(torch.randint(n_fill + 1, (1,), generator=g))
            ids = ([bos] if bos is not None else []) + filler[:d].tolist() + span.tolist() + filler[d:].tolist() \
                + span.tolist()
            out.append(Sequence(ids, s - 1, meta={"depth": d + (bos is not None)}))
        return out

    def loss(self, model, batch, scaling):
        return target_nll(model, batch, pad_id_of(None))

"""Discovery's cost model: the progress bar's time-left estimate, in block-token units."""

from __future__ import annotations

import sys

from torch import nn

from ..families import Arch
from ..proxy import ProxyBatch


class _Work:
    """Cost model for the progress bar's time-left estimate, in block-token units: one decoder
    block on one token costs 1, the LM head on one token `lm` (its weights over a block's)."""

    def __init__(self, model: nn.Module, arch: Arch):
        block = model.get_submodule(arch.family.blocks)[0]
        self.L = arch.n_layers
        self.lm = model.get_output_embeddings().weight.numel() / max(1, sum(p.numel() for p in block.parameters()))

    def clean(self, batch: ProxyBatch, grad: bool) -> int:  # integers: sums are exact, the bar ends at 100%
        N, T = batch.input_ids.shape
        return round((N + 1) * T * self.L + N * (batch.n - 1) * self.lm + (2 * N * batch.n * self.L if grad else 0))

    def ablation(self, batch: ProxyBatch, layer: int) -> int:
        N = batch.input_ids.shape[0]
        return round(N * batch.n * (self.L - layer) + N * (batch.n - 1) * self.lm)


def _progress(total_work: float, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total_work, desc=desc, file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]{postfix}")
    bar.set_postfix_str("clean passes")
    return bar

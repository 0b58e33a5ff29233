"""Objectives for the coefficients: what the scales are trained to do, model frozen.

Each objective is a small module with the same interface (`Objective`), registered by name:

* ``copy`` — the paper's proxy (arXiv 2409.19745): random tokens x1..xn repeated, loss on
  the second copy. Unchanged; ``--recipe paper`` uses it.
* ``long-copy`` — the same copying at realistic range: a span at a random depth of a
  1-4k-token sequence of random filler, repeated at the end; loss on the repeat.
* ``retrieval`` — synthetic in-context retrieval, the answer at a uniformly random position
  of a long context: multi-passage QA built from SQuAD 2.0 (no evaluation task uses it) in the
  multi-document QA format, and/or key-value lookups of fresh random UUIDs (SEAL, arXiv
  2501.15225, trains its scales on ~50 such samples in the task's format).
* ``position-distill`` — the same question with the relevant passage first and in the middle
  of distractors: KL(base model, passage first ‖ scaled model, passage in the middle), on
  SQuAD 2.0 (after Pos2Distill, arXiv 2508.15709, which distils all weights instead).

Every batch is a pure function of (objective, options, seed): `batch(model, tokenizer, n, seed)`.
`loss(model, batch, scaling)` is the mean loss over the batch, differentiable in the scales;
`scaling.disabled()` gives the base model (distillation's teacher).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import PearError

OBJECTIVES: dict[str, type["Objective"]] = {}


def register(name: str) -> Callable:
    def deco(cls):
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return deco


class Objective:
    """Base class. Options are keyword arguments with defaults (``OPTIONS``), given on the
    command line as ``--objective-option KEY=VALUE``."""

    name = ""
    OPTIONS: dict[str, object] = {}
    needs_data = False  # reads the data folder ($PEAR_DATA / --data-dir)
    short = False  # sequences of ~100 tokens: on CPU the fit runs eager attention (`training.cpu_attention`)

    def __init__(self, data_dir=None, **options):
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise PearError(f"objective {self.name}: unknown option(s) {', '.join(unknown)}; "
                            f"known: {', '.join(self.OPTIONS) or 'none'}")
        self.options = {k: _cast(self.name, k, v, self.OPTIONS[k]) for k, v in {**self.OPTIONS, **options}.items()}
        self.data_dir = data_dir
        self.check()

    def check(self) -> None:
        """Validate options before any model work (raise PearError)."""

    def check_data(self) -> None:
        """Fail before any model work when the data this objective reads is missing."""
        if self.needs_data:
            from . import squad

            squad.path(self.data_dir)

    def batch(self, model, tokenizer, n: int, seed: int):
        raise NotImplementedError

    def split(self, batch, size: int | None) -> list:
        """Micro-batches of at most `size` sequences (None: the whole batch)."""
        return chunks(batch, size)

    def loss(self, model, batch, scaling) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"objective": self.name, "options": dict(self.options)}


def chunks(seqs: list, size: int | None) -> list[list]:
    """`seqs` in consecutive micro-batches of at most `size` (None: all at once)."""
    size = size or len(seqs)
    return [seqs[i:i + size] for i in range(0, len(seqs), size)]


def _cast(obj: str, key: str, value, default):
    if isinstance(value, type(default)) or default is None:
        return value
    try:
        return type(default)(value) if not isinstance(default, bool) else str(value).lower() in ("1", "true", "yes")
    except (TypeError, ValueError):
        raise PearError(f"objective {obj}: option {key} must be {type(default).__name__}, got '{value}'") from None


def get_objective(name: str, options: dict | None = None, data_dir=None) -> Objective:
    if name not in OBJECTIVES:
        raise PearError(f"unknown objective '{name}'; use one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](data_dir=data_dir, **(options or {}))


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise PearError(f"--objective-option expects KEY=VALUE, got '{p}'")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# ---------------------------------------------------------------------------- text sequences
@dataclass
class Sequence:
    """Token ids whose last `n_target` tokens are scored (predicted from the ones before)."""

    ids: list[int]
    n_target: int
    teacher_ids: list[int] | None = None  # distillation: the teacher's sequence, same target tokens at its end
    meta: dict | None = None  # where the answer was put (gold document index, copy depth, ...)

    def __len__(self) -> int:
        return len(self.ids)


def answer_logprobs(model, seqs: list[list[int]], n_targets: list[int], pad_id: int = 0):
    """Log-probabilities at the target positions of sequences of different lengths, in one pass.

    Returns (logp (B, A, V) fp32, targets (B, A), mask (B, A)), A = max target count; row i's
    targets are its last n_targets[i] tokens, aligned at the right.

    Why right padding and no attention mask: under causal attention no real token sees the pads
    after it, so each row computes what it would alone (to kernel rounding), several sequences
    of different lengths share one pass, and no query row is fully masked. (Left padding with a
    mask makes fully masked pad rows; their NaN activations met a zero gradient in the head
    hooks, NaN x 0 = NaN in the scales' gradient, which forced one sequence per pass.)
    Only the predicting positions go through the LM head: a pre-hook on the head keeps each
    row's own A positions, so the head makes (B, A, V) logits, not (B, T, V).
    """
    device = model.get_input_embeddings().weight.device
    B, T, A = len(seqs), max(len(s) for s in seqs), max(n_targets)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    ids = ids.to(device)
    lengths = torch.tensor([len(s) for s in seqs], device=device)
    n = torch.tensor(n_targets, device=device)
    slot = torch.arange(A, device=device)[None, :]  # (1, A)
    tmask = slot >= (A - n)[:, None]  # (B, A): row i's targets fill its last n_i slots
    tpos = (lengths[:, None] - A + slot).clamp(min=1)  # (B, A) target positions (unused slots: any valid one)
    pred = tpos - 1  # (B, A) the positions that predict them

    def own_positions(_module, args):  # hidden states (B, T, D) -> (B, A, D): each row's own positions
        h = args[0]
        idx = pred.to(h.device)[..., None].expand(-1, -1, h.shape[-1])  # the head may sit on another GPU
        return (h.gather(1, idx),) + tuple(args[1:])

    hook = model.get_output_embeddings().register_forward_pre_hook(own_positions)
    try:
        logits = model(ids, use_cache=False).logits  # (B, A, V)
    finally:
        hook.remove()
    targets = ids.gather(1, tpos)  # (B, A)
    return logits.float().log_softmax(-1), targets.to(logits.device), tmask.to(logits.device)


def sequence_nll(model, seqs: list[list[int]], n_targets: list[int], pad_id: int = 0) -> torch.Tensor:
    """Each sequence's mean cross-entropy of its last n_targets[i] tokens, (B,), in one pass."""
    lp, tgt, m = answer_logprobs(model, seqs, n_targets, pad_id)
    nll = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * m  # (B, A)
    return nll.sum(1) / m.sum(1)


def target_nll(model, batch: list[Sequence], pad_id: int = 0) -> torch.Tensor:
    """Mean over sequences of the mean cross-entropy of their target tokens (scalar)."""
    return sequence_nll(model, [s.ids for s in batch], [s.n_target for s in batch], pad_id).mean()


def pad_id_of(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None) if tokenizer is not None else None
        if isinstance(v, int):
            return v
    return 0


from . import proxy_copy, long_copy, retrieval, position_distill  # noqa: E402,F401  (register)

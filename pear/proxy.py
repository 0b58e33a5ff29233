"""The proxy task: copy a random token sequence. ``[BOS] x1..xn x1..xn``.

A model that reads its context well copies the second half from the first. PEAR finds and
re-weights the heads that *suppress* this copying, so the task needs no labelled data.

Tokens are drawn uniformly from the vocabulary with every special and added token
excluded, distinct within a sequence (so the next token is always determined by the first
occurrence of the current one), and seeded. Metrics are taken on the second half only, on
the n-1 tokens x2..xn of the second copy: those are determined by copying, whereas x1 of
the second copy is not (nothing says a repetition starts).

Shapes: N sequences, T = b + 2n tokens each (b = 1 with a BOS token, else 0).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .errors import PearError

# The paper's (N samples, n length) settings for discovery.
DEFAULT_SETTINGS: list[tuple[int, int]] = [(20, 50), (40, 25), (80, 15), (100, 10)]


def parse_settings(text: str | None) -> list[tuple[int, int]]:
    """``"20x50,40x25"`` -> ``[(20, 50), (40, 25)]``; None -> the paper's settings."""
    if text is None or text == "":
        return list(DEFAULT_SETTINGS)
    out = []
    for part in text.split(","):
        try:
            n_samples, length = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise PearError(f"bad proxy setting '{part}': expected NxLEN, e.g. 20x50") from None
        if n_samples < 1 or length < 2:
            raise PearError(f"bad proxy setting '{part}': need N >= 1 samples and length >= 2")
        out.append((n_samples, length))
    return out


def allowed_token_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """Ids in [0, vocab_size) that are neither special nor added tokens. (V',)"""
    limit = vocab_size if tokenizer is None else min(vocab_size, len(tokenizer))
    banned = set()
    if tokenizer is not None:
        banned.update(i for i in tokenizer.all_special_ids if i is not None)
        banned.update(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    keep = torch.ones(limit, dtype=torch.bool)
    idx = [i for i in banned if 0 <= i < limit]
    if idx:
        keep[torch.tensor(idx)] = False
    return keep.nonzero().squeeze(1)


@dataclass
class ProxyBatch:
    """A batch of repeated random sequences and where to score them."""

    input_ids: torch.Tensor  # (N, T)
    n: int  # length of one copy
    offset: int  # 1 if a BOS token was prepended, else 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def pred_positions(self) -> torch.Tensor:
        """Positions whose next-token prediction is scored: x1..x(n-1) of the second copy. (n-1,)"""
        start = self.offset + self.n
        return torch.arange(start, start + self.n - 1)

    @property
    def targets(self) -> torch.Tensor:
        """The tokens those positions should predict: x2..xn of the second copy. (N, n-1)"""
        return self.input_ids[:, self.pred_positions + 1]

    def to(self, device) -> "ProxyBatch":
        return ProxyBatch(self.input_ids.to(device), self.n, self.offset)


def make_batch(tokenizer, vocab_size: int, n_samples: int, length: int, seed: int | torch.Generator = 0,
               allowed: torch.Tensor | None = None) -> ProxyBatch:
    """`n_samples` sequences of `length` distinct random tokens, repeated twice, BOS first if any."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    allowed = allowed_token_ids(tokenizer, vocab_size) if allowed is None else allowed
    if length > len(allowed):
        raise PearError(f"proxy length {length} exceeds the {len(allowed)} usable tokens")
    # distinct tokens per row: the first `length` of a random permutation of the allowed ids
    pick = torch.rand(n_samples, len(allowed), generator=g).argsort(dim=1)[:, :length]  # (N, n)
    x = allowed[pick]  # (N, n)
    ids = torch.cat([x, x], dim=1)  # (N, 2n)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is not None:
        ids = torch.cat([torch.full((n_samples, 1), bos, dtype=ids.dtype), ids], dim=1)
    return ProxyBatch(ids, length, 1 if bos is not None else 0)


def make_model_batch(model, tokenizer, n_samples: int, length: int, seed: int | torch.Generator = 0) -> ProxyBatch:
    """`make_batch` with the vocabulary size read from the model, placed on the model's device."""
    vocab = model.get_input_embeddings().weight.shape[0]
    return make_batch(tokenizer, vocab, n_samples, length, seed).to(model.device)


# ---------------------------------------------------------------------------- metrics
def target_logprobs(logits: torch.Tensor, batch: ProxyBatch) -> torch.Tensor:
    """log p(correct next token) at the scored positions. logits (N, T, V) -> (N, n-1), fp32."""
    lp = logits[:, batch.pred_positions].float().log_softmax(-1)  # (N, n-1, V)
    return lp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)


def copy_probability(logits: torch.Tensor, batch: ProxyBatch) -> torch.Tensor:
    """Mean probability of the correct next token on the second half (scalar)."""
    return target_logprobs(logits, batch).exp().mean()


def copy_loss(logits: torch.Tensor, batch: ProxyBatch) -> torch.Tensor:
    """Cross-entropy of the correct next token on the second half (scalar, differentiable)."""
    return -target_logprobs(logits, batch).mean()


def copy_accuracy(logits: torch.Tensor, batch: ProxyBatch) -> torch.Tensor:
    """Fraction of second-half positions where the argmax is the correct token (scalar)."""
    pred = logits[:, batch.pred_positions].argmax(-1)  # (N, n-1)
    return (pred == batch.targets).float().mean()


# ---------------------------------------------------------------------------- metrics
def _supports_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def scored_logits(model, batch: ProxyBatch) -> torch.Tensor:
    """Logits at the scored positions only. (N, n-1, V)

    The LM head is a large share of a small model's compute; scored positions are under
    half the sequence, so only those go through it (`logits_to_keep` with indices).
    """
    pos = batch.pred_positions  # contiguous: x1..x(n-1) of the second copy
    if _supports_logits_to_keep(model):
        # an int (keep the last T - pos[0] positions), not an index tensor: accelerate's
        # device_map hooks move tensor arguments to the first GPU, the hidden states live on the last
        keep = batch.input_ids.shape[1] - int(pos[0])
        # hidden[:, -keep:] is not contiguous; when it requires grad, torch.matmul then does not
        # fold it into one matrix product but broadcasts the LM head weight over the batch (a
        # batch x vocab x d copy: ~40 % of a training step on SmolLM2). Make it contiguous first.
        head = model.get_output_embeddings()
        handle = None if head is None else head.register_forward_pre_hook(
            lambda m, args: (args[0].contiguous(), *args[1:]))
        try:
            return model(batch.input_ids, use_cache=False, logits_to_keep=keep).logits[:, : len(pos)]
        finally:
            if handle is not None:
                handle.remove()
    return model(batch.input_ids, use_cache=False).logits[:, pos]


def _nll(logits: torch.Tensor, batch: ProxyBatch) -> torch.Tensor:
    """Per-position cross-entropy in fp32. (N, n-1, V) -> (N, n-1)"""
    lp = logits.float().log_softmax(-1)
    return -lp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)


CPU_TOKENS_PER_FORWARD = 1024
GPU_TOKENS_PER_FORWARD = 8192


def default_micro_batch(model, length: int, tokens: int | None = None) -> int | None:
    """Sequences per forward pass when none is given: on CPU about 1,000 tokens (10 sequences
    at n = 50), which keeps activations in cache: a training step of 20 sequences on
    SmolLM2-135M (bf16, 2 cores) takes ~15 % less time as 2 x 10 than as 1 x 20. On GPUs the
    whole copy-proxy batch; long sequences (`tokens` each) in micro-batches of ~8k tokens,
    which bounds the activations kept for the backward pass. Same gradient either way
    (accumulated, weighted by micro-batch size)."""
    per_seq = tokens or (2 * length + 1)
    if next(model.parameters()).device.type != "cpu":
        return None if tokens is None else max(1, GPU_TOKENS_PER_FORWARD // per_seq)
    return max(1, CPU_TOKENS_PER_FORWARD // per_seq)




def _chunks(batch: ProxyBatch, micro: int | None) -> list[ProxyBatch]:
    ids = batch.input_ids
    size = micro or len(ids)
    return [ProxyBatch(c, batch.n, batch.offset) for c in ids.split(size)]


@torch.no_grad()
def proxy_metrics(model, batch: ProxyBatch, micro_batch: int | None = None) -> dict[str, float]:
    """Held-out proxy loss (cross-entropy, second copy) and copy accuracy (argmax)."""
    micro_batch = micro_batch or default_micro_batch(model, batch.n)
    nll, correct, count = 0.0, 0.0, 0
    for b in _chunks(batch, micro_batch):
        logits = scored_logits(model, b)
        nll += float(_nll(logits, b).sum())
        correct += float((logits.argmax(-1) == b.targets).sum())
        count += b.targets.numel()
    return {"proxy_loss": nll / count, "copy_accuracy": correct / count}

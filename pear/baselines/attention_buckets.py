"""Attention Buckets (Chen et al. 2023, "Fortify the Shortest Stave in Attention", arXiv 2312.04455).

The same input is run N times in parallel, each copy with a different RoPE base, so that the
troughs of one base's long-distance attention decay are covered by another's; at every
decoding step the N next-token distributions are combined, weighted by each run's confidence.

What we follow:
- bases 10000, 17500, 18000, 19000, 20000, 25000 (our default set; the paper's RAG
  code also tries 10000..28000), scaled to the model's own base: ``b * model_base / 10000``
  (Gemma 3: per layer type, each against its own base);
- confidence weights as in the reference code (github.com/AlibabaResearch/DAMO-ConvAI,
  attention-buckets/modeling_llama.py, ``LlamaForCausalLM.forward`` with ``base_mean``):
  ``alpha = softmax over runs of each run's maximum logit``;
- combination as the paper describes it: the weighted sum of the runs' *distributions*,
  ``p = sum_j alpha_j softmax(z_j)``; we return ``log p`` as logits, so greedy decoding and
  log-likelihood scoring both see the combined distribution. ``combine="logits"`` gives the
  reference code's literal rule instead (weighted sum of raw logits).
With one bucket at the model's own base, ``log p`` is the base model's log-softmax exactly.

How, without copying modeling files: the wrapper repeats the B rows N times (bucket-major:
rows j*B .. j*B+B-1 are bucket j) and a forward hook on the family's shared rotary module
replaces its (cos, sin) by per-row values computed from each bucket's inverse frequencies
(made by transformers' own RoPE initialisation for the model's RoPE type, with only the base
changed). The cache holds N*B rows and is returned opaquely. Cost: N times the compute and
KV cache of the base model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import PearError
from . import Variant, WrappedModel, register
from .rope import attention_scaling, base_of, inv_freq, inv_freq_for_base, require_rope, unwrap

DEFAULT_BASES = (10000.0, 17500.0, 18000.0, 19000.0, 20000.0, 25000.0)
REFERENCE_BASE = 10000.0  # the paper's bases are for Llama-2 (base 10000)
_ATTR = "_pear_buckets"


@dataclass
class _Table:
    inv: torch.Tensor  # (N, F) fp32: each bucket's inverse frequencies
    scaling: torch.Tensor  # (N,) fp32: each bucket's cos/sin post-scaling (1.0 for default RoPE)
    bases: list[float]


class AttentionBuckets(WrappedModel):
    """Callable with the HF causal-LM forward signature; use inside `wrap(...)`."""

    name = "attention-buckets"

    def __init__(self, model, bases=DEFAULT_BASES, scale_to_model: bool = True, combine: str = "probs"):
        self.arch, self.rotary = require_rope("attention-buckets", model)
        bases = [float(b) for b in bases]
        if not bases or any(b <= 1 for b in bases):
            raise PearError(f"attention-buckets bases must be numbers > 1, got {bases}")
        if combine not in ("probs", "logits"):
            raise PearError(f"attention-buckets combine must be 'probs' or 'logits', got '{combine}'")
        self.model, self.n, self.combine = model, len(bases), combine
        types = getattr(self.rotary, "layer_types", None)  # Gemma 3: one RoPE per layer type
        self.tables = {lt: self._table(lt, bases, scale_to_model) for lt in (types or [None])}
        self.batch: int | None = None  # rows per bucket during a call; None outside calls

    def _table(self, ltype, bases, scale_to_model) -> _Table:
        own = base_of(self.rotary, ltype)
        own_inv = inv_freq(self.rotary, ltype).float()
        check, _ = inv_freq_for_base(self.rotary, own, ltype)
        if check.shape != own_inv.shape or not torch.allclose(check, own_inv, rtol=1e-4):
            raise PearError(f"attention-buckets: could not reproduce this model's RoPE frequencies "
                            f"(rope type {self.rotary.rope_type}); not supported")
        invs, scales, used = [], [], []
        for b in bases:
            b = b * own / REFERENCE_BASE if scale_to_model else b
            if abs(b - own) <= 1e-9 * own:  # the model's own base: use its own buffer, bit for bit
                inv, sc = own_inv, attention_scaling(self.rotary, ltype)
            else:
                inv, sc = inv_freq_for_base(self.rotary, b, ltype)
            invs.append(inv)
            scales.append(float(sc))
            used.append(b)
        return _Table(torch.stack(invs), torch.tensor(scales, device=own_inv.device), used)

    @property
    def bases(self) -> dict:
        return {lt: t.bases for lt, t in self.tables.items()}

    # -- the rotary hook: per-row cos/sin
    def _hook(self, module, args, kwargs, output):
        if self.batch is None:
            return None
        x = args[0] if args else kwargs["x"]
        pos = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
        ltype = kwargs["layer_type"] if "layer_type" in kwargs else (args[2] if len(args) > 2 else None)
        t = self.tables[ltype]
        B = self.batch
        pos = pos.expand(self.n * B, pos.shape[-1]) if pos.shape[0] == 1 else pos
        inv = t.inv.to(x.device).repeat_interleave(B, dim=0)  # (N*B, F), bucket-major
        scale = t.scaling.to(x.device).repeat_interleave(B)[:, None, None]
        freqs = pos[..., None].float() * inv[:, None, :]  # (N*B, T, F)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)

    @contextlib.contextmanager
    def active(self):
        handle = self.rotary.register_forward_hook(self._hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()
            self.batch = None

    # -- forward
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache=None, inputs_embeds=None, **kwargs):
        x = input_ids if input_ids is not None else inputs_embeds
        B, T = x.shape[:2]
        past = 0
        if past_key_values is not None:
            past = past_key_values.get_seq_length()
            if past > 0 and getattr(past_key_values, _ATTR, None) != self.n:
                raise PearError("attention-buckets: this cache was not filled through the same attention-buckets "
                                "wrapper; start from past_key_values=None")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        rep = lambda t: None if t is None else t.repeat(self.n, *([1] * (t.ndim - 1)))  # noqa: E731
        self.batch = B
        try:
            out = self.model(input_ids=rep(input_ids), attention_mask=rep(attention_mask),
                             position_ids=rep(position_ids.expand(B, T)), past_key_values=past_key_values,
                             use_cache=use_cache, inputs_embeds=rep(inputs_embeds), **kwargs)
        finally:
            self.batch = None
        cache = getattr(out, "past_key_values", None)
        if cache is not None:
            setattr(cache, _ATTR, self.n)
        z = out.logits.float()
        logits = combine_runs(z.view(self.n, B, *z.shape[1:]), self.combine)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)

    def select_cache_rows(self, past, keep: torch.Tensor, rows: int) -> bool:
        """Keep only batch rows `keep` (of `rows`) of a cache filled through this wrapper: the
        same rows of every bucket's copy (the cache holds N*rows rows, bucket-major)."""
        if getattr(past, _ATTR, None) != self.n or not hasattr(past, "batch_select_indices"):
            return False
        past.batch_select_indices(torch.cat([keep + j * rows for j in range(self.n)]))
        return True



def combine_runs(z: torch.Tensor, how: str = "probs") -> torch.Tensor:
    """Combine N runs' logits z (N, B, T, V) into (B, T, V), weighted by confidence.

    alpha_j = softmax_j(max_v z_j); "probs": log sum_j alpha_j softmax(z_j); "logits": sum_j alpha_j z_j.
    """
    log_alpha = z.amax(-1).log_softmax(0)  # (N, B, T)
    if how == "logits":
        return (log_alpha.exp()[..., None] * z).sum(0)
    return torch.logsumexp(log_alpha[..., None] + z.log_softmax(-1), dim=0)


# ---------------------------------------------------------------------------- registry
@contextlib.contextmanager
def wrap(loaded, *, bases=DEFAULT_BASES, scale_to_model: bool = True, combine: str = "probs"):
    """``with wrap(loaded) as lm:`` -- `lm(...)` runs the N bucket copies and combines them."""
    lm = AttentionBuckets(unwrap(loaded), bases=bases, scale_to_model=scale_to_model, combine=combine)
    with lm.active():
        yield lm


register(Variant("attention-buckets", "Attention Buckets: parallel runs with RoPE bases 10000..25000 (scaled to the "
                 "model's base), distributions combined by confidence (arXiv 2312.04455)", wrap, needs_rope=True,
                 memory=lambda bases=DEFAULT_BASES, **_: len(bases)))  # one run, one cache, per base

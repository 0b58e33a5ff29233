"""Ms-PoE (Zhang et al. 2024, "Found in the Middle", arXiv 2403.04797) as an inference-time variant.

Ms-PoE rescales RoPE position indices per attention head: head h of a layer sees positions
p / r_h, with ratios spread linearly from 1.2 to 1.8 over the heads of the layer. Which head
gets which ratio depends on its position-awareness ("outlier") score, measured once on the
prompt; layers 0 and 1 are left alone; nothing is trained.

What we follow, from the reference code (github.com/VITA-Group/Ms-PoE,
utils/modify_arch/llama.py) and the paper:
- ratios: ``r_i = min + (max - min) * i / H`` for i = 0..H-1 (the reference's formula, so the
  largest ratio is a little below `max`);
- outlier score of a head: on the first forward (the prompt), attention of the last prompt
  token computed from q and k *before* RoPE, scaled and causally masked; the score is the
  fraction of keys whose weight exceeds 4x the mean weight (4 / number of visible keys);
- the head with the highest score (most position-aware) gets the smallest ratio, "assigning
  larger ratios to less position-aware heads" (paper). The reference code indexes its ratio
  table by ``argsort`` directly, which is that rule only when the permutation is its own
  inverse; we assign by rank, as the paper describes;
- applied from layer 2 on (the reference runs use layers 2..31 of 32).
Our generalisations: ratios and scores are per batch row (the reference runs one prompt at a
time); with grouped-query attention each *query* head attends to keys rotated with its own
ratio (the reference rotates each KV head with the ratio of its first query head, which only
agrees when there is one query head per KV head).

How, without copying modeling files: a registered attention function (transformers'
``AttentionInterface``) receives q and k already rotated to their positions p; rotations
compose, so an extra rotation by ``p * (1/r_h - 1) * inv_freq`` per query head, applied to q and
to the keys repeated to query heads, gives RoPE at p / r_h. It then calls the model's original
attention function (sdpa, eager, flash, ...). Query and key positions come from the wrapper,
which tracks every position in the cache (left padding included), so decoding with a cache
works. With all ratios 1.0 every extra rotation is the identity and the original attention call
is made unchanged, so logits are exactly the base's (repeating K/V to query heads would
otherwise change how sdpa groups a 16-bit GQA computation, by rounding).
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import PearError
from . import Variant, WrappedModel, register
from .attention import ModuleView, attention_modules, original_function, require_attention_interface, switched_attention
from .rope import Positions, inv_freq, layer_type, require_rope, rotate, track_positions, unwrap

DEFAULT_MIN_RATIO = 1.2
DEFAULT_MAX_RATIO = 1.8
FIRST_LAYER = 2  # layers 0 and 1 keep plain RoPE
_ATTR = "_pear_ms_poe"  # set on attention modules (and caches) while wrapped
_PREFIX = "pear_ms_poe_"


# ---------------------------------------------------------------------------- attention function
def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, KVH, S, D) -> (B, KVH*groups, S, D), query head h using KV head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _make_attention(original: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        fn = original_function(module, original)
        st = getattr(module, _ATTR, None)
        if st is None or st.owner.session is None:  # a layer we leave alone, or a call outside the wrapper
            return fn(ModuleView(module, original, False), query, key, value, attention_mask, **kwargs)
        return st.owner._attend(st.layer, fn, ModuleView(module, original, False), ModuleView(module, original, True),
                                query, key, value, attention_mask, **kwargs)

    return attention


class _LayerState:
    def __init__(self, owner: "MsPoE", layer: int):
        self.owner, self.layer = owner, layer


class _Session:
    """State of one batch of sequences: positions seen so far and per-layer ratios (B, H)."""

    def __init__(self, positions: Positions):
        self.positions = positions
        self.ratios: dict[int, torch.Tensor] = {}
        self.scores: dict[int, torch.Tensor] = {}
        self.identity: dict[int, bool] = {}


# ---------------------------------------------------------------------------- the wrapped model
class MsPoE(WrappedModel):
    """Callable with the HF causal-LM forward signature; use inside `wrap(...)`."""

    name = "ms-poe"

    def __init__(self, model, min_ratio: float = DEFAULT_MIN_RATIO, max_ratio: float = DEFAULT_MAX_RATIO,
                 layers=None):
        self.arch, self.rotary = require_rope("ms-poe", model)
        if not (0 < min_ratio <= max_ratio):
            raise PearError(f"ms-poe ratios must satisfy 0 < min_ratio <= max_ratio, got {min_ratio}, {max_ratio}")
        require_attention_interface("ms-poe", model, self.arch)
        n = self.arch.n_layers
        layers = list(range(FIRST_LAYER, n)) if layers is None else sorted({int(l) for l in layers})
        if any(not 0 <= l < n for l in layers):
            raise PearError(f"ms-poe layers must be in 0..{n - 1}, got {layers}")
        self.model, self.layers = model, layers
        self.min_ratio, self.max_ratio = float(min_ratio), float(max_ratio)
        self.session: _Session | None = None
        self.last_session: _Session | None = None  # kept for inspection (e.g. the head scores)

    @contextlib.contextmanager
    def active(self):
        marks = {m: _LayerState(self, l) for l, m in attention_modules(self.model, self.arch, self.layers).items()}
        with switched_attention("ms-poe", self.model, self.arch, prefix=_PREFIX, make=_make_attention, attr=_ATTR,
                                marks=marks):
            yield self

    # -- forward
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache=None, inputs_embeds=None, **kwargs):
        prev = getattr(past_key_values, _ATTR, None) if past_key_values is not None else None
        x = input_ids if input_ids is not None else inputs_embeds
        positions = track_positions("ms-poe", prev.positions if prev is not None else None, past_key_values, x,
                                    attention_mask, position_ids)
        position_ids = positions.query
        session = prev if prev is not None else _Session(None)
        session.positions = positions
        self.session = session
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, use_cache=use_cache, inputs_embeds=inputs_embeds,
                             **kwargs)
        finally:
            self.session = None
        if getattr(out, "past_key_values", None) is not None:
            setattr(out.past_key_values, _ATTR, session)
        self.last_session = session
        return out

    def select_cache_rows(self, past, keep: torch.Tensor, rows: int) -> bool:
        """Keep only batch rows `keep` of a cache filled through this wrapper: the model's
        cache and, with it, the tracked positions and the per-row head ratios."""
        sess = getattr(past, _ATTR, None)
        if sess is None or not hasattr(past, "batch_select_indices"):
            return False
        past.batch_select_indices(keep)
        sess.positions = sess.positions.rows(keep)
        sess.ratios = {l: r[keep] for l, r in sess.ratios.items()}
        sess.scores = {l: r[keep] for l, r in sess.scores.items()}
        return True

    # -- the per-layer work, called from the registered attention function
    def _attend(self, layer, fn, module, module_one_group, query, key, value, attention_mask, **kwargs):
        pos = self.session.positions
        B, H, T, _ = query.shape
        S = key.shape[2]
        kpos, kvalid = pos.layer_keys("ms-poe", layer, T, S)  # (B, S)
        f = inv_freq(self.rotary, layer_type(self.model.config, layer)).to(query.device, torch.float32)
        groups = H // key.shape[1]
        sess = self.session
        if layer not in sess.ratios:
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            sess.scores[layer] = scores = _outlier_scores(query, _repeat_heads(key, groups), pos.query, kpos,
                                                          kvalid, f, attention_mask, scaling)
            sess.ratios[layer] = _ratios_by_rank(scores, self.min_ratio, self.max_ratio)
            sess.identity[layer] = self.min_ratio == self.max_ratio == 1.0
        if sess.identity[layer]:  # every extra rotation is the identity: the original call, bit for bit
            return fn(module, query, key, value, attention_mask, **kwargs)
        key, value = _repeat_heads(key, groups), _repeat_heads(value, groups)
        c = 1.0 / sess.ratios[layer] - 1.0  # (B, H): extra angle per unit of position
        q_ang = pos.query[:, None, :, None].float() * c[:, :, None, None] * f  # (B, H, T, F)
        k_ang = kpos[:, None, :, None].float() * c[:, :, None, None] * f  # (B, H, S, F)
        return fn(module_one_group, rotate(query, q_ang), rotate(key, k_ang), value, attention_mask, **kwargs)


def _allowed_keys(attention_mask, kvalid: torch.Tensor, S: int) -> torch.Tensor:
    """Which keys the last query may see, (B, 1|H, S) bool, from whatever mask the model built."""
    allowed = kvalid[:, None, :]
    if attention_mask is None:
        return allowed
    if attention_mask.ndim == 4:
        row = attention_mask[:, :, -1, -S:]
    elif attention_mask.ndim == 2:  # flash attention: the 2D padding mask
        row = attention_mask[:, None, -S:]
    else:
        return allowed
    row = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    return allowed & row


@torch.no_grad()
def _outlier_scores(query, key, qpos, kpos, kvalid, f, attention_mask, scaling) -> torch.Tensor:
    """Per (row, head): fraction of visible keys whose weight (last query, no RoPE) exceeds 4x the mean."""
    q = rotate(query[:, :, -1:, :], -(qpos[:, None, -1:, None].float() * f))  # undo RoPE: (B, H, 1, D)
    k = rotate(key, -(kpos[:, None, :, None].float() * f))  # (B, H, S, D)
    logits = (q.float() @ k.float().transpose(-1, -2)).squeeze(-2) * scaling  # (B, H, S)
    allowed = _allowed_keys(attention_mask, kvalid, key.shape[2]).expand_as(logits)
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    n = allowed.sum(-1, keepdim=True).clamp(min=1)
    return ((weights > 4.0 / n) & allowed).sum(-1) / n.squeeze(-1)


def _ratios_by_rank(scores: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Rank 0 (highest score) gets `lo`; rank i gets lo + (hi - lo) * i / H. Shape (B, H), fp32."""
    B, H = scores.shape
    order = torch.argsort(-scores, dim=-1, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(H, device=scores.device).expand(B, H))
    return lo + (hi - lo) * rank.float() / H


# ---------------------------------------------------------------------------- registry
@contextlib.contextmanager
def wrap(loaded, *, min_ratio: float = DEFAULT_MIN_RATIO, max_ratio: float = DEFAULT_MAX_RATIO, layers=None):
    """``with wrap(loaded) as lm:`` -- `lm(...)` runs the model under Ms-PoE; leaving restores it."""
    model = unwrap(loaded)
    lm = MsPoE(model, min_ratio=min_ratio, max_ratio=max_ratio, layers=layers)
    with lm.active():
        yield lm


register(Variant("ms-poe", "Ms-PoE: per-head RoPE position rescaling, ratios 1.2-1.8 by head position-awareness "
                 "(arXiv 2403.04797)", wrap, needs_rope=True, memory=lambda **_: 1.25))  # peak 1.10-1.23 x base at 4k

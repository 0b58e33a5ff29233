"""RoPE bands: the queries' rotary frequency bands re-weighted in chosen layers, a weight edit.

A head's query channels come in rotary pairs; pair i turns at frequency base^(-2i/r) (r the
rotary width): pair 0 fastest, the last pair slowest. A pair's share of a query-key logit is
q_i · R(iΔ) k_i, and multiplying both channels of pair i by f multiplies that share by f and
commutes with the rotation. So the edit is exact in the weights: the query projection's rows
(and bias) of those channels, or, where the family normalises queries after the projection
(Gemma 3, Qwen 3: one norm weight shared by the heads), that norm's weight. Same architecture,
no inference cost, foldable into a checkpoint like PEAR's scales.

Why it could move the position bias: for a far key the fast pairs turn through many periods
and their shares add up with scattered phases, while for a near key they add coherently; the
slow pairs stay coherent at any distance. Weakening the fast bands (factor < 1) or
strengthening the slow ones (factor > 1) shifts the logits from near tokens towards far content
matches. Neither PEAR's head scales (which weight what a head returns, not where it looks) nor
the positional hidden state (one residual channel) can make that change.

    pear eval --model smollm2-135m --variant rope-bands --variant-option bands=fast \\
        --variant-option factor=0.5 --task mdqa-20
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import PearError
from ..families import resolve
from . import Variant, int_list, number, register
from .rope import unwrap

NAMED_BANDS = {"fast": (0.0, 0.25), "slow": (0.75, 1.0)}  # shares of the pairs, fastest first


def rotary_width(model: nn.Module, head_dim: int) -> int:
    """Channels of a head that rotate (partial rotary: GPT-J's rotary_dim, Phi's factor)."""
    cfg = getattr(model, "config", None)
    width = getattr(cfg, "rotary_dim", None)
    if not isinstance(width, int) or width <= 0:
        rp = getattr(cfg, "rope_parameters", None)
        share = (rp.get("partial_rotary_factor") if isinstance(rp, dict) else None) or \
            getattr(cfg, "partial_rotary_factor", None) or 1.0
        width = int(head_dim * float(share))
    return width - width % 2


def band_pairs(bands, n_pairs: int) -> list[int]:
    """"fast" / "slow" (a quarter of the pairs), "A:B" (pairs A..B-1, 0 the fastest) or a list."""
    if isinstance(bands, str) and bands in NAMED_BANDS:
        lo, hi = NAMED_BANDS[bands]
        return list(range(round(lo * n_pairs), round(hi * n_pairs)))
    if isinstance(bands, str) and ":" in bands:
        a, _, b = bands.partition(":")
        try:
            pairs = list(range(int(a or 0), int(b) if b else n_pairs))
        except ValueError:
            pairs = None
    elif isinstance(bands, list) and all(isinstance(x, int) for x in bands):
        pairs = bands
    elif isinstance(bands, int):
        pairs = [bands]
    else:
        pairs = None
    if not pairs or any(not 0 <= p < n_pairs for p in pairs):
        raise PearError(f"rope-bands: bands must be fast, slow, A:B or pair indices within 0..{n_pairs - 1} "
                        f"(0 the fastest), got {bands!r}")
    return sorted(set(pairs))


def band_channels(pairs: list[int], width: int, layout: str) -> list[int]:
    """A head's channels of those pairs: (i, i + width/2) in the half layout (Llama, Qwen, Gemma),
    (2i, 2i + 1) in the interleaved one (GPT-J)."""
    half = width // 2
    if layout == "interleaved":
        return sorted(c for i in pairs for c in (2 * i, 2 * i + 1))
    return sorted([*pairs, *(i + half for i in pairs)])


@contextlib.contextmanager
def edited(model: nn.Module, layers: list[int], pairs: list[int], factor: float):
    """The queries' channels of `pairs` multiplied by `factor` in `layers`; restored on leaving."""
    arch = resolve(model)
    fam = arch.family
    if fam.position != "rope" or fam.qk_proj is None:
        raise PearError(f"rope-bands needs RoPE and a separate query projection; {arch.model_type} has "
                        f"{'a fused one' if fam.position == 'rope' else fam.position + ' positions'}")
    D = arch.head_dim
    channels = band_channels(pairs, rotary_width(model, D), fam.rope_pairs)
    blocks = model.get_submodule(fam.blocks)
    saved = []
    with torch.no_grad():
        for layer in layers:
            blk = blocks[layer]
            if fam.q_norm:  # one weight (head_dim,) shared by the heads, applied after the projection
                w = blk.get_submodule(fam.q_norm).weight
                idx = torch.tensor(channels, device=w.device)
                saved.append((w, idx, w[idx].clone()))
                w[idx] = ((w[idx].float() + fam.norm_offset) * factor - fam.norm_offset).to(w.dtype)
                continue
            q = blk.get_submodule(fam.qk_proj[0])
            rows = torch.tensor([h * D + c for h in range(q.out_features // D) for c in channels],
                                device=q.weight.device)
            for p in (q.weight, q.bias):
                if p is not None:
                    saved.append((p, rows, p[rows].clone()))
                    p[rows] = (p[rows].float() * factor).to(p.dtype)
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, idx, old in saved:
                p[idx] = old


@contextlib.contextmanager
def wrap(loaded, *, bands="fast", layers="all", factor: float = 0.5):
    """``with wrap(loaded, bands="fast", factor=0.5) as lm:`` -- the model with its queries' fast
    rotary bands halved in every layer; leaving restores the weights."""
    model = unwrap(loaded)
    arch = resolve(model)
    factor = number(factor, "rope-bands: factor must be a number")
    if not factor >= 0:
        raise PearError(f"rope-bands: factor must be >= 0, got {factor}")
    layers = list(range(arch.n_layers)) if layers == "all" else \
        int_list(layers, "rope-bands: layers must be 'all', an integer, a list or a range A-B")
    if not layers or any(not 0 <= l < arch.n_layers for l in layers):
        raise PearError(f"rope-bands: layers must be within 0..{arch.n_layers - 1}, got {layers}")
    pairs = band_pairs(bands, rotary_width(model, arch.head_dim) // 2)
    with edited(model, layers, pairs, factor):
        model.pear_variant_info = {"bands": pairs, "layers": layers, "factor": factor}
        try:
            yield model
        finally:
            del model.pear_variant_info


register(Variant("rope-bands", "the queries' rotary frequency bands (fast or slow pairs) scaled in chosen layers: "
                 "shifts attention between near and far tokens; a weight edit, no inference cost", wrap,
                 needs_rope=False))

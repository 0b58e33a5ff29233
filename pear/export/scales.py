"""Per-layer channel scales: the common currency of the exporters.

Head h of a layer owns input channels ``h*D .. (h+1)*D - 1`` of the output projection
(families.Arch.head_weight), so scaling head h by alpha is scaling those D channels by alpha.
Query-side scales (site "query") act on the same channels of the query projection's *output*
(head h's query rows, families.Arch.query_rows). A GGUF tensor or a PEFT IA3 vector stores
exactly such a per-channel vector; a per-head coefficient is the special case where the vector
is constant over each head's block.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..errors import PearError
from ..families import Arch, resolve
from ..folding.coefficients import HeadKey, check_coefficients
from ..folding.scaling import hook_site

FORMATS = ("hf", "gguf", "peft")  # --format of `pear fold` and `pear run`

LayerScales = dict[int, torch.Tensor]  # layer -> (H * D,) fp32 scales of the out-proj input


def channel_scales(arch: Arch, coefs: Mapping[HeadKey, float]) -> LayerScales:
    """Coefficients -> per-layer input-channel scales: a per-head coefficient repeated over
    head_dim, a per-channel one (head_dim values) as it is; ones elsewhere. Only layers with
    at least one selected head appear."""
    coefs = check_coefficients(arch, coefs)
    out: LayerScales = {}
    for (layer, head), a in coefs.items():
        v = out.setdefault(layer, torch.ones(arch.n_heads * arch.head_dim, dtype=torch.float32))
        v[head * arch.head_dim:(head + 1) * arch.head_dim] = torch.as_tensor(a, dtype=torch.float32)  # (D,) or ()
    return out


def check_channel_scales(arch: Arch, scales: Mapping[int, torch.Tensor]) -> LayerScales:
    """Validate layer range, vector length (H * D) and finiteness; return sorted fp32 CPU copies."""
    n = arch.n_heads * arch.head_dim
    out: LayerScales = {}
    for layer in sorted(scales):
        if not (isinstance(layer, int) and 0 <= layer < arch.n_layers):
            raise PearError(f"layer {layer} out of range: this {arch.model_type} model has layers 0..{arch.n_layers - 1}")
        v = torch.as_tensor(scales[layer], dtype=torch.float32).detach().cpu().reshape(-1)
        if v.numel() != n:
            raise PearError(f"layer {layer}: {v.numel()} channel scales, expected heads x head_dim = {n}")
        if not bool(torch.isfinite(v).all()):
            raise PearError(f"layer {layer}: channel scales are not all finite")
        out[layer] = v.clone()
    if not out:
        raise PearError("no scales given: nothing to export")
    return out


def scales_json(scales: Mapping[int, torch.Tensor], arch: Arch) -> dict:
    """A compact record: per layer, the heads whose block is constant (coefficient) and, if a
    layer is not per-head constant, its full channel vector."""
    layers = []
    for layer, v in sorted(scales.items()):
        blocks = v.view(arch.n_heads, arch.head_dim)  # (H, D)
        if bool((blocks == blocks[:, :1]).all()):
            heads = {h: float(blocks[h, 0]) for h in range(arch.n_heads) if float(blocks[h, 0]) != 1.0}
            layers.append({"layer": layer, "heads": [{"head": h, "coefficient": a} for h, a in heads.items()]})
        else:
            layers.append({"layer": layer, "channels": [float(x) for x in v]})
    return {"head_dim": arch.head_dim, "n_heads": arch.n_heads, "layers": layers}


class ChannelScaling:
    """Reference function for any scales: hooks multiply the output projection's input (site
    "output") or the query projection's output (site "query", bias included) by the layer's
    vector. ``with ChannelScaling(model, scales): logits = model(ids)``."""

    def __init__(self, model: nn.Module, scales: Mapping[int, torch.Tensor], site: str = "output"):
        self.arch = resolve(model)
        self.scales = check_channel_scales(self.arch, scales)
        self.projs, self.site = self.arch.site_projs(site), site
        self._handles: list = []

    def __enter__(self) -> "ChannelScaling":
        for layer, v in self.scales.items():
            def scale(x, v=v):  # (..., H * D)
                return (x.float() * v.to(x.device)).to(x.dtype)

            self._handles.append(hook_site(self.projs[layer], self.site, scale))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def snapshot_site(model: nn.Module, site: str = "output"):
    """Copy the weights (and biases) of every projection where scales of `site` fold; returns a
    function that puts them back (the base model again after an in-place fold, exactly, even for
    a coefficient of 0)."""
    params = [p for proj in resolve(model).site_projs(site) for p in proj.parameters()]
    saved = [p.detach().clone() for p in params]

    @torch.no_grad()
    def restore() -> None:
        for p, w in zip(params, saved):
            p.copy_(w)

    return restore


def relative_tolerance(dtype: torch.dtype) -> float:
    from ..folding import RELATIVE_TOLERANCE

    return RELATIVE_TOLERANCE.get(dtype, 1e-4)

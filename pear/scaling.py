"""Per-head scaling of attention outputs: hooks (trainable), fold and unfold (into weights).

Like PEFT's IA3, but with one scalar per attention head instead of per channel: head h of
layer l contributes ``alpha[l, h] * o_h`` to the output projection's input. Two ways to
apply the same function:

* `HeadScaling`: a forward pre-hook on each output projection multiplies the head slices of
  its input. Scales are fp32 `nn.Parameter`s, so they can be trained with every model
  weight frozen. Use as a context manager; leaving it removes the hooks.
* `fold`: multiply the head's input-columns (rows for GPT-2's Conv1D) of the output
  projection weight by alpha, in fp32, then cast back. Bias untouched: it is added after
  the heads are summed, so it is not part of any head. Zero inference overhead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from .errors import PearError
from .families import Arch, resolve

HeadKey = tuple[int, int]  # (layer, head)


# ---------------------------------------------------------------------------- coefficients
def check_coefficients(arch: Arch, coefs: Mapping[HeadKey, float]) -> dict[HeadKey, float]:
    """Validate (layer, head) ranges and finiteness; return a plain sorted dict."""
    out = {}
    for (layer, head), a in sorted(coefs.items()):
        arch.check_head(layer, head)
        a = float(a)
        if not math.isfinite(a):
            raise PearError(f"coefficient for layer {layer} head {head} is not finite ({a})")
        out[(layer, head)] = a
    return out


def read_coefficients(path: str | Path) -> dict[HeadKey, float]:
    """Read ``{"heads": [{"layer": L, "head": H, "coefficient": a}, ...]}``."""
    path = Path(path)
    if not path.is_file():
        raise PearError(f"coefficients file not found: {path}")
    try:
        data = json.loads(path.read_text())
        rows = data["heads"]
        coefs = {}
        for r in rows:
            key = (r["layer"], r["head"])
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in key):
                raise PearError(f"{path}: layer and head must be integers, got {key}")
            if key in coefs:
                raise PearError(f"{path}: layer {key[0]} head {key[1]} appears twice")
            a = r["coefficient"]
            if not isinstance(a, (int, float)) or isinstance(a, bool) or not math.isfinite(a):
                raise PearError(f"{path}: coefficient for layer {key[0]} head {key[1]} is not a number or not finite")
            coefs[key] = float(a)
    except json.JSONDecodeError as e:
        raise PearError(f"{path} is not valid JSON: {e}") from None
    except (KeyError, TypeError) as e:
        raise PearError(
            f'{path}: expected {{"heads": [{{"layer": L, "head": H, "coefficient": a}}, ...]}} (missing {e})'
        ) from None
    if not coefs:
        raise PearError(f"{path}: no heads listed")
    return coefs


def coefficients_json(coefs: Mapping[HeadKey, float], **extra) -> dict:
    return {"heads": [{"layer": l, "head": h, "coefficient": a} for (l, h), a in sorted(coefs.items())], **extra}


# ---------------------------------------------------------------------------- hooks
class HeadScaling(nn.Module):
    """Scale selected heads' outputs through forward pre-hooks on the output projections.

    >>> with HeadScaling(model, {(24, 4): 0.5}) as hs:     # or a list of (layer, head): all 1.0
    ...     logits = model(ids).logits
    >>> hs.coefficients()                                    # {(24, 4): 0.5}

    `alpha` is one fp32 parameter vector (K,), ordered like `heads`; the hooks read it on
    every forward, so an optimiser stepping `alpha` changes the model's function.
    """

    def __init__(self, model: nn.Module, heads: Mapping[HeadKey, float] | Iterable[HeadKey],
                 trainable: bool = True):
        super().__init__()
        self.arch = resolve(model)
        coefs = dict(heads) if isinstance(heads, Mapping) else {tuple(k): 1.0 for k in heads}
        coefs = check_coefficients(self.arch, coefs)
        self.heads: list[HeadKey] = list(coefs)
        device = self.arch.out_projs[0].weight.device
        self.alpha = nn.Parameter(torch.tensor(list(coefs.values()), dtype=torch.float32, device=device),
                                  requires_grad=trainable)
        # per layer: (head indices, positions in alpha)
        self._by_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, (layer, head) in enumerate(self.heads):
            hs, idx = self._by_layer.get(layer, ([], []))
            self._by_layer[layer] = (hs + [head], idx + [i])
        self._handles: list = []
        self.attach()

    # Scale vector for one layer: ones, with alpha scattered at the selected heads. (H,)
    def layer_scale(self, layer: int) -> torch.Tensor:
        heads, idx = self._by_layer[layer]
        alpha = self.alpha
        scale = torch.ones(self.arch.n_heads, dtype=torch.float32, device=alpha.device)
        return scale.index_put((torch.tensor(heads, device=alpha.device),), alpha[torch.tensor(idx, device=alpha.device)])

    def _hook(self, layer: int):
        H, D = self.arch.n_heads, self.arch.head_dim

        def pre_hook(module, args):
            x = args[0]  # (..., H * D)
            scale = self.layer_scale(layer).to(device=x.device)
            y = (x.view(*x.shape[:-1], H, D) * scale.to(x.dtype)[:, None]).view(x.shape)
            return (y, *args[1:])

        return pre_hook

    def attach(self) -> "HeadScaling":
        if not self._handles:
            for layer in self._by_layer:
                self._handles.append(self.arch.out_projs[layer].register_forward_pre_hook(self._hook(layer)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "HeadScaling":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def coefficients(self) -> dict[HeadKey, float]:
        return {k: float(a) for k, a in zip(self.heads, self.alpha.detach().cpu().tolist())}


# ---------------------------------------------------------------------------- fold / unfold
@torch.no_grad()
def _scale_weights(model: nn.Module, coefs: Mapping[HeadKey, float], invert: bool) -> Arch:
    arch = resolve(model)
    coefs = check_coefficients(arch, coefs)
    for (layer, head), a in coefs.items():
        if invert:
            if a == 0:
                raise PearError(f"cannot unfold layer {layer} head {head}: its coefficient is 0")
            a = 1.0 / a
        w = arch.head_weight(layer, head)  # a view into the weight
        w.copy_((w.float() * a).to(w.dtype))
    return arch


def fold(model: nn.Module, coefs: Mapping[HeadKey, float]) -> nn.Module:
    """Write the head scales into the output-projection weights, in place. Returns `model`."""
    _scale_weights(model, coefs, invert=False)
    return model


def unfold(model: nn.Module, coefs: Mapping[HeadKey, float]) -> nn.Module:
    """Undo `fold` (exact up to rounding in the weight dtype). Refuses zero coefficients."""
    _scale_weights(model, coefs, invert=True)
    return model

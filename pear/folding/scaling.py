"""Per-head scaling of attention outputs or queries: hooks (trainable), fold and unfold (into weights).

Like PEFT's IA3 on the output projection's input: head h of layer l contributes
``alpha[l, h] * o_h`` to it, where a coefficient is one scalar per head (the paper) or one
scale per channel of the head (a vector of head_dim values; SEAL's per-channel variant).
With ``site="query"`` the same scales act on the head's queries instead (IA3 on the query
projection's output, before the rotary embedding): one scale per head is that head's attention
temperature, one per channel weights each rotary frequency band's share of its logits. Both
sites fold exactly: the output site into the output projection's input columns, the query site
into the query projection's rows and bias. Two ways to apply the same function:

* `HeadScaling`: a forward pre-hook on each output projection multiplies the head slices of
  its input (query site: a forward hook on each query projection, the head slices of its
  output). Scales are fp32 `nn.Parameter`s, so they can be trained with every model
  weight frozen. Use as a context manager; leaving it removes the hooks.
* `fold`: multiply the head's input-columns (rows for GPT-2's Conv1D) of the output
  projection weight by alpha, in fp32, then cast back. Bias untouched: it is added after
  the heads are summed, so it is not part of any head. Query site: the head's rows of the
  query projection and its bias entries, which are part of the head. Zero inference overhead.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ..errors import PearError
from ..families import Arch, resolve
from .coefficients import Coefficient, HeadKey, check_coefficients, check_site, granularity, is_channelwise


# ---------------------------------------------------------------------------- hooks
def hook_site(proj: nn.Module, site: str, scale: Callable[[torch.Tensor], torch.Tensor]):
    """Hook `scale` onto what scales of `site` multiply in `proj` (`Arch.site_projs`): the output
    projection's input, or the query projection's output (bias included). Returns the handle."""
    if site == "query":
        return proj.register_forward_hook(lambda m, args, out: scale(out))
    return proj.register_forward_pre_hook(lambda m, args: (scale(args[0]), *args[1:]))


class HeadScaling(nn.Module):
    """Scale selected heads' outputs through forward pre-hooks on the output projections.

    >>> with HeadScaling(model, {(24, 4): 0.5}) as hs:     # or a list of (layer, head): all 1.0
    ...     logits = model(ids).logits
    >>> hs.coefficients()                                    # {(24, 4): 0.5}

    `alpha` is one fp32 parameter, ordered like `heads`: (K,) with one scale per head, or
    (K, head_dim) per channel (``channels=True`` for a list of heads, or vector coefficients).
    The hooks read it on every forward, so an optimiser stepping `alpha` changes the model.
    """

    def __init__(self, model: nn.Module, heads: Mapping[HeadKey, Coefficient] | Iterable[HeadKey],
                 trainable: bool = True, channels: bool = False, site: str = "output"):
        super().__init__()
        self.arch = resolve(model)
        self.site = check_site(site)
        self._projs = self.arch.site_projs(site)  # where the hooks go (a family that cannot: one line now)
        D = self.arch.head_dim
        coefs = dict(heads) if isinstance(heads, Mapping) else {tuple(k): [1.0] * D if channels else 1.0
                                                                  for k in heads}
        coefs = check_coefficients(self.arch, coefs)
        if not coefs:
            raise PearError("no heads to scale")
        self.channels = granularity(coefs) == "channel"
        if self.channels:  # per-head scalars mixed with vectors: broadcast the scalars
            coefs = {k: a if is_channelwise(a) else [a] * D for k, a in coefs.items()}
        self.heads: list[HeadKey] = list(coefs)
        device = self.arch.out_projs[0].weight.device
        self.alpha = nn.Parameter(torch.tensor(list(coefs.values()), dtype=torch.float32, device=device),
                                  requires_grad=trainable)  # (K,) or (K, D)
        # per layer: (head indices, positions in alpha), as index tensors on the scales' device
        by_layer: dict[int, tuple[list[int], list[int]]] = {}
        for i, (layer, head) in enumerate(self.heads):
            by_layer.setdefault(layer, ([], []))
            by_layer[layer][0].append(head)
            by_layer[layer][1].append(i)
        self._by_layer = {l: (torch.tensor(h, device=device), torch.tensor(i, device=device))
                          for l, (h, i) in by_layer.items()}
        self._handles: list = []
        self.attach()

    def layer_scale(self, layer: int) -> torch.Tensor:
        """Scales of one layer's channels: ones, with alpha scattered at the selected heads. (H, D)"""
        heads, idx = self._by_layer[layer]
        a = self.alpha[idx]  # (k,) or (k, D)
        if a.dim() == 1:
            a = a[:, None].expand(-1, self.arch.head_dim)
        scale = torch.ones(self.arch.n_heads, self.arch.head_dim, dtype=torch.float32, device=a.device)
        return scale.index_put((heads,), a)

    def _scaled(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        H, D = self.arch.n_heads, self.arch.head_dim
        scale = self.layer_scale(layer).to(device=x.device, dtype=x.dtype)  # (H, D)
        return (x.view(*x.shape[:-1], H, D) * scale).view(x.shape)  # x: (..., H * D)

    def attach(self) -> "HeadScaling":
        if not self._handles:
            self._handles = [hook_site(self._projs[layer], self.site, lambda x, l=layer: self._scaled(l, x))
                             for layer in self._by_layer]
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def disabled(self):
        """The base model for the duration (hooks off), e.g. for a distillation teacher."""
        attached = bool(self._handles)
        self.remove()
        try:
            yield
        finally:
            if attached:
                self.attach()

    def __enter__(self) -> "HeadScaling":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def coefficients(self) -> dict[HeadKey, Coefficient]:
        return {k: a for k, a in zip(self.heads, self.alpha.detach().cpu().tolist())}


# ---------------------------------------------------------------------------- fold / unfold
def head_views(arch: Arch, layer: int, head: int, site: str) -> list[tuple[torch.Tensor, bool]]:
    """The weight views a head's scales multiply, each with whether its channels run along rows."""
    if site == "query":  # rows (D, in) of the query projection, and its bias (D,)
        return [(v, True) for v in arch.query_rows(layer, head)]
    # the output projection: (out, D), or (D, out) for Conv1D
    return [(arch.head_weight(layer, head), arch.family.weight_in_rows)]


@torch.no_grad()
def _scale_weights(model: nn.Module, coefs: Mapping[HeadKey, Coefficient], invert: bool, site: str) -> Arch:
    arch = resolve(model)
    coefs = check_coefficients(arch, coefs)
    check_site(site)
    for (layer, head), a in coefs.items():
        a = torch.as_tensor(a, dtype=torch.float32)  # () or (D,)
        if invert:
            if bool((a == 0).any()):
                raise PearError(f"cannot unfold layer {layer} head {head}: its coefficient is 0")
            a = 1.0 / a
        for w, in_rows in head_views(arch, layer, head, site):
            s = a.to(w.device)
            if s.dim() and w.dim() == 2:
                s = s[:, None] if in_rows else s[None, :]
            w.copy_((w.float() * s).to(w.dtype))
    return arch


def fold(model: nn.Module, coefs: Mapping[HeadKey, Coefficient], site: str = "output") -> nn.Module:
    """Write the head (or channel) scales into the weights of `site` (the output projection, or the
    query projection), in place. Returns `model`."""
    _scale_weights(model, coefs, invert=False, site=site)
    return model


def unfold(model: nn.Module, coefs: Mapping[HeadKey, Coefficient], site: str = "output") -> nn.Module:
    """Undo `fold` (exact up to rounding in the weight dtype). Refuses zero coefficients."""
    _scale_weights(model, coefs, invert=True, site=site)
    return model

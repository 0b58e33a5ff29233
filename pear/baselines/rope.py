"""RoPE facts the inference-time baselines need, read from the model's own rotary module.

Both baselines change where RoPE puts tokens, so both need the same three things: to refuse
families whose position embedding is not RoPE (PEAR itself needs no such check), the inverse
frequencies the model actually uses in a given layer (Gemma 3 keeps one set per layer type,
Phi and GPT-NeoX rotate only part of each head), a way to rotate q/k by extra angles, and the
absolute position of every query and cached key (`track_positions`).

Every Hugging Face RoPE type computes its angles as ``position * inv_freq`` (the type only
changes how ``inv_freq`` is made), so rotations compose: rotating a vector already rotated to
position p by the extra angle ``(p' - p) * inv_freq`` puts it at position p'. The rotation
pairs dimension i with i + rot_dim/2 (``rotate_half``), as in every family we support here
(GPT-J's interleaved rotation has no shared rotary module and is refused).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PearError
from ..families import Arch, resolve

_WHY = {
    "learned": "they use learned absolute position embeddings",
    "alibi": "they use ALiBi attention biases",
}


def unwrap(loaded) -> nn.Module:
    """The model of a LoadedModel, or the model itself."""
    from ..loading import LoadedModel

    return loaded.model if isinstance(loaded, LoadedModel) else loaded


def require_rope(variant: str, model: nn.Module) -> tuple[Arch, nn.Module]:
    """Return (arch, rotary module), or raise a clear 'not applicable' PearError."""
    arch = resolve(model)
    if arch.position != "rope":
        why = _WHY.get(arch.position, f"their position embedding is {arch.position}, not RoPE")
        raise PearError(f"{variant} is not applicable to {arch.model_type} models: {why}; "
                        "PEAR's folded checkpoint works for any family")
    if arch.family.rotary is None:
        raise PearError(f"{variant} is not supported for {arch.model_type} models: they compute RoPE inside each "
                        "attention layer (no shared rotary module to work with)")
    return arch, model.get_submodule(arch.family.rotary)


def layer_type(model_config, layer: int) -> str | None:
    types = getattr(model_config, "layer_types", None)
    return types[layer] if types else None


def rope_type(rot: nn.Module, ltype: str | None) -> str:
    rt = getattr(rot, "rope_type", "default")
    return rt[ltype] if isinstance(rt, dict) else rt


def inv_freq(rot: nn.Module, ltype: str | None = None) -> torch.Tensor:
    """The inverse frequencies the rotary module currently uses, shape (rot_dim/2,)."""
    if hasattr(rot, "inv_freq"):
        return rot.inv_freq
    if ltype is not None and hasattr(rot, f"{ltype}_inv_freq"):
        return getattr(rot, f"{ltype}_inv_freq")
    raise PearError(f"{type(rot).__name__}: cannot find its inverse frequencies (layer type {ltype})")


def attention_scaling(rot: nn.Module, ltype: str | None = None) -> float:
    if hasattr(rot, "attention_scaling"):
        return rot.attention_scaling
    return getattr(rot, f"{ltype}_attention_scaling", 1.0)


def rope_parameters(config, ltype: str | None) -> dict:
    params = config.rope_parameters
    if ltype is not None and isinstance(params.get(ltype), dict):
        return params[ltype]
    return params


def base_of(rot: nn.Module, ltype: str | None = None) -> float:
    return float(rope_parameters(rot.config, ltype)["rope_theta"])


def inv_freq_for_base(rot: nn.Module, base: float, ltype: str | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) this rotary module would have with RoPE base `base`.

    Uses transformers' own initialisation for the model's RoPE type (default, linear, llama3,
    yarn, ...) on a copy of the config with only ``rope_theta`` changed.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rt = rope_type(rot, ltype)
    if rt == "dynamic":
        raise PearError("dynamic-NTK RoPE recomputes its frequencies while generating; "
                        "changing its base is not supported")
    cfg = copy.deepcopy(rot.config)
    rope_parameters(cfg, ltype)["rope_theta"] = float(base)
    fn = type(rot).compute_default_rope_parameters if rt == "default" else ROPE_INIT_FUNCTIONS[rt]
    kw = {"layer_type": ltype} if ltype is not None else {}
    inv, scaling = fn(cfg, **kw)
    return inv.to(device=inv_freq(rot, ltype).device, dtype=torch.float32), float(scaling)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2*F dims of x (..., D) by `angles` (..., F), RoPE's rotate_half pairing.

    Computed in fp32 and cast back once, so a 16-bit q/k is rounded only one more time.
    """
    return rotate_cs(x, *cos_sin(angles))


def cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (..., 2F) of RoPE angles (..., F), in rotate_half's pairing."""
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def rotate_cs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`rotate` with the angles' cos and sin (..., 2F) given: made once, they serve every layer."""
    rd = cos.shape[-1]
    xr = x[..., :rd].float()
    out = xr * cos + rotate_half(xr) * sin
    if rd == x.shape[-1]:
        return out.to(x.dtype)
    return torch.cat((out.to(x.dtype), x[..., rd:].expand(*out.shape[:-1], -1)), dim=-1)  # angles may broadcast x


@dataclass
class Positions:
    """Absolute positions of a batch's query tokens and of every key in its cache."""

    query: torch.Tensor  # (B, T)
    keys: torch.Tensor  # (B, S_total): all positions seen so far, including the queries
    key_valid: torch.Tensor  # (B, S_total) bool: False for padding

    def rows(self, keep: torch.Tensor) -> "Positions":
        """The positions of batch rows `keep` only (a cache cut down to those rows)."""
        return Positions(query=self.query[keep], keys=self.keys[keep], key_valid=self.key_valid[keep])

    def join(self, other: "Positions", pad_self: int, pad_other: int) -> "Positions":
        """The rows of `other` after these, each side's keys left-padded by its count of columns
        (padding: position 0, not valid), as a joined cache (`pear.evaluate.continuous`); the
        queries are each row's last."""
        def pad(t: torch.Tensor, n: int) -> torch.Tensor:
            return torch.cat([t.new_zeros(t.shape[0], n), t], dim=1)

        return Positions(query=torch.cat([self.query[:, -1:], other.query[:, -1:]]),
                         keys=torch.cat([pad(self.keys, pad_self), pad(other.keys, pad_other)]),
                         key_valid=torch.cat([pad(self.key_valid, pad_self), pad(other.key_valid, pad_other)]))

    def trim(self, first: int) -> "Positions":
        """Without the first `first` key columns (a cache cut on the left)."""
        return Positions(query=self.query, keys=self.keys[:, first:], key_valid=self.key_valid[:, first:])

    def layer_keys(self, variant: str, layer: int, T: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and validity of the S keys a layer attends to with T queries, each (B, S):
        the last S tracked (sliding-window layers keep only the last keys)."""
        if self.keys.shape[1] < S or self.query.shape[1] != T:
            raise PearError(f"{variant}: layer {layer} got {T} queries and {S} keys but the wrapper tracked "
                            f"{self.query.shape[1]} and {self.keys.shape[1]} positions (unsupported cache type?)")
        return self.keys[:, -S:], self.key_valid[:, -S:]


def track_positions(variant: str, prev: Positions | None, past_key_values, x: torch.Tensor,
                    attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> Positions:
    """The positions of one forward's queries and of every key in the cache after it.

    A variant that rotates q and k by extra angles must know each token's absolute position,
    also for keys already in the cache (left padding shifts them per row), so its wrapper
    tracks them across calls: `prev` is what it tracked for `past_key_values` (None for a new
    cache), `x` the input ids or embeddings (B, T, ...). Positions default to continuing after
    the cached keys; a 2-D attention mask over the whole cache marks the valid keys, otherwise
    every new key is valid.
    """
    B, T = x.shape[:2]
    dev = x.device
    if past_key_values is not None and prev is None and past_key_values.get_seq_length() > 0:
        raise PearError(f"{variant}: this cache was not filled through the {variant} wrapper; "
                        "start from past_key_values=None")
    past = prev.keys.shape[1] if prev is not None else 0
    if position_ids is None:
        position_ids = torch.arange(past, past + T, device=dev).expand(B, T)
    position_ids = position_ids.to(dev).expand(B, T)  # (B, T)
    keys = position_ids if prev is None else torch.cat([prev.keys, position_ids], dim=1)  # (B, past + T)
    if attention_mask is not None and attention_mask.ndim == 2 and attention_mask.shape[1] == past + T:
        valid = attention_mask.to(dev).bool()
    else:
        new = torch.ones(B, T, dtype=torch.bool, device=dev)
        valid = new if prev is None else torch.cat([prev.key_valid, new], dim=1)
    return Positions(query=position_ids, keys=keys, key_valid=valid)

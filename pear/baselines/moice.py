"""MoICE (Lin et al. 2024, "Mixture of In-Context Experts", arXiv 2406.19598) as an inference-time variant.

Every attention head attends once per RoPE base of a small set (each base is an "in-context
expert"); a router per layer, shared by the layer's heads, reads the head's rotated query and
mixes the experts' outputs per token and head. Only the routers are trained, the model frozen
(`pear baseline train moice`, pear.baselines.moice_train); this module runs them.

What we follow, from the reference code (github.com/p1nksnow/MoICE, modeling/modeling_llama.py,
``LlamaFlashAttention2.forward``, and training/train.sh; the copy in TTArch/PEAR-RAG
evaluation/models/modeling_llama_moice*.py is the same code, plus an eager-attention version):
- bases 10000, 17500, 18000, 19000, 20000, 22500, 25000 (N = 7); top-k K = 7 (train.sh:
  ``--expert_nums 7 --topk 7``, so every expert is used); router on every layer;
- router: ``gate_2(act(gate_1(q)) * gate_3(q))``, gate_1/gate_3 ``head_dim -> N``, gate_2
  ``N -> N``, no biases, ``act`` the model's own MLP activation (``config.hidden_act``), weights
  initialised as transformers initialises a missing Linear (normal, std ``initializer_range``);
  its input is the query rotated with the first base of the set (the model's own base);
- routing: ``softmax(logits)`` in fp32, the top-K experts by logit kept, renormalised, cast to
  the model's dtype; output = sum over experts of weight x that expert's attention output;
- load-balancing loss (``load_balancing_loss_func``): Switch-Transformer loss over the
  concatenated logits of all layers, one row per (token, head), ``N * sum(f * P)`` with ``f``
  the top-K one-hot frequencies (K, N) and ``P`` the mean probabilities (N,). With K = N it is
  the constant N (every expert is always selected), so it adds no gradient: we keep it, as
  the reference does, and record it.
Deviations (ours):
- bases are scaled to the model's own base, ``b * model_base / 10000`` (the reference set is
  for Llama-2, base 10000; SmolLM2 has 100000, Qwen2.5 1000000, Gemma 3 one base per layer
  type, each scaled against its own), as our Attention Buckets does, so the first expert is
  always the model itself;
- keys: the reference caches keys *before* RoPE and rotates them per expert at every step; the
  model here caches them rotated at its own base, and we rotate by the extra angle
  ``p * (inv_freq_e - inv_freq_own)`` (rotations compose, so this is RoPE with base e at the
  same positions, up to rounding); key positions come from the tracked cache (left padding
  included), where the reference assumes positions 0..S-1 for keys and row 0's positions for
  queries;
- grouped-query attention: the reference repeats K/V to the query heads before rotating; the
  extra rotation depends only on position and expert, so we rotate the KV heads themselves
  and let the model's attention function group them (same result, less memory);
- the router runs in fp32 (reference: the model's dtype, bf16); partial rotary (Phi,
  GPT-NeoX) rotates only the rotary part, as the model does;
- inference stacks the experts in the batch of one attention call, as the reference does;
  training runs them one after the other, each recomputed in the backward pass (one expert's
  attention in memory at a time): the same arithmetic.
An expert whose base is the model's own makes the original attention call unchanged, so with
bases=[10000] (one expert, weight 1) logits are exactly the base model's.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from ..errors import PearError
from . import Variant, WrappedModel, register
from .attention import ModuleView, attention_modules, original_function, require_attention_interface, switched_attention
from .attention_buckets import REFERENCE_BASE
from .rope import (Positions, base_of, cos_sin, inv_freq, inv_freq_for_base, layer_type, require_rope, rotate,
                   rotate_cs, track_positions, unwrap)

DEFAULT_BASES = (10000.0, 17500.0, 18000.0, 19000.0, 20000.0, 22500.0, 25000.0)
DEFAULT_TOP_K = 7
ROUTERS_FILE, SETTINGS_FILE = "routers.safetensors", "moice.json"
_ATTR = "_pear_moice"
_KEYS = "_pear_moice_keys"  # on a cache filled through the wrapper: every expert's rotated keys, per layer
_PREFIX = "pear_moice_"
KEY_ROOM = 64  # decoding steps the experts' key buffer grows by at a time
# GPU memory per batch token with the experts stacked, relative to the base model: 3.0 x (kv) and
# 4.1 x (mdqa-10) in `pear eval` on SmolLM2-135M, 1 x H200 (the seven experts' rotated keys, the
# values each attention call reads, the stacked queries); one by one it is the base model's
STACKED_MEMORY = 4.0


# ---------------------------------------------------------------------------- routers
class Router(nn.Module):
    """One layer's router, shared by its heads: (..., head_dim) rotated query -> (..., N) logits."""

    def __init__(self, head_dim: int, n: int, act: str):
        super().__init__()
        self.gate_1 = nn.Linear(head_dim, n, bias=False)
        self.gate_2 = nn.Linear(n, n, bias=False)
        self.gate_3 = nn.Linear(head_dim, n, bias=False)
        self.act = ACT2FN[act]

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.gate_2(self.act(self.gate_1(q)) * self.gate_3(q))


def _activation(config) -> str:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None) or "silu"


class Routers(nn.Module):
    """The routers of every layer, fp32, plus the settings they were made for."""

    def __init__(self, n_layers: int, head_dim: int, bases, top_k: int, act: str, std: float = 0.02,
                 seed: int = 0, info: dict | None = None):
        super().__init__()
        bases = [float(b) for b in bases]
        if not bases or any(b <= 1 for b in bases):
            raise PearError(f"moice bases must be numbers > 1, got {bases}")
        if not 1 <= int(top_k) <= len(bases):
            raise PearError(f"moice top_k must be in 1..{len(bases)} (the number of bases), got {top_k}")
        self.bases, self.top_k, self.act_name, self.info = bases, int(top_k), act, dict(info or {})
        self.head_dim = int(head_dim)
        g = torch.Generator().manual_seed(int(seed))
        self.layers = nn.ModuleList(Router(head_dim, len(bases), act) for _ in range(n_layers))
        with torch.no_grad():
            for p in self.layers.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)

    @classmethod
    def for_model(cls, model, bases=DEFAULT_BASES, top_k: int | None = None, seed: int = 0) -> "Routers":
        arch, _ = require_rope("moice", model)
        top_k = len(bases) if top_k is None else top_k
        std = getattr(model.config.get_text_config(), "initializer_range", 0.02) or 0.02
        return cls(arch.n_layers, arch.head_dim, bases, top_k, _activation(model.config), std=std, seed=seed)

    def settings(self) -> dict:
        return {"bases": self.bases, "top_k": self.top_k, "n_layers": len(self.layers),
                "head_dim": self.head_dim, "act": self.act_name, **self.info}

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(folder / ROUTERS_FILE))
        (folder / SETTINGS_FILE).write_text(json.dumps(self.settings(), indent=2) + "\n")

    @classmethod
    def load(cls, folder) -> "Routers":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / ROUTERS_FILE).is_file() or not (folder / SETTINGS_FILE).is_file():
            raise PearError(f"moice routers: {folder} has no {ROUTERS_FILE} and {SETTINGS_FILE} "
                            "(make them with `pear baseline train moice`)")
        s = json.loads((folder / SETTINGS_FILE).read_text())
        info = {k: v for k, v in s.items() if k not in ("bases", "top_k", "n_layers", "head_dim", "act")}
        r = cls(s["n_layers"], s["head_dim"], s["bases"], s["top_k"], s["act"], info=info)
        try:
            r.load_state_dict(load_file(str(folder / ROUTERS_FILE)))
        except RuntimeError as e:
            raise PearError(f"moice routers in {folder} do not match their settings: {str(e).splitlines()[0]}") from None
        return r


def routing_weights(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """(..., N) logits -> (..., N) fp32 weights: softmax, top-k by logit kept, renormalised."""
    w = logits.float().softmax(-1)
    if top_k < logits.shape[-1]:
        keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        w = torch.where(keep, w, 0.0)
        w = w / w.sum(-1, keepdim=True)
    return w


def load_balancing_loss(logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """The reference's Switch-Transformer loss over all layers' logits, each (..., N), rows = (token, head)."""
    n = logits[0].shape[-1]
    z = torch.cat([x.reshape(-1, n).float() for x in logits])  # (R, N)
    w = z.softmax(-1)
    chosen = torch.nn.functional.one_hot(w.topk(top_k, dim=-1).indices, n).float()  # (R, K, N)
    return (chosen.mean(0) * w.mean(0)[None]).sum() * n


# ---------------------------------------------------------------------------- attention function
def _make_attention(original: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        fn = original_function(module, original)
        st = getattr(module, _ATTR, None)
        view = ModuleView(module, original, False)
        if st is None or st[0].session is None:  # a call outside the wrapper
            return fn(view, query, key, value, attention_mask, **kwargs)
        return st[0]._attend(st[1], fn, view, query, key, value, attention_mask, **kwargs)

    return attention


@dataclass
class _Experts:
    delta: torch.Tensor  # (N, F) fp32, on the model's device: inv_freq of each expert minus the model's own
    own: list[bool]  # expert at the model's own base: the original call
    bases: list[float]


class _Session:
    """One batch's positions (the cache's, for decoding) and, when training, the router logits."""

    def __init__(self):
        self.positions: Positions | None = None
        self.logits: list[torch.Tensor] | None = None
        self.prev_keys: dict = {}  # layer -> (buffer (B, E, KVH, room, D), n): the first n are the cache's rotated keys
        self.keys: dict | None = None  # the same after this forward (None: no cache is returned)
        self.trig: dict = {}  # cos and sin of the experts' extra angles, shared by the layers of a type


# ---------------------------------------------------------------------------- the wrapped model
class MoICE(WrappedModel):
    """Callable with the HF causal-LM forward signature; use inside `wrap(...)`."""

    name = "moice"

    def __init__(self, model, routers: Routers, stack: bool = True):
        self.arch, self.rotary = require_rope("moice", model)
        require_attention_interface("moice", model, self.arch)
        if (len(routers.layers), routers.head_dim) != (self.arch.n_layers, self.arch.head_dim):
            raise PearError(f"moice routers are for {len(routers.layers)} layers of head_dim {routers.head_dim}; "
                            f"this model has {self.arch.n_layers} layers of head_dim {self.arch.head_dim}")
        dev = next(model.parameters()).device
        self.model, self.routers = model, routers.to(dev)
        types = getattr(self.rotary, "layer_types", None)  # Gemma 3: one RoPE per layer type
        # on the device once: a host-to-GPU copy per layer and step would wait for the GPU each time
        self.experts = {lt: self._experts(lt, routers.bases, dev) for lt in (types or [None])}
        self.session: _Session | None = None
        self.collect_logits = False  # training: keep every layer's router logits in the session
        # Training backpropagates through every expert's attention in every layer. An attention
        # function that keeps its (T x S) weights for the backward pass (eager; SDPA's math kernel)
        # then holds 7 x layers of them: at the reference's 4k tokens more than a GPU has (Qwen2.5-
        # Coder-0.5B ran out of an H200's memory). With gradients on, each expert's attention is
        # recomputed in the backward pass instead (torch.utils.checkpoint): same gradients.
        self.checkpoint = True
        self.stack = stack  # inference: every expert in one attention call (False: one after the other)

    def _experts(self, ltype, bases, device) -> _Experts:
        own = base_of(self.rotary, ltype)
        own_inv = inv_freq(self.rotary, ltype).float()
        check, _ = inv_freq_for_base(self.rotary, own, ltype)
        if check.shape != own_inv.shape or not torch.allclose(check, own_inv, rtol=1e-4):
            raise PearError("moice: could not reproduce this model's RoPE frequencies "
                            f"(rope type {self.rotary.rope_type}); not supported")
        deltas, is_own, used = [], [], []
        for b in bases:
            b = b * own / REFERENCE_BASE
            same = abs(b - own) <= 1e-9 * own
            inv = own_inv if same else inv_freq_for_base(self.rotary, b, ltype)[0]
            deltas.append(inv - own_inv)
            is_own.append(same)
            used.append(b)
        return _Experts(torch.stack(deltas).to(device), is_own, used)

    @property
    def bases(self) -> dict:
        return {lt: e.bases for lt, e in self.experts.items()}

    @contextlib.contextmanager
    def active(self):
        mods = attention_modules(self.model, self.arch, range(self.arch.n_layers))
        with switched_attention("moice", self.model, self.arch, prefix=_PREFIX, make=_make_attention, attr=_ATTR,
                                marks={m: (self, l) for l, m in mods.items()}):
            yield self

    # -- forward: track positions (queries and every key in the cache), then run the model
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache=None, inputs_embeds=None, **kwargs):
        prev = getattr(past_key_values, _ATTR, None) if past_key_values is not None else None
        x = input_ids if input_ids is not None else inputs_embeds
        pos = track_positions("moice", prev, past_key_values, x, attention_mask, position_ids)
        position_ids = pos.query
        self.session = _Session()
        self.session.positions = pos
        self.session.logits = [] if self.collect_logits else None
        self.session.prev_keys = getattr(past_key_values, _KEYS, None) or {}
        self.session.keys = {} if (self.model.config.use_cache if use_cache is None else use_cache) else None
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, use_cache=use_cache, inputs_embeds=inputs_embeds,
                             **kwargs)
            self.last_logits = self.session.logits
            keys = self.session.keys
        finally:
            self.session = None
        if getattr(out, "past_key_values", None) is not None:
            setattr(out.past_key_values, _ATTR, pos)
            setattr(out.past_key_values, _KEYS, keys or {})
        return out

    def select_cache_rows(self, past, keep: torch.Tensor, rows: int) -> bool:
        """Keep only batch rows `keep` of a cache filled through this wrapper (and their positions)."""
        p = getattr(past, _ATTR, None)
        if p is None or not hasattr(past, "batch_select_indices"):
            return False
        past.batch_select_indices(keep)
        setattr(past, _ATTR, p.rows(keep))
        setattr(past, _KEYS, {layer: (k[keep], n) for layer, (k, n) in (getattr(past, _KEYS, None) or {}).items()})
        return True

    def join_cache_state(self, past, new, pad_old: int, pad_new: int) -> None:
        """After the model's cache `past` took the rows of `new`, each left-padded by its count
        of columns (`pear.evaluate.continuous`): the same for the tracked positions and for every
        expert's rotated keys (a layer missing on either side re-rotates its keys next step)."""
        setattr(past, _ATTR, getattr(past, _ATTR).join(getattr(new, _ATTR), pad_old, pad_new))
        old, add = getattr(past, _KEYS, None) or {}, getattr(new, _KEYS, None) or {}
        keys = {}
        for layer in old.keys() & add.keys():
            (a, n), (b, m) = old[layer], add[layer]  # (B, E, KVH, room, D), the first n filled
            a, b = F.pad(a[:, :, :, :n], (0, 0, pad_old, 0)), F.pad(b[:, :, :, :m], (0, 0, pad_new, 0))
            keys[layer] = (torch.cat([a, b]), n + pad_old)
        setattr(past, _KEYS, keys)

    def trim_cache_state(self, past, first: int) -> None:
        """After the model's cache `past` lost its first `first` columns: the same for the
        tracked positions and the experts' rotated keys."""
        setattr(past, _ATTR, getattr(past, _ATTR).trim(first))
        setattr(past, _KEYS, {layer: (k[:, :, :, first:n], n - first)
                              for layer, (k, n) in (getattr(past, _KEYS, None) or {}).items()})

    # -- one layer: route, run each expert, mix; called from the registered attention function
    def _attend(self, layer, fn, module, query, key, value, attention_mask, **kwargs):
        pos = self.session.positions
        B, H, T, _ = query.shape
        S = key.shape[2]
        kpos, _ = pos.layer_keys("moice", layer, T, S)  # (B, S)
        ex = self.experts[layer_type(self.model.config, layer) if None not in self.experts else None]
        logits = self.routers.layers[layer](query.transpose(1, 2).float())  # (B, T, H, N)
        if self.session.logits is not None:
            self.session.logits.append(logits)
        w = routing_weights(logits, self.routers.top_k).to(query.dtype)  # (B, T, H, N)
        recompute = self.checkpoint and torch.is_grad_enabled()  # training: attention again in backward

        def expert(e, query, key):  # one expert's attention output, (B, T, H, D)
            if ex.own[e]:
                return fn(module, query, key, value, attention_mask, **kwargs)[0]
            d = ex.delta[e].to(query.device)
            q = rotate(query, pos.query[:, None, :, None].float() * d)  # (B, H, T, D)
            k = rotate(key, kpos[:, None, :, None].float() * d)  # (B, KVH, S, D)
            return fn(module, q, k, value, attention_mask, **kwargs)[0]

        if recompute or not self.stack or len(ex.own) == 1:
            outs = [checkpoint(expert, e, query, key, use_reentrant=False) if recompute else expert(e, query, key)
                    for e in range(len(ex.own))]
        else:
            outs = self._stacked(layer, ex, fn, module, query, key, value, attention_mask, kpos, **kwargs)
        out = None
        for e, o in enumerate(outs):  # the same sum, in the same order, either way
            o = w[..., e, None] * o
            out = o if out is None else out + o
        return out, None

    def _trig(self, ex: _Experts, name: str, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each (B, E, 1, L, 2F), of every expert's extra angle at `positions` (B, L):
        the same for every layer of a type (the last L tracked positions), so made once per forward."""
        key = (id(ex), name)
        if key not in self.session.trig:
            angles = positions[:, None, None, :, None].float() * ex.delta[None, :, None, None, :]  # (B, E, 1, L, F)
            self.session.trig[key] = cos_sin(angles)
        return self.session.trig[key]

    @staticmethod
    def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(B, N, L, D) rotated for each expert: (B, E, N, L, D). Several tokens (a prompt): one
        expert at a time into the result, so that the fp32 intermediates of one expert, not of
        seven, are in memory at once; one token (a decoding step): all at once, fewer launches.
        The same values either way."""
        if x.shape[2] == 1:
            return rotate_cs(x[:, None], cos, sin)
        out = x.new_empty(x.shape[0], cos.shape[1], *x.shape[1:])
        for e in range(cos.shape[1]):
            out[:, e] = rotate_cs(x, cos[:, e], sin[:, e])
        return out

    def _stacked(self, layer, ex, fn, module, query, key, value, attention_mask, kpos, **kwargs):
        """Every expert's attention in one call, the experts stacked as extra heads (the reference
        stacks them in the batch; as heads, the attention mask broadcasts instead of being
        copied E times): one kernel launch per layer instead of one per expert (decoding is
        launch-bound). Expert e's query heads e*H.. read its key heads e*KVH.., as grouped-query
        attention maps them. An expert at the model's own base is rotated by angle 0, which leaves
        q and k as they are. Each expert's rotated keys are kept with the cache, so a decoding step
        rotates only its new keys instead of re-rotating the whole cache seven times per layer and
        step; the rotation of a key does not depend on when it is made, so the keys are the same
        either way, for E x the key cache's memory. They live in a buffer with room for KEY_ROOM
        more steps, written in place, so a step does not copy the whole E x key cache either."""
        E, B, H, T, S = len(ex.own), query.shape[0], query.shape[1], query.shape[2], key.shape[2]
        q = self._rotated(query, *self._trig(ex, "query", self.session.positions.query))  # (B, E, H, T, D)
        buf, n = self.session.prev_keys.get(layer, (None, 0))
        if buf is not None and buf.shape[0] == B and S > T and n >= S - T:  # the new keys come last
            new = self._rotated(key[:, :, S - T:], *self._trig(ex, "new keys", kpos[:, S - T:]))  # (B, E, KVH, T, D)
            if buf.shape[3] < n + T:  # room for this step and the next KEY_ROOM ones: no copy per step
                grown = buf.new_empty(*buf.shape[:3], n + T + KEY_ROOM, buf.shape[4])
                grown[:, :, :, :n] = buf[:, :, :, :n]
                buf = grown
            buf[:, :, :, n:n + T] = new
            n += T
            k = buf[:, :, :, n - S:n]  # (B, E, KVH, S, D), a view
        else:
            k = self._rotated(key, *self._trig(ex, f"{S} keys", kpos))  # (B, E, KVH, S, D)
            buf, n = k, S
        if self.session.keys is not None:
            self.session.keys[layer] = (buf, n)
        v = value[:, None].expand(B, E, *value.shape[1:])  # (B, E, KVH, S, D)
        q, k, v = q.flatten(1, 2), k.flatten(1, 2), v.flatten(1, 2)  # (B, E*H, T, D), (B, E*KVH, S, D) x 2
        g = getattr(module, "num_key_value_groups", 1)
        impl = module.config._attn_implementation
        packable = impl in ("sdpa", "eager")  # flash kernels read the query length
        if T == 1 and g > 1 and packable and (attention_mask is None or attention_mask.shape[1] == 1):
            # A decoding step: the g query heads of a key head become g query rows of that head, so
            # the E x key cache is read as it is rather than copied g times (transformers repeats
            # keys and values per query head when there is a mask; 5.23 packs like this itself).
            o = fn(ModuleView(module, impl, True), q.view(B, -1, g, q.shape[-1]), k, v, attention_mask,
                   **{**kwargs, "is_causal": False})[0]  # (B, g, E*KVH, D)
            o = o.transpose(1, 2).reshape(B, 1, E * H, -1)  # (B, 1, E*H, D)
        else:
            o = fn(module, q, k, v, attention_mask, **kwargs)[0]  # (B, T, E*H, D)
        return o.unflatten(2, (E, H)).unbind(2)  # E x (B, T, H, D)


# ---------------------------------------------------------------------------- registry
@contextlib.contextmanager
def wrap(loaded, *, routers=None, bases=None, top_k: int | None = None, seed: int = 0, stack: bool = True):
    """``with wrap(loaded, routers=DIR) as lm:`` -- `lm(...)` runs the model under MoICE.

    routers: a folder from `pear baseline train moice`, a `Routers` object, or "init" for
    untrained routers (seeded; for tests and cost measurements, not for accuracy).
    bases / top_k: only with routers="init" (trained routers carry their own).
    stack: the experts in one attention call, their rotated keys kept with the cache (fewer
    launches, E x the key cache); False: one expert after another, re-rotating the cache (the
    memory of base; on 2 CPU cores, where copies cost more than launches, no slower)."""
    if not isinstance(stack, bool):
        raise PearError(f"moice: stack must be true or false, got {stack!r}")
    model = unwrap(loaded)
    if routers is None:
        raise PearError("moice needs trained routers: --variant-option routers=DIR (from `pear baseline train "
                        "moice`), or routers=init for untrained ones")
    if isinstance(routers, (str, Path)) and str(routers) == "init":
        r = Routers.for_model(model, bases=DEFAULT_BASES if bases is None else bases, top_k=top_k, seed=seed)
    else:
        if bases is not None or top_k is not None:
            raise PearError("moice: bases and top_k come with trained routers; set them only with routers=init")
        r = routers if isinstance(routers, Routers) else Routers.load(routers)
    lm = MoICE(model, r, stack=stack)
    with lm.active():
        yield lm


register(Variant("moice", "MoICE: each head attends with 7 RoPE bases (scaled to the model's), mixed per token "
                 "and head by trained routers (arXiv 2406.19598)", wrap, needs_rope=True,
                 memory=lambda stack=True, **_: STACKED_MEMORY if stack else 1.0))

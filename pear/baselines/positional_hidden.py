"""Positional hidden states (Yu et al., "Mitigate Position Bias in LLMs via Scaling a Single Hidden
States Channel", Findings of ACL 2025, arXiv 2406.02536) as an inference-time variant.

The paper finds channels of the residual stream whose mean over many inputs rises or falls
smoothly with the token's position (a "positional hidden state", made by the causal mask), and
multiplies that one channel by a factor (0 for most models) in the inputs of the query and key
projections of the middle layers. Attention then depends less on position, and the middle of
the context is read better (up to +15 points on lost-in-the-middle QA for 7B models).

What we follow, from the reference code (github.com/PositionalHidden/PositionalHidden):
- search (`positional_dims`): mean hidden states (`output_hidden_states`, embeddings dropped)
  over random inputs; per channel and layer, a cubic fit over positions (the first 30 % skipped)
  that is monotonic; channels monotonic in more than a quarter of the layers (in their majority
  direction) are ranked by smoothness, the smallest sum of squared second differences of the
  0-1 normalised, Savitzky-Golay smoothed curve (the first 20 % skipped), over those layers; the
  `candidates` smoothest are kept;
- choice (`choose_dim`): the candidate whose scaling gives the lowest answer loss on a
  validation set of key-value retrieval prompts (the reference uses KV and NQ prompts; ours are
  freshly generated UUID pairs, `kv_prompt`, so no evaluation record is read);
- defaults: factor 0, layers 10-25 of 32 (the reference configs for Llama-2, Mistral, Qwen1.5
  and Gemma), i.e. the same fractions of the depth here.
Deviations: random token ids instead of a file of random characters; a window of 11 for the
smoothing (the reference: 10, which scipy allows; we avoid the dependency); and the scaling
applies to every token's query, where the reference recomputes only the last token's (and
keeps the prompt's own attention unscaled). Scaling every query is what makes the change a
weight edit: the channel's input column of the query and key projections multiplied by the
factor, so the variant edits those columns in place while it is active (zero inference cost,
like a PEAR checkpoint) and restores them when it ends. It needs separate query and key
projections (`Family.qk_proj`); families with a fused projection say so.
"""

from __future__ import annotations

import contextlib
import random
import sys

import numpy as np
import torch
from torch import nn

from ..errors import PearError
from ..families import resolve
from . import Variant, int_list, number, register
from .rope import unwrap

LAYER_SPAN = (10 / 32, 26 / 32)  # reference: layers 10..25 of 32
SEARCH_SAMPLES, SEARCH_LENGTH = 64, 1000  # random sequences whose hidden states are averaged (samples=)
VALIDATION = dict(records=16, pairs=24)  # key-value prompts for the choice, ~1.7k tokens each


def qk_projections(model: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    """(query, key) projection of every layer, from the family table."""
    arch = resolve(model)
    if arch.family.qk_proj is None:
        raise PearError(f"positional-hidden needs separate query and key projections; {arch.model_type} "
                        "computes them in one fused projection")
    blocks = model.get_submodule(arch.family.blocks)
    return [tuple(blk.get_submodule(p) for p in arch.family.qk_proj) for blk in blocks]


def default_layers(n_layers: int) -> list[int]:
    lo, hi = (round(f * n_layers) for f in LAYER_SPAN)
    return list(range(lo, hi))


@torch.no_grad()
def mean_hidden_states(model: nn.Module, samples: int, length: int, seed: int) -> np.ndarray:
    """Residual stream after each layer, averaged over `samples` sequences of random token ids:
    (L, length, d), fp32."""
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    total = None
    for _ in range(samples):
        ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, length), generator=g).to(dev)
        hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[1:]  # L x (1, T, d)
        h = torch.stack([x[0].float() for x in hs])  # (L, T, d)
        total = h if total is None else total + h
    return (total / samples).cpu().numpy()


def _normalise(y: np.ndarray) -> np.ndarray:  # (T, d) -> each column to 0..1
    lo, hi = y.min(0), y.max(0)
    return (y - lo) / np.where(hi > lo, hi - lo, 1.0)


def _savgol(y: np.ndarray, window: int = 11, order: int = 3) -> np.ndarray:
    """Savitzky-Golay smoothing along axis 0 ('valid' part: the edges are dropped)."""
    x = np.arange(window) - window // 2
    coef = np.linalg.pinv(np.vander(x, order + 1, increasing=True))[0]  # value of the local fit at its centre
    return np.stack([np.convolve(y[:, j], coef[::-1], mode="valid") for j in range(y.shape[1])], axis=1)


def positional_dims(hidden: np.ndarray, candidates: int = 10) -> list[int]:
    """The channels most like a positional hidden state, smoothest first (the reference's search)."""
    L, T, d = hidden.shape
    x = np.arange(T - int(0.3 * T), dtype=np.float64)
    up, down = np.zeros((L, d), bool), np.zeros((L, d), bool)
    for layer in range(2, L - 1):  # as the reference: not the first two, nor the last
        y = _normalise(hidden[layer, int(0.3 * T):].astype(np.float64))
        fit = np.polynomial.polynomial.polyval(x, np.polynomial.polynomial.polyfit(x, y, 3))  # (d, T')
        step = np.diff(fit, axis=1)
        up[layer], down[layer] = (step >= 0).all(1), (step <= 0).all(1)
    layers = np.where(up.sum(0) > down.sum(0), up, down)  # (L, d): the majority direction's layers
    keep = np.flatnonzero(layers.sum(0) > L // 4)
    if not len(keep):
        return []
    smooth = np.full((L, len(keep)), np.inf)
    for layer in np.flatnonzero(layers[:, keep].any(1)):
        y = _savgol(_normalise(hidden[layer][int(0.2 * T):][:, keep].astype(np.float64)))  # (T'', k)
        rough = (np.diff(y, 2, axis=0) ** 2).sum(0)
        smooth[layer] = np.where(layers[layer, keep], rough, np.inf)
    order = np.argsort(smooth.min(0), kind="stable")
    return [int(keep[i]) for i in order[:candidates]]


@contextlib.contextmanager
def scaled(model: nn.Module, dims: list[int], layers: list[int], factor: float):
    """Channels `dims` of the query and key projections' input multiplied by `factor` in
    `layers`: their weight columns are edited in place, and restored on leaving."""
    pairs = qk_projections(model)
    saved = []
    with torch.no_grad():
        for layer in layers:
            for proj in pairs[layer]:
                cols = proj.weight[:, dims].clone()
                saved.append((proj, cols))
                proj.weight[:, dims] = (cols.float() * factor).to(cols.dtype)
    try:
        yield model
    finally:
        with torch.no_grad():
            for proj, cols in saved:
                proj.weight[:, dims] = cols


def validation_set(model: nn.Module, tokenizer, records: int, pairs: int, seed: int) -> list:
    """Key-value retrieval prompts with the gold pair at a random position, each followed by its
    value (`objectives.Sequence`: the value's tokens are the targets). Fresh UUIDs, not the
    evaluation's records; fewer than `pairs` pairs where the model's window is shorter than the prompt."""
    from ..evaluate.generate import context_window
    from ..evaluate.prompts import kv_prompt
    from ..evaluate.tasks.kv import make_kv_records, move_gold
    from ..objectives import Sequence

    window = context_window(model) or 10**9
    sample = make_kv_records(1, pairs, seed=seed)[0]
    while pairs > 2 and len(tokenizer(kv_prompt(sample["ordered_kv_records"][:pairs], sample["key"]))["input_ids"]) \
            + 32 > window:
        pairs -= 1  # fewer pairs where the model's window is short
    rng, out = random.Random(seed), []
    for rec in make_kv_records(records, pairs, seed=seed + 1_000_003):
        kv = move_gold(rec["ordered_kv_records"], rec["key"], rng.randrange(pairs))
        prompt = tokenizer(kv_prompt(kv, rec["key"]))["input_ids"]
        answer = tokenizer(" " + rec["value"], add_special_tokens=False)["input_ids"]
        out.append(Sequence(prompt + answer, len(answer)))
    return out


def choose_dim(model: nn.Module, tokenizer, candidates: list[int], layers: list[int], factor: float,
               seed: int = 0) -> tuple[int | None, dict]:
    """The candidate with the lowest validation loss, and every candidate's loss (None: the base's)."""
    from ..objectives import pad_id_of, target_nll

    seqs, pad = validation_set(model, tokenizer, seed=seed, **VALIDATION), pad_id_of(tokenizer)  # built once
    loss = torch.no_grad()(lambda: target_nll(model, seqs, pad).item())  # answer loss, all prompts in one pass
    losses = {None: loss()}
    for dim in candidates:
        with scaled(model, [dim], layers, factor):
            losses[dim] = loss()
    best = min(candidates, key=lambda d: losses[d]) if candidates else None
    return best, losses


def _int_list(value, what: str) -> list[int]:
    return int_list(value, f"positional-hidden: {what} must be 'auto', an integer, a list or a range A-B")


@contextlib.contextmanager
def wrap(loaded, *, dims="auto", layers="auto", factor: float = 0.0, candidates: int = 10,
         samples: int = SEARCH_SAMPLES, seed: int = 0):
    """``with wrap(loaded) as lm:`` -- the model with its positional channel scaled (found by the
    search and the validation choice when ``dims="auto"``); leaving restores the weights."""
    model = unwrap(loaded)
    pairs = qk_projections(model)
    factor = number(factor, "positional-hidden: factor must be a number")
    if not (isinstance(candidates, int) and candidates >= 1):
        raise PearError(f"positional-hidden: candidates must be a positive integer, got {candidates!r}")
    layers = default_layers(len(pairs)) if layers == "auto" else _int_list(layers, "layers")
    width = pairs[0][0].in_features
    if not layers or any(not 0 <= l < len(pairs) for l in layers):
        raise PearError(f"positional-hidden: layers must be within 0..{len(pairs) - 1}, got {layers}")
    if dims == "auto":
        tokenizer = getattr(loaded, "tokenizer", None)
        if tokenizer is None:
            raise PearError("positional-hidden: dims=auto needs the model's tokenizer for its validation prompts")
        from ..evaluate.generate import context_window

        length = min(SEARCH_LENGTH, context_window(model) or SEARCH_LENGTH)
        if not (isinstance(samples, int) and samples >= 1):
            raise PearError(f"positional-hidden: samples must be a positive integer, got {samples!r}")
        found = positional_dims(mean_hidden_states(model, samples, length, seed), candidates)
        dim, losses = choose_dim(model, tokenizer, found, layers, factor, seed)
        named = {"base" if d is None else str(d): v for d, v in losses.items()}
        shown = ", ".join(f"{d}: {v:.3f}" for d, v in named.items())
        print(f"positional-hidden: candidates {found}; validation loss {shown}; chosen {dim}", file=sys.stderr)
        dims = [] if dim is None else [dim]
        search = {"candidates": found, "validation_loss": named}
    else:
        dims, search = _int_list(dims, "dims"), None
    if any(not 0 <= d < width for d in dims):
        raise PearError(f"positional-hidden: dims must be within 0..{width - 1}, got {dims}")
    with scaled(model, dims, layers, factor):
        # what was edited, for the results file (`pear eval` saves it as the model's variant_info)
        model.pear_variant_info = {"dims": dims, "layers": layers, "factor": factor, "search": search}
        try:
            yield model
        finally:
            del model.pear_variant_info


register(Variant("positional-hidden", "positional hidden state: one residual channel scaled (x0) in the query and "
                 "key inputs of the middle layers (arXiv 2406.02536); a weight edit, no inference cost",
                 wrap, needs_rope=False))

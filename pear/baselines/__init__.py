"""Inference-time variants that a model can be evaluated under, registered by name.

A variant changes how a loaded model computes, without changing its weights for good: Ms-PoE
(per-head position rescaling in RoPE), Attention Buckets (parallel runs with different RoPE
bases), MoICE (per-head mixture of RoPE bases, routers trained by `pear baseline train moice`),
positional hidden states (one residual channel scaled in the query and key inputs: a weight edit
undone on leaving), RoPE bands (the queries' fast or slow rotary pairs scaled: a weight edit too).
PEAR itself needs no variant: its output is an ordinary checkpoint.

Contract used by the evaluation harness and the overhead benchmark:

    with get_variant(name).wrap(loaded, **options) as lm:
        out = lm(input_ids=..., attention_mask=..., position_ids=..., past_key_values=..., use_cache=True)
        out.logits, out.past_key_values          # past_key_values is opaque to the caller

`lm` behaves like the Hugging Face causal-LM forward for a batch of B rows and returns
logits for those B rows, whatever it does inside (extra batch rows, hooks, another
attention function). Leaving the context restores the model exactly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

from ..errors import PearError


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    wrap: Callable[..., ContextManager]  # wrap(loaded, **options) -> context manager yielding lm
    needs_rope: bool = True
    # memory(**options): GPU memory per batch token relative to the base model (None: 1); the
    # automatic batch limits divide their token budget by it, so that a variant holding several
    # caches does not start every batch too large and split it after running out of memory
    memory: Callable[..., float] | None = None

    @property
    def options(self) -> list[str]:
        """Names of the keyword options `wrap` takes (e.g. min_ratio, max_ratio for ms-poe)."""
        import inspect

        ps = list(inspect.signature(self.wrap).parameters.values())[1:]
        return [p.name for p in ps if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def memory_factor(self, options: dict) -> float:
        return 1.0 if self.memory is None else float(self.memory(**options))

    def check_options(self, options: dict) -> None:
        bad = sorted(set(options) - set(self.options))
        if bad:
            have = ", ".join(self.options) or "none"
            raise PearError(f"variant '{self.name}' has no option {', '.join(bad)} (its options: {have})")


class WrappedModel:
    """Base of the variants' callables: `lm(...)` runs the wrapped `self.model` under the
    variant, and `lm` otherwise looks like that model (config, device, dtype, ...), except for
    `generate`, which would bypass the variant. Subclasses set `name` and define __call__."""

    name = "variant"

    def forward(self, *args, **kwargs):
        return self(*args, **kwargs)

    def __getattr__(self, attr):  # only reached for attributes the wrapper does not have
        if attr.startswith("_") or attr in ("model", "arch", "rotary"):
            raise AttributeError(attr)
        if attr == "generate":
            raise PearError(f"{self.name} wraps the forward pass only; decode with a loop over lm(...)")
        return getattr(self.model, attr)


def int_list(value, error: str) -> list[int]:
    """A variant option naming integers (layers, channels): 5, [5, 9], "5,9" (read as a list) or
    the range "2-4"; anything else raises `error`."""
    if isinstance(value, int):
        return [value]
    if isinstance(value, str) and "-" in value:
        a, _, b = value.partition("-")
        if a.strip().isdigit() and b.strip().isdigit():
            return list(range(int(a), int(b) + 1))
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return list(value)
    raise PearError(f"{error}, got {value!r}")


def number(value, error: str) -> float:
    """A variant option that is a number (a factor, a ratio); anything else raises `error`."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PearError(f"{error}, got {value!r}") from None


VARIANTS: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    VARIANTS[variant.name] = variant
    return variant


@contextlib.contextmanager
def _identity(loaded, **options):
    yield loaded.model


register(Variant("none", "the model as it is", _identity, needs_rope=False))


def get_variant(name: str) -> Variant:
    _load_builtin()
    if name not in VARIANTS:
        raise PearError(f"unknown variant '{name}'; available: {', '.join(sorted(VARIANTS))}")
    return VARIANTS[name]


def _load_builtin() -> None:
    """Import the modules that register the built-in variants (kept lazy: they import torch)."""
    import importlib

    for mod in ("ms_poe", "attention_buckets", "moice", "positional_hidden", "rope_bands"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise

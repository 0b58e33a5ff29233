"""Running a variant's own code inside the model's attention, without copying modeling files.

Transformers calls attention through a registry (``AttentionInterface``) by the name in
``config._attn_implementation``. Ms-PoE and MoICE each register a function under a name of
their own that wraps the model's original one (sdpa, eager, flash, ...), switch the model to
it while they are active, and mark the attention modules of the layers they change with an
attribute their function reads. Leaving `switched_attention` removes the marks and switches
the model back, so it computes exactly as before.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable

from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import PearError


class _ConfigView:
    """The config as the original attention function must see it: under its own name (flash
    attention picks its kernel from ``config._attn_implementation``)."""

    def __init__(self, config, implementation: str):
        self._config, self._attn_implementation = config, implementation

    def __getattr__(self, name):
        return getattr(self._config, name)


class ModuleView:
    """The attention module as seen by the original attention function. With `one_group` it must
    not repeat keys and values per query head: they come repeated already (Ms-PoE), or the
    queries come packed per key head (MoICE's decoding steps)."""

    def __init__(self, module, implementation: str, one_group: bool):
        self._module = module
        self.config = _ConfigView(module.config, implementation)
        if one_group:
            self.num_key_value_groups = 1

    def __getattr__(self, name):
        return getattr(self._module, name)


def original_function(module, name: str):
    """The attention function registered as `name` (the model's own, before the switch)."""
    if name == "eager":  # "eager" is the modeling file's own function, not a registry entry
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def require_attention_interface(variant: str, model, arch) -> None:
    if not model._can_set_attn_implementation():
        raise PearError(f"{variant} is not supported for {arch.model_type} models: their attention does not "
                        "go through transformers' AttentionInterface")


def attention_modules(model, arch, layers) -> dict[int, nn.Module]:
    """The attention module of each layer in `layers` (the parent of the output projection)."""
    blocks = model.get_submodule(arch.family.blocks)
    proj = arch.family.out_proj.rsplit(".", 1)[0]  # "self_attn.o_proj" -> "self_attn"
    return {l: blocks[l].get_submodule(proj) for l in layers}


def register_attention(prefix: str, make: Callable[[str], Callable], original: str) -> str:
    """Register ``make(original)`` (and `original`'s mask function) once, under `prefix`; its name."""
    name = prefix + original.replace("|", "_")
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, make(original))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


@contextlib.contextmanager
def switched_attention(variant: str, model, arch, *, prefix: str, make: Callable[[str], Callable], attr: str,
                       marks: dict[nn.Module, object]):
    """Run `model` with the attention function ``make(original)`` (registered once per original
    implementation, under `prefix`), each module of `marks` carrying its value as `attr`."""
    original = model.config._attn_implementation
    if original.startswith(prefix):
        raise PearError(f"{variant} is already active on this model")
    name = register_attention(prefix, make, original)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise PearError(f"{variant}: could not switch this {arch.model_type} model to a custom attention function")
    try:
        for m, value in marks.items():
            setattr(m, attr, value)
        yield
    finally:
        for m in marks:
            if hasattr(m, attr):
                delattr(m, attr)
        model.set_attn_implementation(original)

"""The three models of the position-embedding study: the same block, three position embeddings.

PEAR's name claims it works whatever the position embedding. Published models that differ
in position embedding also differ in data, size and tokenizer, so this study trains its own:
transformers' own classes, chosen so that everything but the position embedding matches —

| name    | class               | position embedding            |
|---------|---------------------|-------------------------------|
| rope    | GPTNeoXForCausalLM  | rotary on every query/key dim |
| learned | GPT2LMHeadModel     | learned absolute (wpe)        |
| alibi   | BloomForCausalLM    | ALiBi slopes                  |

All three: pre-LayerNorm blocks with a sequential residual (GPT-NeoX's parallel residual
off), a 4x GELU (tanh approximation) MLP, biases, no dropout, tied input/output
embeddings, the same width, depth, heads and tokenizer, and one initialisation (normal
0.02, residual output projections scaled by 1/sqrt(2 x layers), as GPT-2). What remains
different is the class's own plumbing: BLOOM normalises the embeddings once more before
the first block. `rope-llama` (LlamaForCausalLM: RMSNorm, SwiGLU, no biases) is offered
as the usual RoPE design, with its MLP width set to match the parameter count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PearError


@dataclass(frozen=True)
class Size:
    """Width, depth and heads shared by every model of a study; context in tokens."""

    d_model: int
    layers: int
    heads: int
    context: int


SIZES = {
    "study": Size(d_model=512, layers=8, heads=8, context=1024),  # ~50M parameters with a 49k vocabulary
    "small": Size(d_model=256, layers=4, heads=4, context=1024),  # for a quick look on CPU
    "tiny": Size(d_model=32, layers=2, heads=4, context=512),  # tests
}


@dataclass(frozen=True)
class StudyArch:
    """How to build one study model: its model_type, config keywords, and the residual
    output projections (suffixes of module names) that get GPT-2's scaled initialisation."""

    model_type: str
    position: str  # what pear.resolve(model).position must say
    residual_out: tuple[str, ...]

    def config_kwargs(self, size: Size) -> dict:
        d, L, H, T = size.d_model, size.layers, size.heads, size.context
        if self.model_type == "gpt_neox":
            return dict(hidden_size=d, num_hidden_layers=L, num_attention_heads=H, intermediate_size=4 * d,
                        hidden_act="gelu_new", max_position_embeddings=T, use_parallel_residual=False,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
                        attention_dropout=0.0, hidden_dropout=0.0, tie_word_embeddings=True, attention_bias=True)
        if self.model_type == "gpt2":
            return dict(n_embd=d, n_layer=L, n_head=H, n_inner=4 * d, n_positions=T, activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
        if self.model_type == "bloom":
            return dict(hidden_size=d, n_layer=L, n_head=H, hidden_dropout=0.0, attention_dropout=0.0,
                        tie_word_embeddings=True)
        if self.model_type == "llama":
            # SwiGLU has three matrices: 8d/3 (rounded to a multiple of 8) matches 4d with two
            return dict(hidden_size=d, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=H,
                        intermediate_size=8 * math.ceil(8 * d / 3 / 8), max_position_embeddings=T,
                        tie_word_embeddings=True)
        raise PearError(f"no study configuration for model_type {self.model_type}")


ARCHS: dict[str, StudyArch] = {
    "rope": StudyArch("gpt_neox", "rope", ("attention.dense", "mlp.dense_4h_to_h")),
    "learned": StudyArch("gpt2", "learned", ("attn.c_proj", "mlp.c_proj")),
    "alibi": StudyArch("bloom", "alibi", ("self_attention.dense", "mlp.dense_4h_to_h")),
    "rope-llama": StudyArch("llama", "rope", ("self_attn.o_proj", "mlp.down_proj")),
}
DEFAULT_ARCHS = ("rope", "learned", "alibi")


def parse_archs(text: str | None) -> list[str]:
    names = list(DEFAULT_ARCHS) if not text else [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in ARCHS]
    if bad or not names or len(set(names)) != len(names):
        raise PearError(f"--archs {text!r}: use distinct names among {', '.join(ARCHS)}")
    return names


def parse_size(name: str) -> Size:
    if name not in SIZES:
        raise PearError(f"unknown study size '{name}'; use one of {', '.join(SIZES)}")
    return SIZES[name]


def build_model(arch: str, size: Size, tokenizer, seed: int) -> nn.Module:
    """A freshly initialised causal LM of `arch` (fp32), the tokenizer's separator as BOS/EOS/pad."""
    from transformers import AutoConfig, AutoModelForCausalLM

    a = ARCHS[arch]
    sep = tokenizer.eos_token_id
    cfg = AutoConfig.for_model(a.model_type, vocab_size=len(tokenizer), bos_token_id=sep, eos_token_id=sep,
                               pad_token_id=sep, **a.config_kwargs(size))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _init(model, a, size.layers, seed)
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = sep
    model.generation_config.pad_token_id = sep
    return model


@torch.no_grad()
def _init(model: nn.Module, arch: StudyArch, layers: int, seed: int) -> None:
    """One initialisation for every class (their own defaults differ): N(0, 0.02) weights,
    N(0, 0.02 / sqrt(2L)) residual output projections, zero biases, unit norms."""
    gen = torch.Generator().manual_seed(seed)
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter):
            continue
        b = getattr(mod, "bias", None)
        if w.ndim == 1:  # LayerNorm / RMSNorm
            w.fill_(1.0)
        else:
            std = 0.02 / math.sqrt(2 * layers) if name.endswith(arch.residual_out) else 0.02
            w.copy_(torch.randn(w.shape, generator=gen) * std)
        if isinstance(b, nn.Parameter):
            b.zero_()
    model.tie_weights()


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once

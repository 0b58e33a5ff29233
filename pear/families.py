"""The family table: the only place in pear that knows model family names.

PEAR needs one fact per family: which module receives the concatenated per-head attention
outputs (the input of the attention output projection, shaped ``(..., heads * head_dim)``),
and how that module stores its weight. Everything else (scaling hooks, discovery, folding)
works from the `Arch` resolved here.

Each entry is one small declaration, in the spirit of TransformerLens'
``supported_architectures``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .errors import PearError


@dataclass(frozen=True)
class Family:
    """Where a family keeps its per-head outputs.

    blocks:    dotted path from the model root to the ModuleList of decoder blocks.
    out_proj:  dotted path inside one block to the attention output projection.
    weight_in_rows: False for nn.Linear (weight [out, in]: a head is a block of columns);
               True for GPT-2's Conv1D (weight [in, out]: a head is a block of rows).
    position:  "rope", "alibi" or "learned" (inference-time baselines need RoPE).
    rotary:    dotted path from the model root to the shared rotary-embedding module, if any.
    final:     dotted paths from the model root to the modules applied, in order, between the
               last block and the LM head (the final norm; OPT's optional project_out). Paths
               that are missing or None in a given model are skipped. Used by discovery to
               re-run the top of the model from a cached residual stream.
    qk_proj:   dotted paths inside one block to the separate query and key projections (nn.Linear),
               or None where one fused projection computes them (the positional-hidden variant
               edits their input columns).
    q_norm:    dotted path inside one block to a norm applied to the queries after their projection
               (one weight shared by the heads), or None; `norm_offset` is added to its weight when it
               is applied (Gemma's norms multiply by 1 + weight). The rope-bands variant edits it there.
    rope_pairs: how a head's channels pair up in the rotation: "half" (i, i + d/2; rotate_half) or
               "interleaved" (2i, 2i + 1; GPT-J).
    """

    blocks: str
    out_proj: str
    weight_in_rows: bool = False
    position: str = "rope"
    rotary: str | None = None
    final: tuple[str, ...] = ("model.norm",)
    qk_proj: tuple[str, str] | None = ("self_attn.q_proj", "self_attn.k_proj")
    q_norm: str | None = None
    norm_offset: float = 0.0
    rope_pairs: str = "half"


_LLAMA_LIKE = Family(blocks="model.layers", out_proj="self_attn.o_proj", rotary="model.rotary_emb")

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": replace(_LLAMA_LIKE, q_norm="self_attn.q_norm"),
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": replace(_LLAMA_LIKE, q_norm="self_attn.q_norm", norm_offset=1.0),
    "phi3": replace(_LLAMA_LIKE, qk_proj=None),  # one fused qkv_proj
    "phi": Family(blocks="model.layers", out_proj="self_attn.dense", rotary="model.rotary_emb",
                  final=("model.final_layernorm",)),
    "gpt2": Family(blocks="transformer.h", out_proj="attn.c_proj", weight_in_rows=True, position="learned",
                   final=("transformer.ln_f",), qk_proj=None),
    "opt": Family(blocks="model.decoder.layers", out_proj="self_attn.out_proj", position="learned",
                  final=("model.decoder.final_layer_norm", "model.decoder.project_out")),
    "bloom": Family(blocks="transformer.h", out_proj="self_attention.dense", position="alibi",
                    final=("transformer.ln_f",), qk_proj=None),
    "mpt": Family(blocks="transformer.blocks", out_proj="attn.out_proj", position="alibi",
                  final=("transformer.norm_f",), qk_proj=None),
    "gpt_neox": Family(blocks="gpt_neox.layers", out_proj="attention.dense", rotary="gpt_neox.rotary_emb",
                       final=("gpt_neox.final_layer_norm",), qk_proj=None),
    "falcon": Family(blocks="transformer.h", out_proj="self_attention.dense", rotary="transformer.rotary_emb",
                     final=("transformer.ln_f",), qk_proj=None),
    "gptj": Family(blocks="transformer.h", out_proj="attn.out_proj", final=("transformer.ln_f",),
                   qk_proj=("attn.q_proj", "attn.k_proj"), rope_pairs="interleaved"),
}


@dataclass
class Arch:
    """A model resolved against the family table."""

    model_type: str
    family: Family
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    position: str
    out_projs: list[nn.Module]  # one per layer, in order
    q_projs: list[nn.Module] | None = None  # the separate query projections, or None (fused, or none)

    @property
    def n_total_heads(self) -> int:
        return self.n_layers * self.n_heads

    def out_proj_path(self, layer: int) -> str:
        return f"{self.family.blocks}.{layer}.{self.family.out_proj}"

    def site_proj_path(self, site: str, layer: int) -> str:
        """The dotted path of the projection where scales of `site` act in `layer` (`site_projs`)."""
        if site == "query":
            self.check_query_site()
            return f"{self.family.blocks}.{layer}.{self.family.qk_proj[0]}"
        return self.out_proj_path(layer)

    def head_weight(self, layer: int, head: int) -> torch.Tensor:
        """View of the weight entries that multiply head `head` of layer `layer`."""
        w = self.out_projs[layer].weight
        sl = slice(head * self.head_dim, (head + 1) * self.head_dim)
        return w[sl, :] if self.family.weight_in_rows else w[:, sl]

    def check_query_site(self) -> None:
        """Query-side scales act on, and fold into, a head's own rows of the query projection, so the
        projection must be the last per-head weight on the way to the attention logits. Refused, in
        one line, where queries come from a fused projection, or pass a norm after it (Gemma 3,
        Qwen 3): that norm divides each head's query by its size, so a per-head scale would do
        nothing, and its weight is shared by the heads, so there is no per-head weight after it."""
        use = "use output-side scales: --scales heads, all-heads or channels"
        if self.q_projs is None:
            raise PearError(f"query-side scales need a separate query projection; {self.model_type} computes its "
                            f"queries in a fused one ({use})")
        if self.family.q_norm:
            raise PearError(f"query-side scales cannot act on {self.model_type}: its query norm, shared by the heads, "
                            f"normalises each head's query after the projection and would cancel the scale ({use})")

    def site_projs(self, site: str) -> list[nn.Module]:
        """The projections, one per layer, where scales of `site` act and fold: the output
        projections, or the query projections (`check_query_site` refuses a family without them)."""
        if site == "query":
            self.check_query_site()
            return self.q_projs
        return self.out_projs

    def query_rows(self, layer: int, head: int) -> list[torch.Tensor]:
        """Views of the query projection's rows (and bias) that make head `head`'s queries, for the
        query-side scales (`check_query_site` says where there are none)."""
        self.check_query_site()
        q = self.q_projs[layer]
        sl = slice(head * self.head_dim, (head + 1) * self.head_dim)
        return [q.weight[sl, :]] + ([q.bias[sl]] if q.bias is not None else [])

    def check_head(self, layer: int, head: int) -> None:
        if not (isinstance(layer, int) and 0 <= layer < self.n_layers):
            raise PearError(f"layer {layer} out of range: this {self.model_type} model has layers 0..{self.n_layers - 1}")
        if not (isinstance(head, int) and 0 <= head < self.n_heads):
            raise PearError(f"head {head} out of range: this {self.model_type} model has heads 0..{self.n_heads - 1}")


def supported() -> list[str]:
    return sorted(FAMILIES)


def _config_of(model: nn.Module):
    cfg = model.config
    if cfg.model_type not in FAMILIES and getattr(cfg, "text_config", None) is not None:
        return cfg.text_config  # multimodal wrappers keep the language model's config here
    return cfg


def _first_attr(cfg, names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def resolve(model: nn.Module) -> Arch:
    """Resolve `model` against the family table; one clear error if it is not supported."""
    cfg = _config_of(model)
    mt = getattr(cfg, "model_type", None)
    if mt not in FAMILIES:
        raise PearError(f"unsupported model_type '{mt}'; supported: {', '.join(supported())}")
    fam = FAMILIES[mt]
    blocks = model.get_submodule(fam.blocks)
    out_projs = [blk.get_submodule(fam.out_proj) for blk in blocks]
    n_heads = _first_attr(cfg, ["num_attention_heads", "n_head", "n_heads"])
    if mt == "falcon":
        n_kv = cfg.num_kv_heads if cfg.new_decoder_architecture else (1 if cfg.multi_query else n_heads)
    else:
        n_kv = _first_attr(cfg, ["num_key_value_heads", "n_head_kv"], n_heads)
    w = out_projs[0].weight
    in_features = w.shape[0] if fam.weight_in_rows else w.shape[1]
    head_dim = getattr(cfg, "head_dim", None) if mt != "falcon" else None
    if not isinstance(head_dim, int) or head_dim <= 0:
        head_dim = in_features // n_heads
    if n_heads * head_dim != in_features:
        raise PearError(
            f"{mt}: {n_heads} heads x head_dim {head_dim} != output projection input size {in_features}"
        )
    position = fam.position
    if mt == "falcon" and getattr(cfg, "alibi", False):
        position = "alibi"
    q_projs = [blk.get_submodule(fam.qk_proj[0]) for blk in blocks] if fam.qk_proj else None
    return Arch(mt, fam, len(out_projs), n_heads, n_kv, head_dim, position, out_projs, q_projs)

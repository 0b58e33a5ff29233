"""`pear inspect`: what pear sees in a model (family, heads, head_dim, position embedding)."""

from __future__ import annotations

from .errors import PearError
from .families import resolve
from .dtypes import dtype_name
from .loading import count_parameters


def _query_side_scales(arch) -> str:
    """Whether `--scales query-heads/query-channels` can act on this model, or why not."""
    try:
        arch.check_query_site()
    except PearError as e:
        return f"no: {e}"
    return "yes"


def describe(loaded) -> dict:
    model = loaded.model
    arch = resolve(model)
    return {
        "model": loaded.spec.spec,
        "source": loaded.spec.kind,
        "family": arch.model_type,
        "layers": arch.n_layers,
        "heads": arch.n_heads,
        "kv_heads": arch.n_kv_heads,
        "head_dim": arch.head_dim,
        "position_embedding": arch.position,
        "output_projection": arch.out_proj_path(0).replace(".0.", ".{layer}."),
        "query_projection": (f"{arch.family.blocks}.{{layer}}.{arch.family.qk_proj[0]}" if arch.q_projs is not None
                             else "fused with keys and values"),
        "query_side_scales": _query_side_scales(arch),
        "weight_layout": "[in, out] (Conv1D)" if arch.family.weight_in_rows else "[out, in] (Linear)",
        "parameters": count_parameters(model),
        "dtype": dtype_name(model),
    }

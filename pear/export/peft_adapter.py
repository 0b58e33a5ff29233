"""Write the re-weighting as a PEFT IA3 adapter: switch it on and off at run time.

IA3 on a module listed in both ``target_modules`` and ``feedforward_modules`` multiplies the
module's *input* by a learned vector ``ia3_l`` (1, in_features) and leaves its bias alone. On
the attention output projection that input is the concatenation of the heads' outputs, so
``ia3_l`` = the layer's input-channel scales (a head's coefficient repeated over head_dim) is
exactly PEAR's head scaling; ``merge_and_unload()`` multiplies the weight's input columns by
it, which is `pear fold`. The scales do not depend on the weights, so the adapter applies to
any copy of the base model (hub checkpoint, GGUF dequantised by transformers).

Query-side scales (site "query") multiply each head's query, bias included: IA3 on the query
projection as an ordinary (not feed-forward) module multiplies its *output* by ``ia3_l``
(out_features, 1), and ``merge_and_unload()`` scales the weight's rows and the bias, which is
`pear fold` of query-side scales.

    from peft import PeftModel
    model = PeftModel.from_pretrained(base_model, "path/to/adapter")   # re-weighted
    with model.disable_adapter(): ...                                  # the base model
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..errors import PearError
from ..families import resolve
from .scales import ChannelScaling, check_channel_scales, relative_tolerance


def _peft():
    try:
        import peft
    except ImportError:
        raise PearError("--format peft needs the peft package: pip install 'peft>=0.13,<0.22'") from None
    return peft


def ia3_config(model, scales: Mapping[int, torch.Tensor], base_name: str | None, site: str = "output"):
    """IA3Config on the projections where `site`'s scales act, in the layers that have scales: the
    output projections scaled at their input, or the query projections at their output."""
    peft = _peft()
    arch = resolve(model)
    modules = [arch.site_proj_path(site, layer) for layer in sorted(scales)]
    at_input = site == "output"
    return peft.IA3Config(task_type="CAUSAL_LM", target_modules=modules, feedforward_modules=modules if at_input else [],
                          fan_in_fan_out=arch.family.weight_in_rows and at_input, base_model_name_or_path=base_name,
                          inference_mode=True)


@torch.no_grad()
def write_adapter(model, scales: Mapping[int, torch.Tensor], out: str | Path, base_name: str | None = None,
                  site: str = "output") -> Path:
    """Save an IA3 adapter carrying `scales` (fp32) into folder `out`. `model` is the *unfolded*
    base model; it is wrapped for the save and unwrapped again, weights untouched."""
    peft = _peft()
    arch = resolve(model)
    scales = check_channel_scales(arch, scales)
    wrapped = peft.get_peft_model(model, ia3_config(model, scales, base_name, site))
    try:
        for layer, v in scales.items():
            mod = wrapped.base_model.model.get_submodule(arch.site_proj_path(site, layer))
            ia3 = mod.ia3_l["default"]  # (1, in) at a Linear's input, (in, 1) for Conv1D; (out, 1) at its output
            ia3.data = v.reshape(ia3.shape).to(device=ia3.device, dtype=torch.float32)
        wrapped.peft_config["default"].base_model_name_or_path = base_name
        wrapped.save_pretrained(str(out))
    finally:
        wrapped.unload()  # removes the IA3 wrappers; `model` is the base model again
    return Path(out)


@torch.no_grad()
def verify_adapter(model, scales: Mapping[int, torch.Tensor], folder: Path, input_ids: torch.Tensor,
                   site: str = "output") -> dict:
    """Load the saved adapter on `model` (unfolded base) with `PeftModel.from_pretrained` and
    compare its logits with the hooked reference (`site`'s channels scaled by `scales`)."""
    peft = _peft()
    ids = input_ids.to(next(model.parameters()).device)
    with ChannelScaling(model, scales, site):
        ref = model(ids, use_cache=False).logits.float()
    loaded = peft.PeftModel.from_pretrained(model, str(folder))
    try:
        got = loaded(input_ids=ids, use_cache=False).logits.float()
    finally:
        loaded.unload()
    scale = max(1.0, float(ref.abs().max()))
    tol = relative_tolerance(next(model.parameters()).dtype) * scale
    v = {"max_abs_logit_diff": float((got - ref).abs().max()), "tolerance": tol, "logits_max_abs": scale,
         "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
         "compared_with": "the base model with the same scales applied by hooks"}
    if v["max_abs_logit_diff"] > tol:
        raise PearError(f"adapter verification failed: PeftModel logits differ from the re-weighted model's by "
                        f"{v['max_abs_logit_diff']:.3g} > tolerance {tol:.3g}; nothing saved")
    return v

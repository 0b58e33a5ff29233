"""Random-initialised models of real shapes, for speed and memory work.

Time and memory depend on shapes, not on trained values, so a Llama-2-7B-shaped model with
random weights measures what the real one would cost. Only the shape fields of each
configuration are written here (from the published config.json files).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHAPES = {
    # name: (model_type, shape fields)
    "llama2-7b": ("llama", dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                hidden_size=4096, intermediate_size=11008, vocab_size=32000,
                                max_position_embeddings=4096, rope_theta=10000.0)),
    "qwen2.5-7b": ("qwen2", dict(num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                 hidden_size=3584, intermediate_size=18944, vocab_size=152064,
                                 max_position_embeddings=32768, rope_theta=1000000.0)),
    "qwen2.5-32b": ("qwen2", dict(num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                                  hidden_size=5120, intermediate_size=27648, vocab_size=152064,
                                  max_position_embeddings=32768, rope_theta=1000000.0)),
    # tiny shape so CI runs the scripts themselves on CPU
    "tiny": ("llama", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                           intermediate_size=128, vocab_size=256, max_position_embeddings=4096)),
}


def config_for(shape: str, **override):
    """The configuration of `shape`; `override` replaces fields (e.g. vocab_size for a tokenizer)."""
    model_type, fields = SHAPES[shape]
    cfg = AutoConfig.for_model(model_type, **{**fields, **override})
    cfg.bos_token_id, cfg.eos_token_id = 1, 2
    return cfg


@torch.no_grad()
def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Cheap random init on the parameters' own devices (normal 0.02, norms at 1)."""
    g_cpu = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0 if "norm" in name else 0.0)
        else:
            g = torch.Generator(device=p.device).manual_seed(int(torch.randint(0, 2**31, (1,), generator=g_cpu)))
            p.normal_(0.0, 0.02, generator=g)


def build(shape: str, device: str = "cuda", dtype=torch.bfloat16, device_map: str | None = None,
          attn_implementation: str = "sdpa", seed: int = 0, **override):
    """A random model of `shape`: on one device, or spread over GPUs with device_map="auto"."""
    cfg = config_for(shape, **override)
    if device_map is None:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
        _randomise(model, seed)
        return model.eval()
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()
    nosplit = model._no_split_modules
    # "auto" would fill GPU 0 first (a 32B model fits one H200): balance the layers instead
    balanced = get_balanced_memory(model, dtype=dtype, no_split_module_classes=nosplit)
    dmap = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=nosplit, dtype=dtype)
    for name, dev in dmap.items():  # materialise every module on its own device
        mod = model.get_submodule(name) if name else model
        mod.to_empty(device=dev if isinstance(dev, str) else f"cuda:{dev}", recurse=True)
    with torch.no_grad():  # rotary inv_freq buffers were emptied too: recompute them (default RoPE)
        for m in model.modules():
            if hasattr(m, "inv_freq") and hasattr(m, "compute_default_rope_parameters"):
                inv, _ = m.compute_default_rope_parameters(m.config, m.inv_freq.device)
                m.inv_freq.copy_(inv)
                m.original_inv_freq.copy_(inv)
    _randomise(model, seed)
    return dispatch_model(model, dmap).eval()

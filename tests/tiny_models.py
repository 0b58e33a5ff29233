"""Tiny random-initialised models, one per family in the family table (no downloads).

Shapes are chosen so that each family's quirks show: GQA (KV heads < heads), head_dim set
explicitly with heads x head_dim != hidden (Gemma), partial rotary (Phi), Conv1D (GPT-2).
"""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128

CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256),
    "mistral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, sliding_window=None),
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256),
    "qwen3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256),
    "gemma": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=24, max_position_embeddings=256),
    "gemma2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=24, max_position_embeddings=256, sliding_window=64),
    "gemma3_text": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=24, max_position_embeddings=256, sliding_window=64),
    "phi3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0),
    "phi": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, partial_rotary_factor=0.5),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "opt": dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, word_embed_proj_dim=64),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "mpt": dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=256, expansion_ratio=2),
    "gpt_neox": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True,
                   num_kv_heads=2, alibi=False, bias=True),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8),
}


def tiny_model(model_type: str, seed: int = 0, dtype=torch.float32):
    """A tiny random model of `model_type`; biases randomised too, so 'bias untouched' is tested."""
    kw = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **CONFIGS[model_type])
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():  # default init zeroes biases and can make layers trivial
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def tiny_llama(tokenizer, layers: int = 2, seed: int = 0):
    """A random llama of `layers` layers with a real tokenizer's vocabulary and a 256-token window."""
    cfg = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()

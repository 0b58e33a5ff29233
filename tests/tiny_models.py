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


def tiny_model(model_type: str, seed: int = 0, dtype=torch.float32, vocab: int = VOCAB, **config):
    """A tiny random model of `model_type` (`config` overrides CONFIGS); biases randomised too, so 'bias
    untouched' is tested."""
    kw = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, **{**CONFIGS[model_type], **config})
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


def tiny_gguf(path, model_type: str, tokenizer_gguf, vocab: int = 4096, quantise=("attn_q.weight",), seed: int = 0,
              initializer_range: float = 0.02):
    """Write `tiny_model(model_type)` as a GGUF file at `path`, with the first `vocab` tokens of the
    GGUF file `tokenizer_gguf`'s BPE vocabulary (and the merges among them: ids follow merge order,
    so common words stay whole), tensors named and laid out as llama.cpp's converter stores this
    family (no row permutation, as for "qwen2"), the tensors whose names end in one of `quantise` in
    Q8_0, the rest F32; `initializer_range` above the default sharpens attention, so that scaling
    queries shows in the logits. Returns the model (fp32, as written before quantisation)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(tokenizer_gguf))
    model = tiny_model(model_type, seed, vocab=vocab, initializer_range=initializer_range)
    cfg, arch = model.config, {"qwen2": gguf.MODEL_ARCH.QWEN2}[model_type]
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()[:vocab]
    kept = set(tokens)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value, types = field.contents(), field.types
        if key == "tokenizer.ggml.merges":
            value = [m for m in value if "".join(m.split(" ")) in kept and set(m.split(" ")) <= kept]
        elif types[0] == gguf.GGUFValueType.ARRAY:
            value = value[:vocab]
        w.add_key_value(key, value, types[0], sub_type=types[-1] if types[0] == gguf.GGUFValueType.ARRAY else None)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    for name, p in model.state_dict().items():
        g = names.get_name(name, try_suffixes=(".weight", ".bias"))
        data = p.numpy().astype(np.float32)
        if g.endswith(tuple(quantise)):
            q = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(g, gguf.quants.quantize(data, q), raw_shape=gguf.quant_shape_to_byte_shape(data.shape, q),
                         raw_dtype=q)
        else:
            w.add_tensor(g, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model

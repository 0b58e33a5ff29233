"""Peak GPU memory of `pear fit` on a 7B-shaped model: does it fit one 80 GB GPU?

    python3 benchmarks/fit_memory_gpu.py                  # needs one CUDA GPU; ~2-5 min on an H100

The model is a randomly initialised Llama-2-7B-shaped llama (32 layers x 32 heads, hidden 4096,
MLP 11008, vocab 32000) in bf16, so nothing is downloaded: memory depends on shapes, not on
weight values. For each configuration (default fit, micro-batches of 5, gradient
checkpointing) it runs 3 optimiser steps of the default fit
(20 sequences of n = 50, K = 16 heads spread over layers 2..31, so the backward pass reaches
almost every layer) and records torch.cuda.max_memory_allocated and seconds per step.
Saves benchmarks/results/fit_memory_gpu.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    from transformers import LlamaConfig, LlamaForCausalLM

    from pear.fit import fit

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, bos_token_id=1)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    weights_gb = torch.cuda.memory_allocated() / 2**30
    heads = [(l, (7 * l) % 32) for l in range(2, 32, 2)] + [(31, 0)]  # 16 heads, layers 2..31
    rows = []
    for name, kw in [("default", {}), ("micro_batch=5", {"micro_batch": 5}),
                     ("grad_checkpointing", {"grad_checkpointing": True})]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        res = fit(model, None, heads, steps=3, progress=False, **kw)
        torch.cuda.synchronize()
        rows.append({"config": name, "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                     "seconds_per_step": round((time.perf_counter() - t) / 3, 3),
                     "loss_first_step": round(res.losses[0], 4)})
        print(rows[-1], flush=True)
    out = {"model": "Llama-2-7B shapes, random weights, bf16", "weights_gb": round(weights_gb, 2),
           "gpu": torch.cuda.get_device_name(), "total_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
           "fit": "K=16, batch 20 x (1 + 2*50) tokens, 3 steps", "results": rows,
           "torch": torch.__version__, "command": "python3 benchmarks/fit_memory_gpu.py"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fit_memory_gpu.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

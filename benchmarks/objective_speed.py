"""Seconds per fit step of each recipe's objective at a real model shape (BENCHMARKS.md §5).

    python3 benchmarks/objective_speed.py --shape qwen2.5-7b --tokenizer DIR --out objective_speed.json

A random-initialised model of the shape (`shapes.py`; time depends on shapes, not on trained
values) and a real tokenizer (text objectives render prompts with its chat template; the
vocabulary is widened to the tokenizer's where it is larger). For each recipe, `pear.fit` runs
1 step and then 1 + STEPS steps (after a warm-up) with the recipe's settings; seconds per step is the difference
over STEPS, so model set-up and the held-out metrics cancel. Every step draws a fresh batch
of the recipe's size (e.g. 10 SQuAD questions among 20 passages, ~3k tokens each).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pear.atomic import write_text  # noqa: E402
from pear.fit import fit  # noqa: E402
from pear.heads import all_heads  # noqa: E402
from pear.recipes import RECIPES  # noqa: E402
from pear.settings import FitSettings  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_fit(model, tok, heads, settings: FitSettings, device: str, data_dir) -> tuple[float, object]:
    sync(device)
    t = time.perf_counter()
    res = fit(model, tok, heads, settings, progress=False, data_dir=data_dir)
    sync(device)
    return time.perf_counter() - t, res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-7b", choices=sorted(shapes.SHAPES))
    ap.add_argument("--tokenizer", required=True, help="a tokenizer folder (e.g. saved from the model's GGUF)")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--steps", type=int, default=3, help="timed steps per recipe")
    ap.add_argument("--k", type=int, default=20, help="heads scaled by recipes with top-K heads")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    vocab = max(shapes.config_for(a.shape).vocab_size, len(tok))
    model = shapes.build(a.shape, device=a.device, dtype=dtype, vocab_size=vocab)
    every = all_heads(model)
    for name in ("paper", "retrieval"):  # warm-up: CUDA kernels, the SQuAD file (cached after its first read)
        if name in RECIPES:
            fit(model, tok, every[:2], FitSettings(**{**RECIPES[name].fit, "scales": "heads", "steps": 1,
                                                       "eval_batch": 1, "batch": 1}), progress=False,
                data_dir=a.data_dir)
    rows = {}
    for name in a.recipes.split(","):
        fit_fields = dict(RECIPES[name].fit)
        heads = every if fit_fields.get("scales", "heads") != "heads" else every[:: max(1, len(every) // a.k)][:a.k]
        base = FitSettings(**{**fit_fields, "eval_batch": 2, "steps": 1, "warmup": 0})
        t1, _ = timed_fit(model, tok, heads, base, a.device, a.data_dir)
        tn, res = timed_fit(model, tok, heads, FitSettings(**{**base.as_dict(), "steps": 1 + a.steps, "warmup": 0}),
                            a.device, a.data_dir)
        per = (tn - t1) / a.steps
        peak = torch.cuda.max_memory_allocated() / 2**30 if a.device.startswith("cuda") else None
        rows[name] = {"objective": base.objective, "scales": base.scales, "sequences_per_step": base.batch,
                      "scaled_heads": len(heads), "seconds_per_step": round(per, 3),
                      "seconds_per_sequence": round(per / base.batch, 4), "peak_gib": peak and round(peak, 1)}
        print(json.dumps({name: rows[name]}), flush=True)
    out = {"command": "python3 " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
           "shape": a.shape, "vocab_size": vocab, "dtype": a.dtype, "device": a.device,
           "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor(),
           "torch": torch.__version__, "transformers": __import__("transformers").__version__,
           "python": platform.python_version(), "timed_steps": a.steps, "recipes": rows}
    write_text(a.out, json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does excluding cuDNN SDPA change discovery time on a GPU? (one-off check for issue 6)
    python3 benchmarks/backend_check.py {default,nocudnn} [shape]"""
import contextlib
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
import shapes  # noqa: E402
from pear.discover import discover  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

mode = sys.argv[1]
shape = sys.argv[2] if len(sys.argv) > 2 else "llama2-7b"
m = shapes.build(shape, device="cuda", dtype=torch.bfloat16, attn_implementation="sdpa", seed=0)
for p in m.parameters():
    p.requires_grad_(False)
ctx = (sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
       if mode == "nocudnn" else contextlib.nullcontext())
with ctx:
    for method in ["fast", "fast", "exact"]:
        torch.cuda.synchronize()
        t = time.perf_counter()
        r = discover(m, None, method=method, k=20, progress=False)
        torch.cuda.synchronize()
        print(mode, shape, method, round(time.perf_counter() - t, 2), r.top(5), flush=True)

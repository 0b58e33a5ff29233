"""Attention of one decoding step over a static cache: which kernel reads the cache fastest?

    python3 benchmarks/decode_attention.py --device cuda --rows 512 --length 2048 --kv-heads 2 --groups 7 \\
        --out benchmarks/results/decode_attention_h100.json

Why: in `pear eval --decode continuous-static` (Qwen2.5-Coder-0.5B, mdqa-10, 512 slots of 2,048
columns) the step's attention took 333 us per layer on an H100 (the memory-efficient SDPA kernel, one
query row per head, the group's query heads laid out as rows of their key/value head:
`step_attention.grouped_attention`), where reading the layer's keys and values (537 MB) takes ~160 us
at the card's bandwidth. Each row attends to the columns its mask allows (a contiguous range: its prompt,
then its new tokens).

Candidates, on random inputs of the step's shapes (q (B, H, 1, D), cache (B, KVH, L, D), a boolean
mask (B, L) of one contiguous range per row):
* sdpa: the current path (memory-efficient kernel, boolean mask broadcast over heads);
* matmul: scores by a batched matrix product, softmax in fp32, a second product (transformers'
  "eager" attention, grouped);
* flex: `torch.nn.attention.flex_attention` compiled (its decoding kernel splits the keys over
  thread blocks and reads each key/value head once for its group), the mask as a BlockMask;
* flash: FlashAttention-2 through `aten::_flash_attention_forward`, each row's range addressed in
  place in the cache (`cu_seqlens_k` at the range's first column, `seqused_k` its length), the group's
  query heads as query rows.
Each is timed over `--iters` calls after a warm-up (CUDA events), and checked against a float64
reference (max abs error). Prints and saves a table with the command, versions and hardware.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import torch
import torch.nn.functional as F


def inputs(rows: int, length: int, kv_heads: int, groups: int, dim: int, device: str, dtype, seed: int):
    """q (B, H, 1, D), k and v (B, KVH, L, D), mask (B, L) bool with one range [start, end) per row."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, kv_heads * groups, 1, dim, generator=g).to(device, dtype)
    k, v = (torch.randn(rows, kv_heads, length, dim, generator=g).to(device, dtype) for _ in range(2))
    end = torch.randint(length // 2, length + 1, (rows,), generator=g)
    start = (end - torch.randint(1, length // 2, (rows,), generator=g)).clamp(min=0)
    cols = torch.arange(length)
    mask = ((cols >= start[:, None]) & (cols < end[:, None])).to(device)
    return q, k, v, mask, start.to(device), end.to(device)


def reference(q, k, v, mask, groups):
    B, H, _, D = q.shape
    kk = k.double().repeat_interleave(groups, 1)
    vv = v.double().repeat_interleave(groups, 1)
    s = (q.double() @ kk.transpose(-1, -2)) / D ** 0.5  # (B, H, 1, L)
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (s.softmax(-1) @ vv).transpose(1, 2)  # (B, 1, H, D)


def sdpa(q, k, v, mask, groups, **_):
    B, H, _, D = q.shape
    out = F.scaled_dot_product_attention(q.reshape(B, H // groups, groups, D), k, v, attn_mask=mask[:, None, None, :])
    return out.reshape(B, 1, H, D)


def matmul(q, k, v, mask, groups, **_):
    B, H, _, D = q.shape
    s = q.reshape(B, H // groups, groups, D) @ k.transpose(-1, -2) * D ** -0.5  # (B, KVH, G, L)
    p = s.float().masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1).to(v.dtype)
    return (p @ v).reshape(B, 1, H, D)


def flash(q, k, v, mask, groups, start, end, **_):
    from pear.evaluate.step_attention import flash_ranges  # what continuous-static's step calls

    return flash_ranges(q, k, v, start, end, q.shape[-1] ** -0.5)


def make_flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def flex(q, k, v, mask, groups, **_):
        B, H, _, D = q.shape
        L = k.shape[2]
        bm = create_block_mask(lambda b, h, qi, kv: mask[b, kv], B, None, 1, L, device=q.device)
        return compiled(q, k, v, block_mask=bm, enable_gqa=True).transpose(1, 2)  # (B, 1, H, D)
    return flex


def timed(fn, args, kw, iters: int, device: str) -> float:
    for _ in range(3):
        fn(*args, **kw)
    if not device.startswith("cuda"):
        import time

        t = time.perf_counter()
        for _ in range(iters):
            fn(*args, **kw)
        return (time.perf_counter() - t) / iters * 1e6
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(iters):
        fn(*args, **kw)
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters * 1e3  # us


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--groups", type=int, default=7, help="query heads per key/value head")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--kernels", default="sdpa,matmul,flash,flex")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also save the table here (JSON)")
    args = ap.parse_args(argv)
    from pear.provenance import provenance

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    q, k, v, mask, start, end = inputs(args.rows, args.length, args.kv_heads, args.groups, args.dim, args.device,
                                       dtype, args.seed)
    ref = reference(q, k, v, mask, args.groups)
    cache_bytes = 2 * k.numel() * k.element_size()
    res = {"command": "python3 benchmarks/decode_attention.py " + shlex.join(argv), "shape": vars(args),
           "cache_mb": cache_bytes / 1e6, "kernels": {}, **provenance(args.device)}
    fns = {"sdpa": sdpa, "matmul": matmul, "flash": flash}
    for name in [x.strip() for x in args.kernels.split(",") if x.strip()]:
        try:
            fn = make_flex() if name == "flex" else fns[name]
            kw = dict(start=start, end=end)
            with torch.no_grad():
                err = (fn(q, k, v, mask, args.groups, **kw).double() - ref).abs().max().item()
                us = timed(fn, (q, k, v, mask, args.groups), kw, args.iters, args.device)
            res["kernels"][name] = {"us": us, "max_abs_err": err, "gb_per_s": cache_bytes / us / 1e3}
            print(f"{name:8s} {us:9.1f} us  {cache_bytes / us / 1e3:7.0f} GB/s of cache read  max err {err:.2e}",
                  flush=True)
        except Exception as e:  # a kernel this torch or device lacks
            res["kernels"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            print(f"{name:8s} failed: {res['kernels'][name]['error']}", flush=True)
    if args.out:
        from pear.atomic import write_text

        write_text(args.out, json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

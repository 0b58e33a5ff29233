"""Write the re-weighting into a GGUF file, for llama.cpp, Ollama and LM Studio.

The output is the base GGUF file with every key, every tensor and every byte kept, except the
attention output tensors (``blk.N.attn_output.weight``) of the layers that have scales. In
those, only the quantisation blocks whose input channels are scaled are rewritten: each is
dequantised, multiplied by its channels' scales, and quantised again in the original type.
The `gguf` package can quantise Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (and the float types); a tensor in
any other type (K-quants, i-quants) is re-quantised whole to Q8_0 (F16 where a row is not a
multiple of 32), which the metadata (``pear.attn_output_types``) and the report say. So is a
tensor whose scales vary inside a quantisation block (per-channel coefficients): re-quantising
such a block in its own 4- or 5-bit type would find new integers and add a second rounding as
large as the first, while Q8_0 rounds 16 times finer.

Why this is nearly lossless: a per-head scale is constant over a head's head_dim channels, and
a quantisation block (32 channels) lies inside one head when head_dim is a multiple of 32; a
block x = d*q (+ m) scaled by alpha is the block with d (and m) scaled by alpha, so the
quantiser finds the same integers and only the fp16 block scales round again.

Orientation: GGUF stores attn_output as ne = [in, out], i.e. numpy [out, in], the same as
torch's Linear weight; llama.cpp permutes q/k for llama, never attn_output. A quantisation
block runs along the last numpy axis, the input channels. `verify` checks all of it end to
end: the written file, loaded back with transformers, against the folded model's logits.

Query-side scales (site "query") scale the *rows* of ``blk.N.attn_q.weight`` (and its bias):
every block lies inside one row, so every block is scaled whole and keeps its type and integers,
per-channel scales too. For the GGUF architectures in PERMUTED_QUERY, llama.cpp's converter
stored each head's query rows interleaved for its rotation (rows i and i + D/2 side by side), so
the scales are permuted the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..errors import PearError

REQUANTISABLE = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F32", "F16", "BF16"}

# Accepted max |GGUF - folded| logit difference relative to max |logit|, by how the scaled
# attn_output tensors were stored (benchmarks/results/export_formats_cpu.md). Measured: repacked,
# SmolLM2-135M Q4_1 (12 heads) 1.7e-4, Qwen2.5-Coder-0.5B Q5_0 1.6e-5; re-quantised whole to Q8_0,
# which rounds unscaled channels too: Gemma-3-270M Q4_K 5.1e-3, SmolLM2 Q4_1 (forced) 2.6e-3, SmolLM2
# per-channel scales 1 + 0.1 N(0, 1) on all 270 heads (30 tensors Q4_1 -> Q8_0) 7.4e-3.
GGUF_TOLERANCE = {"repacked": 2e-3, "Q8_0": 2e-2, "F16": 5e-3}

# GGUF architectures whose query rows llama.cpp's convert_hf_to_gguf.py permutes (LlamaModel.permute)
# and transformers un-permutes on loading (LlamaTensorProcessor)
PERMUTED_QUERY = {"llama"}


SCALED_TENSORS = {"output": "attention output", "query": "query (weight and bias)"}  # what a site's scales rewrite


def types_key(site: str) -> str:
    """The metadata key (after "pear.") and pear.json key saying how the scaled tensors were stored."""
    return "attn_q_types" if site == "query" else "attn_output_types"


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # a truncated or foreign file: gguf raises ValueError, struct.error, ...
        raise PearError(f"{path} is not a readable GGUF file: {e}") from None


def _target_type(qtype, n_in: int, blockwise_constant: bool = True):
    """(type to write, how): the original type where gguf can quantise it and every block's
    channels share one scale (a block scaled as a whole keeps its integers), else Q8_0 or F16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

    if qtype.name in REQUANTISABLE and blockwise_constant:
        return qtype, "repacked"
    fallback = T.Q8_0 if n_in % GGML_QUANT_SIZES[T.Q8_0][0] == 0 else T.F16
    return fallback, fallback.name


def scale_tensor(tensor, v: torch.Tensor, axis: str = "in") -> tuple[np.ndarray, object, str]:
    """New data for one GGUF tensor with its input channels (`axis` "in": attn_output) or its rows
    (`axis` "out": attn_q's weight, or its bias) scaled by `v`.
    Returns (data as gguf stores it, its GGML type, "repacked" | "Q8_0" | "F16")."""
    from gguf import GGML_QUANT_SIZES, quants

    qtype = tensor.tensor_type
    w = quants.dequantize(tensor.data, qtype).astype(np.float32)  # (out, in), or (out,) for a bias
    scale = v.numpy().astype(np.float32)
    rows = axis == "out"
    fits = w.shape[0] == scale.size if rows else (w.ndim == 2 and w.shape[1] == scale.size)
    if not fits:
        raise PearError(f"{tensor.name}: shape {tuple(w.shape)} does not match {scale.size} "
                        f"{'rows' if rows else 'input channels'} (heads x head_dim); is this GGUF file the same model?")
    bs = GGML_QUANT_SIZES[qtype][0]  # channels per block (1 for float types)
    if rows:  # a block runs along one row's input channels: every block is scaled whole
        whole, touched = True, scale != 1  # (out,)
        scaled = w * scale.reshape(-1, *[1] * (w.ndim - 1))
    else:
        blocks = scale.reshape(-1, bs)  # (in / bs, bs)
        whole, touched = bool((blocks == blocks[:, :1]).all()), (blocks != 1).any(axis=1)  # (in / bs,)
        scaled = w * scale[None, :]
    target, how = _target_type(qtype, w.shape[-1], whole)
    new = quants.quantize(scaled, target)
    if how == "repacked" and new.dtype == np.uint8:  # keep the bytes of blocks with no scaled channel
        ts = GGML_QUANT_SIZES[qtype][1]
        old = np.asarray(tensor.data).reshape(w.shape[0], -1, ts)  # (out, blocks, bytes)
        keep = touched[:, None, None] if rows else touched[None, :, None]
        new = np.where(keep, new.reshape(old.shape), old).reshape(np.asarray(tensor.data).shape)
    return np.ascontiguousarray(new), target, how


def _targets(site: str, scales: Mapping[int, torch.Tensor], tensors: Mapping, reader, arch: str) -> dict:
    """{tensor name: (axis, scales in the file's order)} for `site`'s scales; a missing weight is refused."""
    if site != "query":
        out = {f"blk.{layer}.attn_output.weight": ("in", v) for layer, v in scales.items()}
    else:
        out, H = {}, int(reader.fields[f"{arch}.attention.head_count"].contents())
        for layer, v in scales.items():
            if arch in PERMUTED_QUERY:  # HF row h*D + a*D/2 + j is GGUF row h*D + 2j + a
                v = v.reshape(H, 2, -1).transpose(1, 2).reshape(-1)
            out[f"blk.{layer}.attn_q.weight"] = ("out", v)
            if f"blk.{layer}.attn_q.bias" in tensors:
                out[f"blk.{layer}.attn_q.bias"] = ("out", v)
    missing = [n for n in out if n not in tensors]
    if missing:
        raise PearError(f"GGUF file has no tensor {missing[0]}: cannot place the {site}-side scales")
    return out


def write_gguf(base: str | Path, scales: Mapping[int, torch.Tensor], out: str | Path,
               metadata: Mapping[str, str], site: str = "output") -> dict:
    """Write `out`: `base` with the tensors where `site`'s scales act (attn_output, or attn_q and its
    bias) rescaled in `scales`' layers and `metadata` (str -> str, keys under "pear.") added.
    Returns what was stored per tensor."""
    import gguf

    base, out = Path(base), Path(out)
    reader = _reader(base)
    tensors = {t.name: t for t in reader.tensors}
    arch = reader.fields["general.architecture"].contents()
    names = _targets(site, scales, tensors, reader, arch)
    writer = gguf.GGUFWriter(str(out), arch, endianess=reader.endianess)
    if "general.alignment" in reader.fields:
        writer.data_alignment = int(reader.fields["general.alignment"].contents())
    for field in reader.fields.values():  # as gguf's own gguf_new_metadata script copies them
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    stored, data = {}, {}
    for name, (axis, v) in names.items():
        t = tensors[name]
        new, qtype, how = scale_tensor(t, v, axis)
        data[name] = (new, qtype)
        stored[name] = {"original": t.tensor_type.name, "written": qtype.name, "how": how}
    for k, v in {**metadata, f"pear.{types_key(site)}": json.dumps(stored)}.items():
        writer.add_string(k, v)
    for t in reader.tensors:
        arr, qtype = data.get(t.name, (t.data, t.tensor_type))
        writer.add_tensor_info(t.name, arr.shape, arr.dtype, arr.nbytes, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(data.get(t.name, (t.data,))[0], tensor_endianess=reader.endianess)
    writer.close()
    return stored


def tolerance_for(stored: Mapping[str, dict]) -> float:
    """Relative logit tolerance for the least faithful way a tensor was stored."""
    return max(GGUF_TOLERANCE[s["how"]] for s in stored.values())


def load_back(path: Path):
    """The written file as transformers reads it (dequantised to fp32)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    finally:
        hf_logging.set_verbosity(verbosity)


@torch.no_grad()
def verify(path: Path, reference_model, input_ids: torch.Tensor, rel_tolerance: float) -> dict:
    """Load `path` with transformers (dequantised, fp32) and compare its logits with
    `reference_model`'s (the folded model) on `input_ids`. Raises PearError if too far."""
    back = load_back(path)
    ref = reference_model(input_ids.to(reference_model.device), use_cache=False).logits.float().cpu()
    got = back(input_ids, use_cache=False).logits.float()
    del back
    scale = max(1.0, float(ref.abs().max()))
    diff = float((got - ref).abs().max())
    v = {"max_abs_logit_diff": diff, "tolerance": rel_tolerance * scale, "logits_max_abs": scale,
         "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
         "compared_with": "the folded model (transformers), on the same input"}
    if diff > v["tolerance"]:
        raise PearError(f"GGUF verification failed: logits of the written file differ from the folded model's by "
                        f"{diff:.3g} > tolerance {v['tolerance']:.3g}; nothing saved")
    return v

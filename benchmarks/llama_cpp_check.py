r"""Does llama.cpp itself read pear's GGUF as transformers does? Greedy answers, token for token.

    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
      -DLLAMA_BUILD_TOOLS=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python   # source build, ~20 min on 2 cores
    pear fold --coefficients benchmarks/results/gpu_eval/runs/smollm2-135m-nonneg/coefficients.json \
              --format gguf --out /tmp/pear-gguf
    python3 benchmarks/llama_cpp_check.py /tmp/pear-gguf/SmolLM2-135M-Instruct.Q4_1.pear.gguf \
            [--base BASE.gguf] [--new-tokens 32] [--out benchmarks/results/llama_cpp_check.json]

For each prompt (chat template applied by the tokenizer, then the same token ids fed to both
engines, so tokenisation cannot differ): greedy continuation with llama.cpp (llama-cpp-python,
top_k=1, temperature 0) and with transformers loading the same GGUF (dequantised fp32,
do_sample=False). Reports, per prompt, whether the token ids are identical, the length of the
common prefix, and the texts; where the tokens part, how far apart transformers puts the two
candidates (each engine's logit of its own token minus its logit of the other's, after the
common prefix: a near tie that llama.cpp's own arithmetic, which quantises activations to 8 bits
for the dot products, can tip); the same for the base GGUF (defaults to the file named in the
pear GGUF's `pear.base_file` beside the preset's), and whether pear's change shows in either
engine. Not in the test suite: the llama.cpp build takes ~20 minutes on 2 CPU cores.
Result and reading: BENCHMARKS.md §7.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

PROMPTS = [
    "What is the capital of France? Answer in one word.",
    "Write the numbers from one to ten, separated by commas.",
    "Document: The Zorvex bridge, opened in 1931, spans the river Tal and is 412 metres long.\n"
    "Question: How long is the Zorvex bridge?",
    "Who wrote 'Pride and Prejudice'?",
    "Repeat exactly: alpha beta gamma delta epsilon.",
]


def greedy_llama_cpp(path: Path, prompts_ids, new_tokens: int):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=2, logits_all=False, verbose=False, seed=0)
    outs = []
    for ids in prompts_ids:
        llm.reset()
        got = []
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if tok == llm.token_eos() or len(got) >= new_tokens:
                break
            got.append(int(tok))
        outs.append(got)
    return outs, llm


def llama_cpp_gap(llm, ids, ours, theirs):
    """The same for llama.cpp: its logit of its own token minus its logit of transformers', the
    prompt evaluated at once and the common prefix token by token, as `generate` does."""
    import llama_cpp
    import numpy as np

    n = common_prefix(ours, theirs)
    if n >= len(ours) or n >= len(theirs):
        return None
    llm.reset()
    llm.eval(ids)
    for t in ours[:n]:
        llm.eval([t])
    z = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))
    return round(float(z[ours[n]] - z[theirs[n]]), 4)


def greedy_transformers(path: Path, prompts_ids, new_tokens: int, eos: int):
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pear.export.gguf_file import load_back

    model = load_back(path)
    outs = []
    with torch.no_grad():
        for ids in prompts_ids:
            x = torch.tensor([ids])
            y = model.generate(x, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
            got = [int(t) for t in y[0, len(ids):]]
            outs.append(got[:got.index(eos)] if eos in got else got)
    return outs, model


def logit_gap(model, ids, ours, theirs):
    """Where transformers' tokens `ours` and llama.cpp's `theirs` first differ: transformers' logit
    of its own token minus its logit of llama.cpp's (None where one output simply ended)."""
    import torch

    n = common_prefix(ours, theirs)
    if n >= len(ours) or n >= len(theirs):
        return None
    with torch.no_grad():
        z = model(torch.tensor([list(ids) + list(ours[:n])])).logits[0, -1].float()
    return round(float(z[ours[n]] - z[theirs[n]]), 4)


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--base", type=Path, default=None)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/llama_cpp_check.json"))
    a = ap.parse_args()
    import gguf
    import llama_cpp
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pear.loading import resolve_spec

    if a.base is None:
        name = gguf.GGUFReader(str(a.gguf)).fields["pear.base_file"].contents()
        a.base = Path(resolve_spec("smollm2-135m").path) / name
    tok = AutoTokenizer.from_pretrained(str(a.gguf.parent), gguf_file=a.gguf.name)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS]  # rendered as pear eval renders them: the text holds its special tokens
    ids = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    report = {"command": " ".join(sys.argv), "llama_cpp_python": llama_cpp.__version__,
              "platform": platform.platform(terse=True), "new_tokens": a.new_tokens, "files": {}}
    texts = {}
    for label, path in (("pear", a.gguf), ("base", a.base)):
        t = time.perf_counter()
        lc, llm = greedy_llama_cpp(path, ids, a.new_tokens)
        hf, model = greedy_transformers(path, ids, a.new_tokens, tok.eos_token_id)
        rows = [{"prompt": p, "identical": x == y, "common_prefix": common_prefix(x, y), "n_llama_cpp": len(x),
                 "n_transformers": len(y), "transformers_logit_gap": None if x == y else logit_gap(model, i, y, x),
                 "llama_cpp_logit_gap": None if x == y else llama_cpp_gap(llm, i, x, y),
                 "llama_cpp": tok.decode(x), "transformers": tok.decode(y)}
                for p, i, x, y in zip(PROMPTS, ids, lc, hf)]
        del model, llm
        texts[label] = (lc, hf)
        report["files"][label] = {"path": str(path), "identical": sum(r["identical"] for r in rows),
                                  "prompts": len(rows), "seconds": round(time.perf_counter() - t, 1), "rows": rows}
        print(f"{label}: {report['files'][label]['identical']}/{len(rows)} prompts give identical greedy tokens")
    report["pear_changes_output"] = {"llama_cpp": texts["pear"][0] != texts["base"][0],
                                     "transformers": texts["pear"][1] != texts["base"][1]}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"pear's change visible: {report['pear_changes_output']}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

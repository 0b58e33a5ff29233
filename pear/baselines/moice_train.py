"""`pear baseline train moice`: train MoICE's routers (model frozen) and save them.

    pear baseline train moice --model smollm2-135m --out runs/moice-smollm2
    pear eval --model smollm2-135m --variant moice --variant-option routers=runs/moice-smollm2 ...

The reference recipe (github.com/p1nksnow/MoICE, training/train.sh and train-balance.py): only
the routers train (``--only_train_gate``), AdamW (weight decay 0), constant learning rate 1e-4
(``lr_scheduler_type constant`` ignores its warmup ratio), gradient norm clipped at 1.0 (the
Trainer's default), 7 steps of 128 sequences (4 GPUs x 32 accumulation x 1), each about 4k
tokens of OpenHermes instructions in the Llama-2 chat format, loss = cross-entropy on *every*
token (``--pretrain_loss True``: prompt and answer) + 0.3 x the load-balancing loss.

What we use instead of OpenHermes (not here, and no evaluation task may see the training
data): SQuAD 2.0 dev passages and answerable questions from the data folder, as long
instructions: an instruction line, passages of several articles (the one holding the answer
at a random place among them) added until the sequence reaches `seq_len` tokens, the
question, then the answer as the assistant's turn (the model's chat template where it has
one). No evaluation task in the tables uses SQuAD (mdqa uses it only with the non-default
distractor pool nq+squad). Everything else is the reference's; all of it is an option and is
saved with the routers (moice.json), with the loss of every step.

A step of 128 sequences of 4k tokens takes minutes even on a GPU, so the state after every step
is kept beside the output folder (``DIR.resume.pt``) and the same command continues an
interrupted run from it; ``--micro-batch`` runs several sequences per forward pass.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from ..errors import PearError

INSTRUCTION = "Read the passages below and answer the question that follows them in a few words."
DEFAULTS = dict(steps=7, batch=128, seq_len=4096, lr=1e-4, aux_coef=0.3, max_grad_norm=1.0, seed=0)


# ---------------------------------------------------------------------------- data
def squad_items(data_dir) -> tuple[list[tuple[str, str]], list[tuple[int, str, str]]]:
    """(passages as (title, text), questions as (passage index, question, first answer))."""
    from ..evaluate import data

    passages, questions = [], []
    for art in data.read_json(data.data_file(data.resolve_data_dir(data_dir), data.SQUAD))["data"]:
        title = art["title"].replace("_", " ")
        for para in art["paragraphs"]:
            passages.append((title, para["context"].strip()))
            for qa in para["qas"]:
                if not qa.get("is_impossible") and qa["answers"]:
                    questions.append((len(passages) - 1, qa["question"].strip(), qa["answers"][0]["text"].strip()))
    return passages, questions


def render_example(tokenizer, docs: list[tuple[str, str]], question: str, answer: str | None) -> str:
    body = "\n\n".join(f"Passage {i + 1} ({t}): {x}" for i, (t, x) in enumerate(docs))
    prompt = f"{INSTRUCTION}\n\n{body}\n\nQuestion: {question}"
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": prompt}] + ([{"role": "assistant", "content": answer}] if answer else [])
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=answer is None)
    return f"{prompt}\nAnswer:" + (f" {answer}{tokenizer.eos_token or ''}" if answer else "")


def build_sequences(tokenizer, data_dir, n: int, seq_len: int, seed: int = 0) -> tuple[list[torch.Tensor], dict]:
    """`n` token sequences of at most `seq_len` tokens, each one long SQuAD instruction."""
    passages, questions = squad_items(data_dir)
    rng = random.Random(seed)
    lens = [len(tokenizer(f"Passage 10 ({t}): {x}\n\n", add_special_tokens=False).input_ids) for t, x in passages]
    seqs, n_docs = [], []
    for i in rng.sample(range(len(questions)), min(n, len(questions))):
        gold, q, a = questions[i]
        overhead = len(tokenizer(render_example(tokenizer, [], q, a)).input_ids)
        docs, budget = [gold], seq_len - overhead - lens[gold]
        for j in rng.sample(range(len(passages)), len(passages)):
            if budget <= 0:
                break
            if passages[j][0] != passages[gold][0] and lens[j] <= budget:  # other articles only
                docs.append(j)
                budget -= lens[j]
        rng.shuffle(docs)
        ids = tokenizer(render_example(tokenizer, [passages[d] for d in docs], q, a), return_tensors="pt").input_ids[0]
        seqs.append(ids[:seq_len])
        n_docs.append(len(docs))
    if len(seqs) < n:
        raise PearError(f"SQuAD 2.0 has {len(seqs)} answerable questions; asked for {n} sequences")
    info = {"source": "SQuAD 2.0 dev (squad_v2/dev-v2.0.json.gz), answerable questions", "sequences": len(seqs),
            "tokens_mean": sum(len(s) for s in seqs) / len(seqs), "passages_mean": sum(n_docs) / len(n_docs),
            "format": "instruction, passages of several articles, question; answer as the assistant turn",
            "instruction": INSTRUCTION}
    return seqs, info


# ---------------------------------------------------------------------------- training
def batch_loss(lm, seqs: list[torch.Tensor], aux_coef: float) -> tuple[torch.Tensor, list[tuple[float, float, float]]]:
    """Sum over `seqs` of each sequence's loss: cross-entropy on its every next token + aux_coef x
    the load-balancing loss over its own (token, head) rows, as when it runs alone (the reference
    trains one sequence per device). Sequences are right-padded into one (B, T) batch without a
    mask: causal attention never lets a real token see the padding after it and positions start
    at 0 in every row, so each row's real tokens compute what they would alone. Also returns
    (loss, ce, aux) per sequence."""
    from .moice import load_balancing_loss

    lens = [len(x) for x in seqs]
    ids = torch.zeros(len(seqs), max(lens), dtype=torch.long)  # (B, T), right-padded with token 0
    for i, x in enumerate(seqs):
        ids[i, :len(x)] = x
    ids = ids.to(next(lm.model.parameters()).device)
    lm.collect_logits = True
    try:
        out = lm(input_ids=ids, use_cache=False)
    finally:
        lm.collect_logits = False
    total, parts = 0.0, []
    for b, n in enumerate(lens):
        ce = torch.nn.functional.cross_entropy(out.logits[b, :n - 1].float(), ids[b, 1:n])
        aux = load_balancing_loss([x[b, :n] for x in lm.last_logits], lm.routers.top_k)  # (n, H, N) each
        loss = ce + aux_coef * aux
        total = total + loss
        parts.append((loss.item(), ce.item(), aux.item()))
    return total, parts


def sequence_loss(lm, ids: torch.Tensor, aux_coef: float) -> tuple[torch.Tensor, float, float]:
    """One sequence's loss (a batch of one): (loss, ce, aux)."""
    loss, [(_, ce, aux)] = batch_loss(lm, [ids], aux_coef)
    return loss, ce, aux


def train_routers(model, routers, sequences: list[torch.Tensor], *, steps: int, batch: int, lr: float,
                  aux_coef: float, max_grad_norm: float = 1.0, seed: int = 0, micro_batch: int = 1,
                  resume: dict | None = None, on_step=None, progress=None) -> list[dict]:
    """AdamW on the routers only; each step averages `batch` sequences' losses, run `micro_batch`
    sequences per forward pass (the same gradient up to rounding; fewer, larger kernels on a GPU).
    `resume`: a state from `on_step` (routers, optimizer, history) to continue from; the data
    order is a function of `seed` alone, so a resumed run sees the sequences an uninterrupted one
    would. `on_step(state)` is called after every step. Returns the history. The model's weights
    are never changed and its requires_grad flags are put back."""
    from .moice import MoICE

    if micro_batch < 1:
        raise PearError(f"--micro-batch must be >= 1, got {micro_batch}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(sequences), generator=g).tolist()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    routers.train()
    params = list(routers.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    hist = []
    if resume is not None:
        routers.load_state_dict(resume["routers"])
        opt.load_state_dict(resume["optimizer"])
        hist = list(resume["history"])
    lm = MoICE(model, routers)
    try:
        with lm.active():
            for step in range(len(hist), steps):
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                idx = [order[(step * batch + i) % len(order)] for i in range(batch)]
                parts = []
                for j in range(0, batch, micro_batch):
                    loss, p = batch_loss(lm, [sequences[i] for i in idx[j:j + micro_batch]], aux_coef)
                    (loss / batch).backward()
                    parts += p
                norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                tot, ce, aux = (sum(x) / batch for x in zip(*parts))
                hist.append({"step": step + 1, "loss": tot, "ce": ce, "aux": aux, "grad_norm": float(norm),
                             "seconds": time.perf_counter() - t0})
                if on_step is not None:
                    on_step({"routers": routers.state_dict(), "optimizer": opt.state_dict(), "history": hist})
                if progress is not None:
                    progress(hist[-1])
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        routers.eval()
    return hist


def train_moice(model_spec: str | None, out, *, steps: int = DEFAULTS["steps"], batch: int = DEFAULTS["batch"],
                seq_len: int = DEFAULTS["seq_len"], lr: float = DEFAULTS["lr"], aux_coef: float = DEFAULTS["aux_coef"],
                max_grad_norm: float = DEFAULTS["max_grad_norm"], bases=None, top_k: int | None = None,
                seed: int = DEFAULTS["seed"], data_dir=None, dtype: str = "auto", device: str = "auto",
                micro_batch: int = 1, force: bool = False, progress=None, log=None) -> dict:
    """Train routers for `model_spec` on SQuAD instructions and save them in `out` (atomically).

    After every step the routers, optimizer state and history go to `resume_file(out)`; the same
    command run again after an interruption continues from there (only when every setting but
    `micro_batch` and `device` is the same), and the file is removed once `out` is written."""
    from ..atomic import open_atomic
    from ..folding import AtomicDir, check_out_dir
    from ..loading import load_model, parse_device
    from .moice import DEFAULT_BASES, MoICE, Routers

    bases = DEFAULT_BASES if bases is None else bases
    if steps < 1 or batch < 1 or seq_len < 16 or lr <= 0 or aux_coef < 0:
        raise PearError("--steps and --batch must be >= 1, --seq-len >= 16, --lr > 0, --aux-coef >= 0")
    if micro_batch < 1:
        raise PearError(f"--micro-batch must be >= 1, got {micro_batch}")
    check_out_dir(out, force)
    loaded = load_model(model_spec, dtype=dtype, device=parse_device(device))
    window = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)
    if window and seq_len > window:
        raise PearError(f"--seq-len {seq_len} exceeds this model's context window {window}")
    routers = Routers.for_model(loaded.model, bases=bases, top_k=top_k, seed=seed)
    torch.manual_seed(seed)
    seqs, data_info = build_sequences(loaded.tokenizer, data_dir, min(steps * batch, 20000), seq_len, seed)
    dt = str(next(loaded.model.parameters()).dtype)
    key = {"model": str(model_spec or "smollm2-135m"), "parameters": sum(p.numel() for p in loaded.model.parameters()),
           "dtype": dt, "steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr, "aux_coef": aux_coef,
           "max_grad_norm": max_grad_norm, "bases": list(bases), "top_k": routers.top_k, "seed": seed,
           "data": data_info}
    state_file, resume = resume_file(out), None
    if state_file.is_file():
        saved = torch.load(state_file, map_location="cpu", weights_only=True)
        if saved.get("key") == key and len(saved["history"]) < steps:
            resume = saved
            if log:
                log(f"resuming from {state_file} after step {len(saved['history'])} of {steps}")
        elif log:
            log(f"{state_file} holds a run with other settings; starting over")

    def save_state(state):
        with open_atomic(state_file, "wb") as f:
            torch.save({"key": key, **state}, f)

    t0 = time.perf_counter()
    hist = train_routers(loaded.model, routers, seqs, steps=steps, batch=batch, lr=lr, aux_coef=aux_coef,
                         max_grad_norm=max_grad_norm, seed=seed, micro_batch=micro_batch, resume=resume,
                         on_step=save_state, progress=progress)
    from .. import __version__

    routers.info = {"model": str(model_spec or "smollm2-135m"), "model_type": loaded.model.config.model_type,
                    "bases_scaled_to_model": {lt or "all": b for lt, b in MoICE(loaded.model, routers).bases.items()},
                    "training": {"steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr, "schedule": "constant",
                                 "optimizer": "AdamW (weight decay 0)", "aux_coef": aux_coef,
                                 "max_grad_norm": max_grad_norm, "loss": "cross-entropy on every token + aux_coef x "
                                 "load balancing", "seed": seed, "dtype": dt, "micro_batch": micro_batch,
                                 "device": str(next(loaded.model.parameters()).device),
                                 "resumed_after_step": len(resume["history"]) if resume else 0,
                                 "seconds": sum(h["seconds"] for h in hist),
                                 "seconds_this_run": time.perf_counter() - t0, "pear": __version__},
                    "data": data_info, "history": hist}
    with AtomicDir(out, force) as tmp:
        routers.save(tmp)
    state_file.unlink(missing_ok=True)
    return routers.settings()


def resume_file(out) -> Path:
    """Where an unfinished training of `out` keeps its state: beside `out`, not inside it."""
    out = Path(out)
    return out.with_name(out.name + ".resume.pt")

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
"""

from __future__ import annotations

import random
import time

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
def sequence_loss(lm, ids: torch.Tensor, aux_coef: float) -> tuple[torch.Tensor, float, float]:
    """Cross-entropy on every next token of one sequence + aux_coef x the load-balancing loss."""
    from .moice import load_balancing_loss

    ids = ids.to(next(lm.model.parameters()).device)[None]  # (1, T)
    lm.collect_logits = True
    try:
        out = lm(input_ids=ids, use_cache=False)
    finally:
        lm.collect_logits = False
    ce = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), ids[0, 1:])
    aux = load_balancing_loss(lm.last_logits, lm.routers.top_k)
    return ce + aux_coef * aux, ce.item(), aux.item()


def train_routers(model, routers, sequences: list[torch.Tensor], *, steps: int, batch: int, lr: float,
                  aux_coef: float, max_grad_norm: float = 1.0, seed: int = 0, progress=None) -> list[dict]:
    """AdamW on the routers only; each step averages `batch` sequences' losses. Returns the history.
    The model's weights are never changed and its requires_grad flags are put back."""
    from .moice import MoICE

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(sequences), generator=g).tolist()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    routers.train()
    params = list(routers.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    hist, k = [], 0
    lm = MoICE(model, routers)
    try:
        with lm.active():
            for step in range(steps):
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                tot = ce_sum = aux_sum = 0.0
                for _ in range(batch):
                    loss, ce, aux = sequence_loss(lm, sequences[order[k % len(order)]], aux_coef)
                    k += 1
                    (loss / batch).backward()
                    tot, ce_sum, aux_sum = tot + loss.item(), ce_sum + ce, aux_sum + aux
                norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                hist.append({"step": step + 1, "loss": tot / batch, "ce": ce_sum / batch, "aux": aux_sum / batch,
                             "grad_norm": float(norm), "seconds": time.perf_counter() - t0})
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
                force: bool = False, progress=None) -> dict:
    """Train routers for `model_spec` on SQuAD instructions and save them in `out` (atomically)."""
    from ..folding import AtomicDir, check_out_dir
    from ..loading import load_model, parse_device
    from .moice import DEFAULT_BASES, MoICE, Routers

    bases = DEFAULT_BASES if bases is None else bases
    if steps < 1 or batch < 1 or seq_len < 16 or lr <= 0 or aux_coef < 0:
        raise PearError("--steps and --batch must be >= 1, --seq-len >= 16, --lr > 0, --aux-coef >= 0")
    check_out_dir(out, force)
    loaded = load_model(model_spec, dtype=dtype, device=parse_device(device))
    window = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)
    if window and seq_len > window:
        raise PearError(f"--seq-len {seq_len} exceeds this model's context window {window}")
    routers = Routers.for_model(loaded.model, bases=bases, top_k=top_k, seed=seed)
    torch.manual_seed(seed)
    seqs, data_info = build_sequences(loaded.tokenizer, data_dir, min(steps * batch, 20000), seq_len, seed)
    t0 = time.perf_counter()
    hist = train_routers(loaded.model, routers, seqs, steps=steps, batch=batch, lr=lr, aux_coef=aux_coef,
                         max_grad_norm=max_grad_norm, seed=seed, progress=progress)
    from .. import __version__

    routers.info = {"model": str(model_spec or "smollm2-135m"), "model_type": loaded.model.config.model_type,
                    "bases_scaled_to_model": {lt or "all": b for lt, b in MoICE(loaded.model, routers).bases.items()},
                    "training": {"steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr, "schedule": "constant",
                                 "optimizer": "AdamW (weight decay 0)", "aux_coef": aux_coef,
                                 "max_grad_norm": max_grad_norm, "loss": "cross-entropy on every token + aux_coef x "
                                 "load balancing", "seed": seed, "dtype": str(next(loaded.model.parameters()).dtype),
                                 "device": str(next(loaded.model.parameters()).device),
                                 "seconds": time.perf_counter() - t0, "pear": __version__},
                    "data": data_info, "history": hist}
    with AtomicDir(out, force) as tmp:
        routers.save(tmp)
    return routers.settings()

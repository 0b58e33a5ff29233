"""Train one study model from scratch and save it as an ordinary Hugging Face folder.

Seeded end to end: the initialisation (`archs.build_model`), the windows (`corpus.TrainingMix`:
a pure function of seed and index, whatever the number of loader workers) and the order.
On a GPU, bf16 autocast and TF32 matmuls make runs equal up to kernel non-determinism, not
bit for bit. The folder holds the weights (fp32), the study tokenizer and ``train.json``
(settings, parameter count, the loss of every step, held-out loss, measured data mix, time).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_dir
from ..errors import PearError
from .archs import ARCHS, build_model, n_parameters, parse_size
from .corpus import DEFAULT_MIX, TrainingMix
from .induction import repeat_check

SEPARATOR = "<|endoftext|>"


@dataclass
class TrainSettings:
    """Everything that decides a study model's weights."""

    size: str = "study"
    steps: int = 2000
    batch: int = 32  # windows per step
    window: int | None = None  # tokens per window; None: the size's context (tests use fewer)
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to lr x this
    weight_decay: float = 0.1  # on matrices other than the embeddings
    grad_clip: float = 1.0
    seed: int = 0
    mix: dict | None = None  # corpus.parse_mix; None: corpus.DEFAULT_MIX
    max_passages: int | None = None  # None: every training passage
    heldout_windows: int = 16
    heldout_every: int = 100

    def __post_init__(self):
        parse_size(self.size)
        for name in ("steps", "batch", "heldout_windows", "heldout_every"):
            if int(getattr(self, name)) < 1:
                raise PearError(f"training setting {name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise PearError(f"training learning rate must be positive, got {self.lr}")
        if self.window is not None and not 64 <= self.window <= parse_size(self.size).context:
            raise PearError(f"training window must be in 64..{parse_size(self.size).context} tokens, got {self.window}")
        if not 0 <= self.warmup <= self.steps:
            raise PearError(f"warm-up must be in 0..{self.steps}, got {self.warmup}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def study_tokenizer(spec: str | None = None):
    """The tokenizer of `spec` (default: the default model's), as a base LM's: its end-of-text
    token is BOS, EOS, padding and document separator, and there is no chat template."""
    from transformers import AutoTokenizer

    from ..loading import _converted_gguf, resolve_spec

    if spec is not None and (Path(spec) / "tokenizer_config.json").is_file():  # a tokenizer folder alone
        tok = AutoTokenizer.from_pretrained(str(spec))
    else:
        ms = resolve_spec(spec)
        if ms.gguf_file and os.environ.get("PEAR_GGUF_CACHE", "1") != "0":
            tok = AutoTokenizer.from_pretrained(str(_converted_gguf(ms)))
        else:
            tok = AutoTokenizer.from_pretrained(ms.path, **ms.pretrained_kwargs())
    sep = SEPARATOR if SEPARATOR in tok.get_vocab() else tok.eos_token
    if sep is None:
        raise PearError(f"tokenizer of {spec or 'the default model'} has neither {SEPARATOR} nor an EOS token")
    tok.bos_token = tok.eos_token = tok.pad_token = sep
    tok.chat_template = None
    return tok


def _schedule(s: TrainSettings):
    def f(step: int) -> float:
        if step < s.warmup:
            return (step + 1) / (s.warmup + 1)
        t = (step - s.warmup) / max(1, s.steps - s.warmup)
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def _optimizer(model, s: TrainSettings, cuda: bool):
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}  # tokens (and GPT-2's positions)
    decay = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in emb]
    rest = [p for p in model.parameters() if p.ndim < 2 or id(p) in emb]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), eps=1e-8, fused=cuda)


@torch.no_grad()
def _heldout_loss(model, windows: torch.Tensor, device, autocast) -> float:
    model.eval()
    losses = []
    for row in windows.split(4):
        row = row.to(device)
        with autocast():
            losses.append(float(model(input_ids=row, labels=row).loss))
    model.train()
    return sum(losses) / len(losses)


def train(arch: str, out: str | Path, tokenizer, passages: list[str], settings: TrainSettings | None = None, *,
          device: str = "auto", workers: int | None = None, micro_batch: int | None = None, progress: bool = True,
          command: str = "") -> dict:
    """Train `arch` (an `archs.ARCHS` name) and save it in `out` (atomically). Returns train.json's dict.

    micro_batch: windows per forward pass (None: the whole batch). Every window has the same
    length, so the mean of the micro-batches' losses is the batch's loss and the gradient is the
    same up to rounding; it bounds memory: the logits of 32 windows x 1,024 tokens x 49,152
    tokens are 6.4 GB in fp32 alone, and three such trainings at once filled an 141 GB GPU.
    Without a progress bar, one line goes to stderr every 10 % of the steps."""
    from tqdm.auto import tqdm

    from ..loading import parse_device
    from ..atomic import plain_permissions
    from ..provenance import versions

    s = settings or TrainSettings()
    if micro_batch is not None and micro_batch < 1:
        raise PearError(f"micro batch must be >= 1, got {micro_batch}")
    if arch not in ARCHS:
        raise PearError(f"unknown study architecture '{arch}'; use one of {', '.join(ARCHS)}")
    size = parse_size(s.size)
    dev = parse_device(device)
    cuda = dev.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    window = s.window or size.context
    mix = TrainingMix(tokenizer, passages[: s.max_passages] if s.max_passages else passages, window,
                      seed=s.seed, mix=s.mix or dict(DEFAULT_MIX),
                      n_windows=s.steps * s.batch)
    heldout = torch.stack([mix.heldout(s.heldout_windows)[i] for i in range(s.heldout_windows)])
    model = build_model(arch, size, tokenizer, s.seed).to(dev).train()
    opt = _optimizer(model, s, cuda)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(s))
    n_workers = workers if workers is not None else (min(8, max(1, (os.cpu_count() or 2) - 2)) if cuda else 0)
    if n_workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers each tokenize on one thread
    loader = torch.utils.data.DataLoader(mix, batch_size=s.batch, shuffle=False, num_workers=n_workers,
                                         pin_memory=cuda, persistent_workers=False,
                                         prefetch_factor=4 if n_workers else None)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    losses, held = [], [{"step": 0, "loss": _heldout_loss(model, heldout, dev, autocast)}]
    bar = tqdm(total=s.steps, desc=f"train {arch}", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    pending = []
    micro = micro_batch or s.batch
    for step, batch in enumerate(loader):
        batch = batch.to(dev, non_blocking=True)  # (B, T)
        loss = 0.0
        for part in batch.split(micro):  # (b, T) each; same-length windows: mean of means = mean
            with autocast():
                part_loss = model(input_ids=part, labels=part).loss * (len(part) / len(batch))
            part_loss.backward()
            loss = loss + part_loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        pending.append(loss.detach())
        if (step + 1) % 10 == 0 or step + 1 == s.steps:  # one host sync per 10 steps
            losses += [float(x) for x in torch.stack(pending).float().cpu()]
            pending = []
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % s.heldout_every == 0 or step + 1 == s.steps:
            held.append({"step": step + 1, "loss": _heldout_loss(model, heldout, dev, autocast)})
        bar.update(1)
        if not progress and ((step + 1) % max(1, s.steps // 10) == 0 or step + 1 == s.steps):
            print(f"train {arch}: step {step + 1}/{s.steps}, loss {float(loss):.3f}, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    bar.close()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if not all(math.isfinite(x) for x in losses):
        raise PearError(f"training {arch} diverged (non-finite loss); lower --lr")
    sample = [mix.window(i)[1] for i in range(min(200, len(mix)))]
    measured = {k: sum(c[k] for c in sample) / max(1, sum(sum(c.values()) for c in sample)) for k in sample[0]}
    model.eval()
    induction = repeat_check(model, tokenizer, mix.passages, seed=s.seed)
    record = {
        "arch": arch, "model_type": ARCHS[arch].model_type, "class": type(model).__name__,
        "position": ARCHS[arch].position, "size": dataclasses.asdict(size), "parameters": n_parameters(model),
        "settings": s.as_dict(), "mix": mix.mix, "mix_measured_tokens": measured,
        "passages": len(mix.starts), "text_tokens": int(len(mix.flat)),
        "tokens": s.steps * s.batch * window, "seconds": round(seconds, 2),
        "tokens_per_s": round(s.steps * s.batch * window / seconds, 1), "device": _device_name(dev),
        "workers": n_workers, "micro_batch": micro, "losses": [round(x, 5) for x in losses], "heldout": held,
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4), "induction": induction,
        "versions": versions(), "command": command,
    }
    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "train.json").write_text(json.dumps(record, indent=1) + "\n")
        plain_permissions(tmp)
    return record


def _device_name(dev: str) -> str:
    if dev.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(dev))
    import platform

    return platform.processor() or platform.machine()


def read_train_record(folder: str | Path) -> dict | None:
    f = Path(folder) / "train.json"
    return json.loads(f.read_text()) if f.is_file() else None

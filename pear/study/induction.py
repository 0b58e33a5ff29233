"""Did copying circuits form? A span shown twice, scored on each showing.

A model with induction heads predicts the second showing of a span it has just seen almost
perfectly; one without them predicts it about as badly as the first. Three kinds of span:
random token ids from the whole vocabulary (the copy proxy's shape: nothing but copying can
predict them), random ids drawn from the training text's own tokens, and a piece of training
text (which a language model partly predicts anyway). Recorded in train.json after training,
so that a study whose models cannot copy says so before PEAR is run on them.
"""

from __future__ import annotations

import torch

KINDS = ("random", "random-seen", "text")


@torch.no_grad()
def repeat_check(model, tokenizer, passages: list[str], n: int = 100, batch: int = 8, seed: int = 0) -> dict:
    """{kind: {"loss_first", "loss_second", "top1_second"}}: mean next-token loss (nats) on each
    showing of an n-token span and top-1 accuracy on the second, over `batch` spans."""
    g = torch.Generator().manual_seed(seed)
    text = [t for p in passages[:400] for t in tokenizer(p, add_special_tokens=False)["input_ids"]]
    if len(text) < 2 * n:
        raise ValueError(f"repeat check: {len(text)} tokens of text, need {2 * n}")
    seen = torch.tensor(sorted(set(text)))
    starts = torch.randint(0, len(text) - n, (batch,), generator=g)
    spans = {"random": torch.randint(0, len(tokenizer), (batch, n), generator=g),  # (B, n)
             "random-seen": seen[torch.randint(0, len(seen), (batch, n), generator=g)],
             "text": torch.stack([torch.tensor(text[s: s + n]) for s in starts.tolist()])}
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {}
    for kind, span in spans.items():
        bos = torch.full((batch, 1), tokenizer.eos_token_id)
        x = torch.cat([bos, span, span], 1).to(dev)  # (B, 1 + 2n)
        logits = model(input_ids=x).logits[:, :-1].float()  # (B, 2n, V): position t predicts x[t + 1]
        target = x[:, 1:]
        nll = -torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]  # (B, 2n)
        hit = (logits.argmax(-1) == target).float()
        out[kind] = {"loss_first": round(float(nll[:, :n].mean()), 3), "loss_second": round(float(nll[:, n:].mean()), 3),
                     "top1_second": round(float(hit[:, n:].mean()), 3)}
    model.train(was_training)
    return out

"""The proxy copying task: batches (no special tokens, exact repeats, seeded) and metrics."""

import math

import pytest
import torch

from pear.errors import PearError
from pear.proxy import (DEFAULT_SETTINGS, allowed_token_ids, copy_accuracy, copy_loss, copy_probability,
                        make_batch, make_model_batch, parse_settings, target_logprobs)


class FakeTokenizer:
    """Just what the proxy task reads from a tokenizer."""

    def __init__(self, n=100, special=(0, 1, 2), added=(97, 98, 99), bos=1):
        self.n, self.all_special_ids, self.bos_token_id = n, list(special), bos
        self.added_tokens_decoder = {i: f"<added{i}>" for i in added}

    def __len__(self):
        return self.n


def check_batch(batch, banned, n_samples, length, bos):
    ids = batch.input_ids
    off = 0 if bos is None else 1
    assert ids.shape == (n_samples, off + 2 * length)
    assert batch.offset == off and batch.n == length
    if bos is not None:
        assert (ids[:, 0] == bos).all()
    body = ids[:, off:]
    assert torch.equal(body[:, :length], body[:, length:]), "second half must repeat the first exactly"
    assert not torch.isin(body, torch.tensor(sorted(banned))).any(), "special/added token in the copy"
    for row in body[:, :length]:
        assert len(set(row.tolist())) == length, "tokens within a sequence are distinct"


def test_batch_repeats_and_excludes_special_tokens():
    tok = FakeTokenizer()
    b = make_batch(tok, 100, n_samples=50, length=40, seed=3)
    check_batch(b, {0, 1, 2, 97, 98, 99}, 50, 40, bos=1)
    # with 94 usable ids and 50x40 draws, every usable id shows up: nothing else is excluded
    assert set(b.input_ids[:, 1:].unique().tolist()) == set(range(3, 97))


def test_vocab_beyond_tokenizer_is_excluded():
    # models often pad the embedding matrix beyond the tokenizer: those ids decode to nothing
    tok = FakeTokenizer(n=60, special=(0,), added=(), bos=None)
    allowed = allowed_token_ids(tok, vocab_size=128)
    assert allowed.tolist() == list(range(1, 60))
    b = make_batch(tok, 128, 20, 30, seed=0)
    check_batch(b, {0} | set(range(60, 128)), 20, 30, bos=None)


def test_seeded_and_generator():
    tok = FakeTokenizer()
    a, b = make_batch(tok, 100, 8, 10, seed=7), make_batch(tok, 100, 8, 10, seed=7)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, make_batch(tok, 100, 8, 10, seed=8).input_ids)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(make_batch(tok, 100, 8, 10, seed=g).input_ids, a.input_ids)


def test_no_tokenizer_no_bos():
    b = make_batch(None, 50, 4, 6, seed=0)
    check_batch(b, set(), 4, 6, bos=None)


def test_positions_and_targets():
    b = make_batch(FakeTokenizer(), 100, 2, 5, seed=0)  # [BOS] x1..x5 x1..x5
    assert b.pred_positions.tolist() == [6, 7, 8, 9]  # x1..x4 of the second copy
    assert torch.equal(b.targets, b.input_ids[:, 2:6])  # x2..x5
    assert torch.equal(b.targets, b.input_ids[:, 7:11])


def test_too_long_and_bad_settings():
    with pytest.raises(PearError, match="exceeds"):
        make_batch(FakeTokenizer(), 100, 2, 95, seed=0)
    assert parse_settings(None) == DEFAULT_SETTINGS == [(20, 50), (40, 25), (80, 15), (100, 10)]
    assert parse_settings("20x50, 3X4".replace(" ", "")) == [(20, 50), (3, 4)]
    for bad in ("20", "ax5", "0x5", "5x1", "5x5x5"):
        with pytest.raises(PearError):
            parse_settings(bad)


def test_metrics_only_read_the_second_half():
    b = make_batch(FakeTokenizer(), 100, 3, 6, seed=1)
    N, T = b.input_ids.shape
    logits = torch.zeros(N, T, 100)
    # a perfect copier on the second half; garbage (uniform) everywhere else
    logits[torch.arange(N)[:, None], b.pred_positions[None, :], b.targets] = 50.0
    assert copy_accuracy(logits, b) == 1.0
    assert copy_probability(logits, b) > 0.999
    assert copy_loss(logits, b) < 1e-3
    # uniform logits: p = 1/V, loss = log V, whatever the first half does
    logits = torch.zeros(N, T, 100)
    logits[:, : b.offset + b.n] = torch.randn(N, b.offset + b.n, 100) * 10
    assert torch.allclose(copy_loss(logits, b), torch.tensor(math.log(100)))
    assert torch.allclose(copy_probability(logits, b), torch.tensor(0.01))
    assert target_logprobs(logits, b).shape == (N, b.n - 1)
    # differentiable
    x = torch.zeros(N, T, 100, requires_grad=True)
    copy_loss(x, b).backward()
    assert x.grad[:, b.pred_positions].abs().sum() > 0 and x.grad[:, : b.offset + b.n].abs().sum() == 0


@pytest.mark.real
def test_real_tokenizer_and_copying(smollm2_fast):
    model, tok = smollm2_fast
    vocab = model.get_input_embeddings().weight.shape[0]
    banned = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    assert 1 in banned  # SmolLM2's BOS <|im_start|>
    b = make_model_batch(model, tok, 16, 25, seed=0)
    check_batch(b, banned, 16, 25, bos=tok.bos_token_id)
    assert int(b.input_ids.max()) < vocab  # ids index the embedding matrix
    with torch.no_grad():
        logits = model(b.input_ids, use_cache=False).logits
    acc = float(copy_accuracy(logits, b))
    # chance is 1/49,135; SmolLM2-135M copies half of a repeated random sequence (0.50 measured, seed 0)
    assert acc > 0.3, acc
    # the first half is unpredictable: accuracy there is near chance
    first = logits[:, 1: b.n].argmax(-1) == b.input_ids[:, 2: b.n + 1]
    assert first.float().mean() < 0.05

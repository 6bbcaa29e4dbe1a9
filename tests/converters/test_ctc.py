"""CTC loss (F.ctc_loss, nn.CTCLoss, Hugging Face CTC heads) converted: loss and parameter gradients against
torch for every target layout, reduction and blank, impossible alignments, and Wav2Vec2ForCTC's training loss."""
from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bridge
from bridge.tree import flatten
from tests.conftest import GRAD_TOL, assert_close, full_only, rel_err

T, B, C, S = 12, 3, 6, 4
SLOW = [pytest.mark.slow, full_only]


class Head(torch.nn.Module):
    """features → log-probabilities (T, B, C) → CTC, with the targets in one of torch's layouts."""

    def __init__(self, layout, reduction, blank, zero_infinity=False):
        super().__init__()
        self.proj = torch.nn.Linear(5, C)
        self.layout, self.reduction, self.blank, self.zero_infinity = layout, reduction, blank, zero_infinity

    def forward(self, x_BTF, labels_BS, input_lengths, target_lengths):
        lp = F.log_softmax(self.proj(x_BTF), -1).transpose(0, 1)
        targets = labels_BS
        if self.layout == "masked_select":    # Hugging Face's CTC heads
            targets = labels_BS.masked_select(labels_BS >= 0)
        elif self.layout == "concatenated":   # built with static shapes: the first length of each row
            targets = torch.cat([labels_BS[0, :2], labels_BS[1, :3], labels_BS[2, :1]])
        elif self.layout == "unbatched":
            lp, targets, input_lengths, target_lengths = lp[:, 0], labels_BS[0, :2], input_lengths[0], target_lengths[0]
        return F.ctc_loss(lp, targets, input_lengths, target_lengths, self.blank, self.reduction, self.zero_infinity)


def _inputs(layout, blank):
    labels = torch.randint(0, C - 1, (B, S))
    labels = torch.where(labels >= blank, labels + 1, labels)             # never the blank
    labels[0, 1] = labels[0, 0]                                            # a repeat needs a blank between
    lengths = torch.tensor([2, 3, 1]) if layout in ("concatenated", "unbatched") else torch.tensor([4, 2, 3])
    if layout == "masked_select":
        labels = torch.where(torch.arange(S)[None] < lengths[:, None], labels, -100)
    return torch.randn(B, T, 5), labels, torch.tensor([12, 9, 7]), lengths


def _check(model, inputs):
    jm = bridge.convert(model, inputs)
    ref = model(*inputs)
    got = jm(*inputs)
    assert_close(np.asarray(got), ref, what="ctc loss")
    g = flatten(jax.jit(jax.grad(lambda p: jm.apply(p, *(t.numpy() for t in inputs)).sum()))(jm.params))
    model.zero_grad()
    ref.sum().backward()
    for name, p in model.named_parameters():
        assert rel_err(g[name], p.grad) <= GRAD_TOL, name
    return jm


FAST = {("padded", "none"), ("concatenated", "sum"), ("masked_select", "mean"), ("unbatched", "none")}


@pytest.mark.parametrize("layout,reduction", [
    pytest.param(layout, reduction, marks=() if (layout, reduction) in FAST else SLOW)
    for layout in ("padded", "concatenated", "masked_select", "unbatched") for reduction in ("none", "mean", "sum")])
def test_loss_and_gradients_match_torch(layout, reduction):
    _check(Head(layout, reduction, 0), _inputs(layout, 0))


@pytest.mark.parametrize("blank", [2, pytest.param(C - 1, marks=SLOW)])
def test_any_blank_index(blank):
    _check(Head("masked_select", "mean", blank), _inputs("masked_select", blank))


@pytest.mark.parametrize("zero_infinity", [False, True])
def test_impossible_alignments(zero_infinity):
    """A target longer than its input: torch's inf (or 0 with zero_infinity), the others exact."""
    x, labels, _, lengths = _inputs("padded", 0)
    inputs = (x, labels, torch.tensor([12, 3, 7]), torch.tensor([4, 4, 3]))   # row 1: 4 labels in 3 frames
    model = Head("padded", "none", 0, zero_infinity)
    jm = bridge.convert(model, inputs)
    ref, got = model(*inputs).detach().numpy(), np.asarray(jm(*inputs))
    assert np.isinf(ref[1]) != zero_infinity and got[1] == ref[1]
    assert_close(got[[0, 2]], ref[[0, 2]], what="possible rows")


def test_ctc_loss_module_and_lengths_as_lists():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.ctc = torch.nn.Linear(5, C), torch.nn.CTCLoss(blank=0, reduction="mean")

        def forward(self, x, targets):
            return self.ctc(self.proj(x).log_softmax(-1).transpose(0, 1), targets, [12, 12, 10], [4, 2, 3])
    x, labels, *_ = _inputs("padded", 0)
    _check(M(), (x, labels))


def test_wav2vec2_for_ctc_training_loss():
    """Hugging Face's CTC head: labels padded with -100, masked_select into concatenated targets, and a
    `labels.max() >= vocab_size` check that convert assumes (and names)."""
    import transformers
    cfg = transformers.Wav2Vec2Config(
        vocab_size=12, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, ctc_loss_reduction="mean", pad_token_id=0)
    model = transformers.Wav2Vec2ForCTC(cfg).eval()
    kwargs = {"input_values": torch.randn(2, 800),
              "labels": torch.tensor([[3, 4, 5, 5, -100], [6, 7, -100, -100, -100]])}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jm = bridge.convert(model, kwargs=kwargs)
    assert any("labels.max() >= self.config.vocab_size" in str(w.message) for w in caught)
    ref = model(**kwargs).loss
    other = {"input_values": torch.randn(2, 800), "labels": torch.tensor([[1, 2, -100, -100, -100], [5, 5, 6, 7, 8]])}
    assert_close(np.asarray(jm(**kwargs)["loss"]), ref, what="loss")
    assert_close(np.asarray(jm(**other)["loss"]), model(**other).loss, what="loss, other labels")
    jkw = {k: v.numpy() for k, v in kwargs.items()}
    g = flatten(jax.jit(jax.grad(lambda p: jm.apply(p, **jkw)["loss"]))(jm.params))
    model.zero_grad()
    ref.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    scale = max(float(t.abs().max()) for t in grads.values())
    for name, t in grads.items():   # zero in exact arithmetic (attention key biases): against 1e-2 of the largest
        err = float(np.abs(np.asarray(g[name]) - t.numpy()).max()) / max(float(t.abs().max()), 1e-2 * scale)
        assert err <= GRAD_TOL, name

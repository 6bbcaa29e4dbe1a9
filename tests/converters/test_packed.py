"""Packed sequences (pack_padded_sequence → LSTM / GRU / RNN → pad_packed_sequence) convert: outputs, final
states and gradients match torch under jit for other lengths than the example's."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import bridge
from bridge.errors import CaptureError
from bridge.tree import flatten
from tests.conftest import GRAD_TOL, assert_close, rel_err

B, T, I, H = 4, 6, 5, 7


class Tagger(nn.Module):
    def __init__(self, cls, batch_first=True, sorted_=False, with_state=False, total=True, **kw):
        super().__init__()
        self.rnn = cls(I, H, batch_first=batch_first, **kw)
        self.batch_first, self.sorted, self.with_state, self.total = batch_first, sorted_, with_state, total
        self.head = nn.Linear(H * (2 if kw.get("bidirectional") else 1) if not kw.get("proj_size") else
                              kw["proj_size"] * (2 if kw.get("bidirectional") else 1), 3)

    def forward(self, x, lengths, h0=None):
        packed = pack_padded_sequence(x, lengths, batch_first=self.batch_first, enforce_sorted=self.sorted)
        out, state = self.rnn(packed, h0)
        y, got_lengths = pad_packed_sequence(out, batch_first=self.batch_first, padding_value=-1.0,
                                             total_length=x.shape[1 if self.batch_first else 0] if self.total else None)
        return self.head(y) + x.mean(), state, got_lengths   # the padded input is still the caller's to use


CONFIGS = {
    "lstm": (nn.LSTM, {}),
    "lstm_2l_bidir": (nn.LSTM, dict(num_layers=2, bidirectional=True)),
    "lstm_proj_bidir_state": (nn.LSTM, dict(proj_size=4, bidirectional=True, with_state=True)),
    "gru_time_major_state": (nn.GRU, dict(batch_first=False, with_state=True)),
    "gru_bidir_sorted": (nn.GRU, dict(bidirectional=True, sorted_=True)),
    "rnn_relu_no_total": (nn.RNN, dict(nonlinearity="relu", total=False)),
    "rnn_time_major_sorted": (nn.RNN, dict(batch_first=False, sorted_=True)),   # packs the caller's own x
}


def _inputs(model, seed, sorted_=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[seed % B] = T   # the longest fills the padded length (torch pads to the longest)
    if sorted_:
        lengths = lengths.sort(descending=True).values
    x = torch.randn(B, T, I, generator=g) if model.batch_first else torch.randn(T, B, I, generator=g)
    args = [x, lengths]
    if model.with_state:
        rnn = model.rnn
        shape = (rnn.num_layers * (2 if rnn.bidirectional else 1), B)
        h = torch.randn(*shape, rnn.proj_size or H, generator=g)
        args.append((h, torch.randn(*shape, H, generator=g)) if isinstance(rnn, nn.LSTM) else h)
    return args


def _jax(args):
    return jax.tree.map(lambda t: jnp.asarray(t.numpy()), args)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_rnn_matches_torch(name):
    cls, kw = CONFIGS[name]
    torch.manual_seed(0)
    model = Tagger(cls, **kw)
    jm = bridge.convert(model, tuple(_inputs(model, 0, model.sorted)))
    run = jax.jit(jm.apply)
    for seed in (1, 2):
        args = _inputs(model, seed, model.sorted)
        ref = model(*args)
        got = run(jm.params, *_jax(args))
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            assert_close(g, r.detach(), what=name)

    args = _inputs(model, 3, model.sorted)
    model.zero_grad()
    y, state, _ = model(*args)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    ((y * weights).sum() + sum(s.square().sum() for s in jax.tree.leaves(state))).backward()

    def loss(params):
        y, state, _ = jm.apply(params, *_jax(args))
        return jnp.sum(y * jnp.asarray(weights.numpy())) + sum(jnp.sum(s ** 2) for s in jax.tree.leaves(state))

    grads = flatten(jax.jit(jax.grad(loss))(jm.params))
    for n, p in model.named_parameters():
        assert rel_err(grads[n], p.grad) <= GRAD_TOL, (name, n)


def test_reading_packed_data_is_refused():
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(I, H, batch_first=True)

        def forward(self, x, lengths):
            out, _ = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
            return out.data.sum()   # sum(lengths) rows in torch

    with pytest.raises(CaptureError, match="reads a PackedSequence's data"):
        bridge.convert(Raw(), (torch.randn(B, T, I), torch.tensor([6, 2, 4, 3])))


class TakesPacked(nn.Module):
    """Forward is given the PackedSequence (packed by the caller's collate function)."""

    def __init__(self, bidirectional):
        super().__init__()
        self.rnn = nn.GRU(I, H, batch_first=True, num_layers=2, bidirectional=bidirectional)
        self.head = nn.Linear(H * (2 if bidirectional else 1), 3)

    def forward(self, packed, bias):
        out, h = self.rnn(packed)
        y, _ = pad_packed_sequence(out, batch_first=True)
        return self.head(y) + bias, h


@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequence_given_as_input(bidirectional):
    """The program takes the padded batch and lengths (a PackedInput); torch PackedSequences are converted on the
    way in (jm(...), as_jax_inputs), and outputs and gradients match torch at other batches and lengths."""
    torch.manual_seed(0)
    model = TakesPacked(bidirectional)

    def packed(seed, b, t):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        lengths[seed % b] = t
        return pack_padded_sequence(torch.randn(b, t, I, generator=g), lengths, batch_first=True,
                                    enforce_sorted=False)

    bias = torch.randn(3)
    jm = bridge.convert(model, (packed(0, B, T), bias), dynamic="batch+seq")
    other = packed(1, B + 1, T + 2)
    ref = model(other, bias)
    got = jm(other, bias)
    for g, r in zip(got, ref):
        assert_close(g, r.detach())
    w = [torch.randn(r.shape) for r in ref]
    sum((r * wi).sum() for r, wi in zip(ref, w)).backward()
    inputs = bridge.as_jax_inputs((other, bias))
    assert type(inputs[0]).__name__ == "PackedInput"
    grads = flatten(jax.jit(jax.grad(lambda p: sum(jnp.sum(o * jnp.asarray(wi.numpy())) for o, wi in zip(
        jm.apply(p, *inputs), w))))(jm.params))
    for n, p in model.named_parameters():
        assert rel_err(grads[n], p.grad) <= GRAD_TOL, n

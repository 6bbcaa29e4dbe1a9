"""Recurrent layers kept whole: aten.lstm / gru / rnn_tanh / rnn_relu as one lax.scan per layer and direction.

torch's own decomposition unrolls every time step (a graph that grows with the sequence length) and drops the
dropout between layers in train mode (its `num_layers < i - 1` test is never true); here the input projection
of a whole sequence is one matmul, the recurrence a scan, and train-mode dropout between layers draws from the
rng like nn.Dropout.

`params` is torch's flat list: per layer, per direction (forward, then reverse): w_ih, w_hh, [b_ih, b_hh],
[w_hr (LSTM proj_size)].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import torch
from jax import lax

from converters import packed as _packed  # noqa: F401  (defines bridge::packed_rnn)
from converters.ops.common import aten, dot_precision
from converters.ops.linalg import linear
from converters.ops.random import _dropout
from converters.registry import lowering


def _dropout_between_layers(first: int):
    """Whether the node draws: (num_layers, dropout, train) are its arguments from `first` on."""
    def draws(node) -> bool:
        num_layers, p, train = node.args[first:first + 3]
        return bool(p) and bool(train) and num_layers > 1
    return draws


def _lstm_cell(proj):
    def cell(h_c, gx_BG, w_hh, b_hh):
        h, c = h_c
        gates = gx_BG + linear(h, w_hh, b_hh)
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        if proj is not None:
            h = linear(h, proj)
        return (h, c), h
    return cell


def _gru_cell(h, gx_BG, w_hh, b_hh):
    xr, xz, xn = jnp.split(gx_BG, 3, axis=-1)
    hr, hz, hn = jnp.split(linear(h, w_hh, b_hh), 3, axis=-1)
    r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    h = (h - n) * z + n
    return h, h


def _simple_cell(act):
    def cell(h, gx_BG, w_hh, b_hh):
        h = act(gx_BG + linear(h, w_hh, b_hh))
        return h, h
    return cell


def _direction(cell, x_TBI, state, w, has_biases, reverse, make_cell, valid_TB=None):
    w_ih, w_hh = w[0], w[1]
    b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
    step = make_cell(w) if make_cell else cell

    def body(s, g):
        return step(s, g, w_hh, b_hh)

    def packed_body(s, g_v):   # past its length a sequence keeps its state and outputs zeros (a packed batch)
        g, v_B1 = g_v
        new, y = step(s, g, w_hh, b_hh)
        new = jax.tree.map(lambda a, b: jnp.where(v_B1, a, b), new, s)
        return new, jnp.where(v_B1, y, 0)

    with dot_precision(x_TBI, w_hh):
        gx = linear(x_TBI, w_ih, b_ih)             # the whole sequence's input projection at once
        if valid_TB is None:
            return lax.scan(body, state, gx, reverse=reverse)
        # reversed, a sequence starts at its own last step: the steps past it leave the initial state as it is
        return lax.scan(packed_body, state, (gx, valid_TB[..., None]), reverse=reverse)


def _rnn(key, x, states, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, cell,
         per_layer=None, make_cell=None, valid_TB=None):
    """Shared layer/direction loop. `states` is a tuple of (L*D, B, H*) stacks (h, or h and c)."""
    x = x.swapaxes(0, 1) if batch_first else x            # (T, B, I)
    dirs = 2 if bidirectional else 1
    group = len(params) // (num_layers * dirs)
    finals = []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            w = params[k * group:(k + 1) * group]
            s0 = tuple(s[k] for s in states)
            s, y = _direction(cell, x, s0 if len(s0) > 1 else s0[0], w, has_biases, d == 1, make_cell, valid_TB)
            finals.append(s if isinstance(s, tuple) else (s,))
            outs.append(y)
        x = jnp.concatenate(outs, axis=-1) if dirs == 2 else outs[0]
        if key is not None and layer < num_layers - 1:
            x = _dropout(jax.random.fold_in(key, layer), x, dropout)[0]
    out = x.swapaxes(0, 1) if batch_first else x
    return (out,) + tuple(jnp.stack([f[i] for f in finals]) for i in range(len(states)))


def _lstm_cells(h0, c0):
    proj = h0.shape[-1] != c0.shape[-1]

    def make_cell(w):
        return _lstm_cell(w[-1] if proj else None)
    return make_cell


@lowering(aten.lstm.input, random=_dropout_between_layers(4))
def lstm(key, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    return _rnn(key, x, tuple(hx), params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
                None, make_cell=_lstm_cells(*hx))


_CELLS = {"gru": _gru_cell, "rnn_tanh": _simple_cell(jnp.tanh), "rnn_relu": _simple_cell(jax.nn.relu)}


@lowering(aten.gru.input, random=_dropout_between_layers(4))
def gru(key, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    return _rnn(key, x, (hx,), params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
                _CELLS["gru"])


@lowering(aten.rnn_tanh.input, random=_dropout_between_layers(4))
def rnn_tanh(key, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    return _rnn(key, x, (hx,), params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
                _CELLS["rnn_tanh"])


@lowering(aten.rnn_relu.input, random=_dropout_between_layers(4))
def rnn_relu(key, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    return _rnn(key, x, (hx,), params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
                _CELLS["rnn_relu"])


@lowering(torch.ops.bridge.packed_rnn.default, random=_dropout_between_layers(6))
def packed_rnn(key, mode, x_TBI, lengths_B, hx, params, has_biases, num_layers, dropout, train, bidirectional):
    """An RNN over a packed batch (converters/packed.py): padded time-major input, each sequence's length."""
    valid_TB = jnp.arange(x_TBI.shape[0])[:, None] < lengths_B[None, :]
    return list(_rnn(key, x_TBI, tuple(hx), params, has_biases, num_layers, dropout, train, bidirectional, False,
                     _CELLS.get(mode), make_cell=_lstm_cells(*hx) if mode == "lstm" else None, valid_TB=valid_TB))

"""Ops at arguments OpInfo's samples do not reach: window functions made in forward, a 0-d index for
index_select, multilabel margin targets that end early with -1 or repeat, and gradients at kinks and ties
(abs at 0, fmax at a tie, median's tied values, cummax's repeats), where torch has conventions of its own.
Forward under jit and op by op against torch eager, gradients against torch autograd."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bridge
from converters.dtypes import to_jax
from tests.conftest import GRAD_TOL, assert_close, rel_err

_X = torch.randn(5, 6)
_TIES = torch.tensor([[0.0, 1.0, 1.0, -1.0, 2.0, 2.0], [0.5, 0.5, 0.5, 0.0, -0.5, 3.0]])
_TARGETS = torch.tensor([[3, 0, -1, 1, 2, 5], [1, -1, 0, 0, 0, 0], [5, 4, 3, 2, 1, 0],
                         [-1, 2, 2, 2, 2, 2], [2, 2, 4, -1, 0, 0]])

# name: (fn(x, *more), more inputs[, x]); x (default _X) is the differentiated input
CASES = {
    "abs_at_0": (torch.abs, (), _TIES),
    "l1_loss_exact_match": (lambda x, t: F.l1_loss(x, t, reduction="sum"), (_TIES,), _TIES),
    "smooth_l1_beta_0": (lambda x, t: F.smooth_l1_loss(x, t, beta=0.0), (_TIES + 0.5 * (_TIES > 1),), _TIES),
    "threshold_nan": (lambda x: F.threshold(x, 0.5, -2.0), (), _TIES.masked_fill(_TIES > 2.5, float("nan"))),
    "fmax_tie": (lambda x: torch.fmax(x, torch.ones_like(x)), (), _TIES),
    "fmin_tie": (lambda x: torch.fmin(torch.ones_like(x), x), (), _TIES),
    "median_ties": (lambda x: x.median(), (), _TIES),
    "nanmedian_ties": (lambda x: x.nanmedian(), (), _TIES),
    "cummax_ties": (lambda x: x.cummax(1).values, (), _TIES),
    "cummin_ties": (lambda x: x.cummin(1).values, (), _TIES),
    **{f"{w}_{n}_{p}": (lambda x, w=w, n=n, p=p: x.sum() * getattr(torch, w)(n, periodic=p), ())
       for w in ("hamming_window", "bartlett_window", "blackman_window", "kaiser_window")
       for n in (0, 1, 3, 8) for p in (True, False)},
    "hamming_alpha_beta": (lambda x: x.sum() * torch.hamming_window(9, False, alpha=0.6, beta=0.3), ()),
    "kaiser_beta": (lambda x: x.sum() * torch.kaiser_window(8, True, beta=5.0, dtype=torch.float64), ()),
    "stft_hamming": (lambda x: torch.stft(x, 4, window=torch.hamming_window(4), return_complex=True).abs(), ()),
    "index_select_0d_dim0": (lambda x, i: x.index_select(0, i), (torch.tensor(2),)),
    "index_select_0d_dim1": (lambda x, i: x.index_select(1, i), (torch.tensor(-1 + 6),)),
    **{f"multilabel_margin_{r}": (lambda x, t, r=r: F.multilabel_margin_loss(x, t, reduction=r), (_TARGETS,))
       for r in ("none", "mean", "sum")},
    "multilabel_margin_1d": (lambda x, t: F.multilabel_margin_loss(x[0], t[0]), (_TARGETS,)),
}


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, *more):
        return self.fn(x, *more)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_forward_and_gradient(name):
    fn, more, *given = CASES[name]
    module, x = Fn(fn), (given or [_X])[0].clone().requires_grad_(True)
    ref = module(x, *more)
    jm = bridge.convert(module, (x.detach(), *more))
    jx, jmore = to_jax(x.detach()), [to_jax(m) for m in more]
    for got in (jax.jit(jm.apply)(jm.params, jx, *jmore), jm.apply(jm.params, jx, *jmore)):
        assert tuple(got.shape) == tuple(ref.shape) and got.dtype == to_jax(ref.detach()).dtype
        nan = np.isnan(ref.detach().numpy())
        np.testing.assert_array_equal(np.isnan(np.asarray(got)), nan)
        assert_close(np.where(nan, 0, got), np.where(nan, 0, ref.detach().numpy()), what=name)
    weight = torch.rand(ref.shape, generator=torch.Generator().manual_seed(0))   # no kink of its own
    (ref * weight).sum().backward()
    grad = jax.grad(lambda v: (jm.apply(jm.params, v, *jmore) * to_jax(weight)).sum())(jx)
    assert rel_err(grad, x.grad) <= GRAD_TOL, (name, rel_err(grad, x.grad))
    np.testing.assert_array_equal(np.asarray(grad) == 0, x.grad.numpy() == 0)

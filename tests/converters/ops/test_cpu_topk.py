"""topk among ties: the converted op selects and orders tied values as torch's CPU kernel does (libstdc++'s
partial_sort when k * 64 <= n, else nth_element and a sort of the first k - 1), values and gradients
included; a zero-initialised router (every score tied) routes as torch routes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import bridge
from bridge.tree import flatten
from converters.ops.cpu_topk import topk_order_supported
from tests.conftest import GRAD_TOL, assert_close, rel_err


class TopK(nn.Module):
    def __init__(self, k, largest, sorted_, dim=-1):
        super().__init__()
        self.k, self.largest, self.sorted, self.dim = k, largest, sorted_, dim

    def forward(self, x):
        return torch.topk(x, self.k, dim=self.dim, largest=self.largest, sorted=self.sorted)


def _tied(shape, levels, nan=False, seed=0):
    """Values drawn from `levels` distinct numbers (many ties), some NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, shape, generator=g).float() / 3
    if nan:
        x[torch.rand(shape, generator=g) < 0.2] = float("nan")
    return x


# (n, k): nth_element + insertion sort, partial_sort (k * 64 <= n), nth_element unsorted (300, 40)
CASES = [(4, 2), (17, 5), (64, 8), (256, 4), (300, 40)]


MODES = [(True, True), (False, True), (True, False)]


@pytest.mark.parametrize("n,k,largest,sorted_", [(n, k, *mode) for n, k in CASES for mode in MODES
                                                 if topk_order_supported(n, k, mode[1])])
def test_topk_with_ties_matches_torch_cpu(n, k, largest, sorted_):
    m = TopK(k, largest, sorted_)
    xs = [_tied((5, n), levels, nan=levels == 3, seed=levels) for levels in (1, 2, 3)]
    jm = bridge.convert(m, (xs[0],), dynamic="batch")
    for x in xs + [_tied((7, n), 2, seed=9)]:
        vals, idx = jm(x)
        ref = m(x)
        np.testing.assert_array_equal(np.asarray(idx), ref.indices.numpy())
        np.testing.assert_array_equal(np.asarray(vals), ref.values.numpy())


def test_topk_without_ties_along_a_middle_dim():
    m = TopK(3, True, True, dim=1)
    x = torch.randn(2, 10, 4)
    vals, idx = bridge.convert(m, (x,))(x)
    ref = m(x)
    np.testing.assert_array_equal(np.asarray(idx), ref.indices.numpy())
    assert_close(vals, ref.values)


def test_gradient_reaches_the_tied_elements_torch_selects():
    m = TopK(2, True, True)
    x = _tied((6, 8), 2)
    w = torch.randn(6, 2)
    xr = x.clone().requires_grad_()
    (m(xr).values * w).sum().backward()
    jm = bridge.convert(m, (x,))
    g = jax.grad(lambda a: jnp.sum(jm.apply(jm.params, a)[0] * jnp.asarray(w.numpy())))(jnp.asarray(x.numpy()))
    assert rel_err(g, xr.grad) <= GRAD_TOL


class ZeroRouter(nn.Module):
    """A sigmoid top-k router as freshly initialised MoE models have it (gate weights zero: every score ties)."""

    def __init__(self, d=8, experts=4, k=2):
        super().__init__()
        self.gate = nn.Linear(d, experts, bias=False)
        nn.init.zeros_(self.gate.weight)
        self.experts = nn.Parameter(torch.randn(experts, d, d) / d ** 0.5)
        self.k = k

    def forward(self, x_TD):
        scores = torch.sigmoid(self.gate(x_TD))
        w, e = torch.topk(scores, self.k, dim=-1)
        y_TKD = torch.einsum("td,tkde->tke", x_TD, self.experts[e])
        return (w.unsqueeze(-1) * y_TKD).sum(1), e


def test_zero_initialised_router_routes_as_torch():
    m = ZeroRouter()
    x = torch.randn(10, 8)
    jm = bridge.convert(m, (x,), dynamic="batch")
    y, e = jm(x)
    ref_y, ref_e = m(x)
    np.testing.assert_array_equal(np.asarray(e), ref_e.numpy())
    assert_close(y, ref_y.detach())
    ref_loss = (m(x)[0] ** 2).sum()
    ref_loss.backward()
    grads = flatten(jax.grad(lambda p: jnp.sum(jm.apply(p, jnp.asarray(x.numpy()))[0] ** 2))(jm.params))
    for name, p in m.named_parameters():
        assert rel_err(grads[name], p.grad) <= GRAD_TOL, name

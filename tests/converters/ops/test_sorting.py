"""Rows of equal values (a zero-initialised router's scores, a constant or NaN row): torch's CPU kernels are not
stable (libstdc++'s partial_sort / nth_element / std::sort, a quickselect), so they return a fixed permutation
there; the converted selection ops return the same indices, values and gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import bridge
from bridge.tree import flatten
from tests.conftest import GRAD_TOL, assert_close, rel_err

OPS = {
    "topk": lambda x, k: torch.topk(x, k, dim=-1),
    "topk_smallest": lambda x, k: torch.topk(x, k, dim=-1, largest=False),
    "topk_unsorted": lambda x, k: torch.topk(x, k, dim=-1, sorted=False),
    "sort": lambda x, k: torch.sort(x, dim=-1, descending=True),
    "argsort": lambda x, k: (torch.argsort(x, dim=-1),),
    "kthvalue": lambda x, k: torch.kthvalue(x, k, dim=-1),
    "median": lambda x, k: torch.median(x, dim=-1),
    "mode": lambda x, k: torch.mode(x, dim=-1),
}


class Op(nn.Module):
    def __init__(self, op, k):
        super().__init__()
        self.op, self.k = op, k

    def forward(self, x):
        return tuple(OPS[self.op](x, self.k))


def _rows(n, fill):
    """Equal-valued rows (0, -2.5, the fill) around one random row."""
    x = torch.randn(4, n)
    x[0], x[2], x[3] = 0.0, -2.5, fill
    return x


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("n,k", [(4, 2), (17, 3), (64, 8), (300, 4)])
def test_rows_of_equal_values_select_as_torch(op, n, k):
    fill = float("nan") if op.startswith(("topk", "sort", "argsort")) else 7.0
    x = _rows(n, fill)
    m = Op(op, k)
    got, ref = bridge.convert(m, (x,))(x), m(x)
    for g, r in zip(got, ref):
        g, r = np.asarray(g), r.numpy()
        np.testing.assert_array_equal(g[[0, 2, 3]], r[[0, 2, 3]])
        if op == "topk_unsorted":   # the random row: torch leaves nth_element's order, the selection is the same
            g, r = np.sort(g, axis=-1), np.sort(r, axis=-1)
        np.testing.assert_array_equal(g, r)


def test_gradient_reaches_the_elements_torch_selects():
    m = Op("topk", 3)
    x = _rows(17, 1.0)
    w = torch.randn(4, 3)
    xr = x.clone().requires_grad_()
    (m(xr)[0] * w).sum().backward()
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
    (m(x)[0] ** 2).sum().backward()
    grads = flatten(jax.grad(lambda p: jnp.sum(jm.apply(p, jnp.asarray(x.numpy()))[0] ** 2))(jm.params))
    for name, p in m.named_parameters():
        assert rel_err(grads[name], p.grad) <= GRAD_TOL, name

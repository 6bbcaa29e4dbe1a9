"""Matrix products: mm/bmm/addmm/matmul/linear/baddbmm and friends (torch weight layouts kept)."""
from __future__ import annotations

import jax.numpy as jnp

from converters.ops.common import aten, dot_precision
from converters.registry import lowering


def _scaled(x, s):
    return x if s == 1 else x * s


@lowering(aten.mm.default, aten.bmm.default, aten.matmul.default, aten.mv.default, aten.dot.default,
          aten.vdot.default)
def matmul(a, b):
    with dot_precision(a, b):
        return jnp.matmul(a, b)


@lowering(aten.addmm.default, aten.baddbmm.default, aten.addmv.default)
def addmm(bias, a, b, *, beta=1, alpha=1):
    prod = _scaled(matmul(a, b), alpha)
    return prod if beta == 0 else _scaled(bias, beta) + prod


@lowering(aten.addbmm.default)
def addbmm(bias, a, b, *, beta=1, alpha=1):
    with dot_precision(a, b):
        return _scaled(bias, beta) + _scaled(jnp.einsum("bij,bjk->ik", a, b), alpha)


@lowering(aten.linear.default)
def linear(x_BI, w_OI, b_O=None):
    with dot_precision(x_BI, w_OI):
        y = jnp.einsum("...i,oi->...o", x_BI, w_OI)
    return y if b_O is None else y + b_O


@lowering(aten.outer.default)
def outer(a, b):
    return jnp.outer(a, b)

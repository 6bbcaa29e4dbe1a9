"""Matrix products: mm/bmm/addmm/matmul/linear/baddbmm and friends (torch weight layouts kept)."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

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
    # as one 2-D product: the backward's weight gradient is then a plain (T, O)ᵀ·(T, I) contraction,
    # which XLA's CPU dot emitters take as is (a batched contraction made it transpose the whole dY)
    x_TI = x_BI.reshape(-1, x_BI.shape[-1]) if x_BI.ndim > 2 else x_BI
    with dot_precision(x_BI, w_OI):
        y = lax.dot_general(x_TI, w_OI, (((x_TI.ndim - 1,), (1,)), ((), ())))
    y = y.reshape(*x_BI.shape[:-1], w_OI.shape[0])
    return y if b_O is None else y + b_O


@lowering(aten.outer.default)
def outer(a, b):
    return jnp.outer(a, b)

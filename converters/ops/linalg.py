"""Matrix products: mm/bmm/addmm/matmul/linear/baddbmm and friends (torch weight layouts kept)."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from converters.ops.common import aten, dot_precision, dt
from converters.registry import lowering, lowering_by_name


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
    with dot_precision(x_BI, w_OI):   # a 1-D weight (torch allows it) contracts to x's leading shape
        y = lax.dot_general(x_TI, w_OI, (((x_TI.ndim - 1,), (w_OI.ndim - 1,)), ((), ())))
    y = y.reshape(*x_BI.shape[:-1], *w_OI.shape[:-1])
    return y if b_O is None else y + b_O


@lowering(aten.outer.default)
def outer(a, b):
    return jnp.outer(a, b)


def _group_mask(offs, n: int):
    """(G, n) bool: position i belongs to group g when offs[g-1] <= i < offs[g] (offs: cumulative group ends)."""
    i = jnp.arange(n, dtype=offs.dtype)
    starts = jnp.concatenate([jnp.zeros((1,), offs.dtype), offs[:-1]])
    return (starts[:, None] <= i) & (i < offs[:, None])


@lowering(aten._grouped_mm.default)
def grouped_mm(a, b, offs=None, bias=None, out_dtype=None):
    """Per-group products (mixture-of-experts layers). Groups split a 2-D operand's rows (2-D×3-D: (S, K)×(G, K, N)
    → (S, N), rows past the last offset are zero), columns (3-D×2-D → (M, N)) or the contraction (2-D×2-D →
    (G, M, N)); 3-D×3-D is a batched product. torch refuses `bias` ("not supported yet")."""
    with dot_precision(a, b):
        if offs is None:
            y = jnp.matmul(a, b)
        elif a.ndim == 2 and b.ndim == 3:
            y = lax.ragged_dot(a, b, jnp.diff(offs, prepend=0).astype(jnp.int32))
        elif a.ndim == 3:
            y = jnp.einsum("gmk,kn,gn->mn", a, b, _group_mask(offs, b.shape[1]).astype(b.dtype))
        else:
            y = jnp.einsum("mk,gk,kn->gmn", a, _group_mask(offs, a.shape[1]).astype(a.dtype), b)
    return y if out_dtype is None else y.astype(dt(out_dtype))


@lowering_by_name("transformers.grouped_mm_fallback.default")
def grouped_mm_fallback(a, b, offs):
    """transformers' loop over experts (its MoE layers under torch.export in fp32): same as _grouped_mm."""
    return grouped_mm(a, b, offs)

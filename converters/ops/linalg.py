"""Matrix products: mm/bmm/addmm/matmul/linear/baddbmm and friends (torch weight layouts kept)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from converters.ops.common import aten, dot_precision, dt
from converters.registry import lowering, lowering_by_name


def _scaled(x, s):
    return x if s == 1 else x * s


@lowering(aten.mm.default, aten.bmm.default, aten.matmul.default, aten.mv.default, aten.dot.default,
          aten.vdot.default)
def matmul(a, b):
    with dot_precision(a, b):
        return jnp.matmul(a, b)


_LOW = (jnp.bfloat16, jnp.float16)


def _rounds_once(product, a, b, bias=None, alpha=1, beta=1, *, round_scaled_bias=False):
    """`alpha * product(a, b) + beta * bias` for bf16/fp16 `a` and `b` as torch's CPU kernels compute it: the
    product accumulated in fp32, the bias added in fp32, rounded once (XLA would round the product, then the
    sum). `product(a, b, acc)` is bilinear, `acc` its accumulation dtype (None: its inputs'). With
    `round_scaled_bias` (addmv) alpha and beta are first rounded to the inputs' dtype and so is `beta * bias`.
    Gradients go through low-precision products, as torch's backward does (an fp32 cotangent would turn the
    backward's matmuls fp32). None where the inputs are not both bf16 or both fp16."""
    dtype = a.dtype
    if dtype not in _LOW or b.dtype != dtype:
        return None
    if round_scaled_bias:
        alpha, beta = (float(np.asarray(v).astype(dtype)) for v in (alpha, beta))
    use_bias = bias is not None and beta != 0
    if not use_bias and alpha == 1:   # a plain low-precision product already rounds once
        return None

    @jax.custom_jvp
    def fused(a, b, bias):
        with dot_precision(a, b):
            y = _scaled(product(a, b, jnp.float32), alpha)
        if use_bias:
            scaled = _scaled(bias.astype(jnp.float32), beta)
            y = y + (scaled.astype(dtype).astype(jnp.float32) if round_scaled_bias else scaled)
        return y.astype(dtype)

    @functools.partial(fused.defjvp, symbolic_zeros=True)
    def fused_jvp(primals, tangents):
        a, b, bias = primals
        da, db, dbias = (None if type(t) is SymbolicZero else t for t in tangents)
        y = fused(a, b, bias)
        with dot_precision(a, b):
            terms = [product(x, w, None) for x, w in ((da, b), (a, db)) if x is not None and w is not None]
        dy = _scaled(sum(terms[1:], terms[0]), alpha) if terms else jnp.zeros(y.shape, dtype)
        if use_bias and dbias is not None:
            dy = dy + _scaled(dbias.astype(dtype), beta)
        return y, jnp.broadcast_to(dy, y.shape).astype(dtype)

    return fused(a, b, bias)


def _matmul(a, b, acc):
    return jnp.matmul(a, b, preferred_element_type=acc)


@lowering(aten.addmm.default, aten.baddbmm.default)
def addmm(bias, a, b, *, beta=1, alpha=1):
    once = _rounds_once(_matmul, a, b, bias, alpha, beta)
    if once is not None:
        return once
    prod = _scaled(matmul(a, b), alpha)
    return prod if beta == 0 else _scaled(bias, beta) + prod


@lowering(aten.addmv.default)
def addmv(bias, a, b, *, beta=1, alpha=1):
    once = _rounds_once(_matmul, a, b, bias, alpha, beta, round_scaled_bias=True)
    if once is not None:
        return once
    prod = _scaled(matmul(a, b), alpha)
    return prod if beta == 0 else _scaled(bias, beta) + prod


@lowering(aten.addbmm.default)
def addbmm(bias, a, b, *, beta=1, alpha=1):
    if a.dtype in _LOW and b.dtype == a.dtype:
        # torch's CPU kernel: one addmm per batch entry into the output, each rounding once
        if a.shape[0] == 0:
            out = jnp.zeros((), a.dtype) if beta == 0 else _scaled(bias.astype(jnp.float32), beta).astype(a.dtype)
            return jnp.broadcast_to(out, (a.shape[1], b.shape[2]))

        def step(out, ab):
            return _rounds_once(_matmul, ab[0], ab[1], out, alpha), None

        return lax.scan(step, _rounds_once(_matmul, a[0], b[0], bias, alpha, beta), (a[1:], b[1:]))[0]
    with dot_precision(a, b):
        return _scaled(bias, beta) + _scaled(jnp.einsum("bij,bjk->ik", a, b), alpha)


@lowering(aten.linear.default)
def linear(x_BI, w_OI, b_O=None):
    # as one 2-D product: the backward's weight gradient is then a plain (T, O)ᵀ·(T, I) contraction,
    # which XLA's CPU dot emitters take as is (a batched contraction made it transpose the whole dY)
    def product(x_BI, w_OI, acc):
        x_TI = x_BI.reshape(-1, x_BI.shape[-1]) if x_BI.ndim > 2 else x_BI
        # a 1-D weight (torch allows it) contracts to x's leading shape
        y = lax.dot_general(x_TI, w_OI, (((x_TI.ndim - 1,), (w_OI.ndim - 1,)), ((), ())), preferred_element_type=acc)
        return y.reshape(*x_BI.shape[:-1], *w_OI.shape[:-1])

    once = _rounds_once(product, x_BI, w_OI, b_O)
    if once is not None:
        return once
    with dot_precision(x_BI, w_OI):
        y = product(x_BI, w_OI, None)
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

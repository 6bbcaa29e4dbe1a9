"""Reductions and scans: sum/mean/var/amax/argmax/cumsum/logsumexp ..."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from converters.ops.common import aten, dim_, dims_, dt
from converters.registry import lowering


@lowering(aten.sum.dim_IntList, aten.sum.default)
def sum_(x, dim=None, keepdim=False, *, dtype=None):
    if dtype is None and (x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.integer)):
        dtype = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
    return jnp.sum(x, axis=dims_(dim, x.ndim), keepdims=keepdim, dtype=dt(dtype, dtype))


@lowering(aten.mean.dim, aten.mean.default)
def mean(x, dim=None, keepdim=False, *, dtype=None):
    return jnp.mean(x, axis=dims_(dim, x.ndim), keepdims=keepdim, dtype=dt(dtype))


@lowering(aten.prod.default, aten.prod.dim_int)
def prod(x, dim=None, keepdim=False, *, dtype=None):
    return jnp.prod(x, axis=None if dim is None else dim_(dim, x.ndim), keepdims=keepdim, dtype=dt(dtype))


@lowering(aten.amax.default)
def amax(x, dim=(), keepdim=False):
    return jnp.max(x, axis=dims_(dim, x.ndim), keepdims=keepdim)


@lowering(aten.amin.default)
def amin(x, dim=(), keepdim=False):
    return jnp.min(x, axis=dims_(dim, x.ndim), keepdims=keepdim)


@lowering(aten.max.default)
def max_all(x):
    return jnp.max(x)


@lowering(aten.min.default)
def min_all(x):
    return jnp.min(x)


@lowering(aten.max.dim)
def max_dim(x, dim, keepdim=False):
    d = dim_(dim, x.ndim)
    return jnp.max(x, axis=d, keepdims=keepdim), jnp.argmax(x, axis=d, keepdims=keepdim)


@lowering(aten.min.dim)
def min_dim(x, dim, keepdim=False):
    d = dim_(dim, x.ndim)
    return jnp.min(x, axis=d, keepdims=keepdim), jnp.argmin(x, axis=d, keepdims=keepdim)


@lowering(aten.argmax.default)
def argmax(x, dim=None, keepdim=False):
    if dim is None:
        return jnp.argmax(x.reshape(-1)) if not keepdim else jnp.argmax(x.reshape(-1)).reshape((1,) * x.ndim)
    return jnp.argmax(x, axis=dim_(dim, x.ndim), keepdims=keepdim)


@lowering(aten.argmin.default)
def argmin(x, dim=None, keepdim=False):
    if dim is None:
        return jnp.argmin(x.reshape(-1)) if not keepdim else jnp.argmin(x.reshape(-1)).reshape((1,) * x.ndim)
    return jnp.argmin(x, axis=dim_(dim, x.ndim), keepdims=keepdim)


def _correction(correction, unbiased=True):
    return (1 if unbiased else 0) if correction is None else correction


@lowering(aten.var.correction)
def var(x, dim=None, *, correction=None, keepdim=False):
    return jnp.var(x, axis=dims_(dim, x.ndim), ddof=_correction(correction), keepdims=keepdim)


@lowering(aten.var_mean.correction)
def var_mean(x, dim=None, *, correction=None, keepdim=False):
    axis = dims_(dim, x.ndim)
    return jnp.var(x, axis=axis, ddof=_correction(correction), keepdims=keepdim), jnp.mean(x, axis=axis, keepdims=keepdim)


@lowering(aten.std.correction)
def std(x, dim=None, *, correction=None, keepdim=False):
    return jnp.std(x, axis=dims_(dim, x.ndim), ddof=_correction(correction), keepdims=keepdim)


@lowering(aten.any.default, aten.any.dim, aten.any.dims)
def any_(x, dim=None, keepdim=False):
    return jnp.any(x, axis=dims_(dim, x.ndim), keepdims=keepdim)


@lowering(aten.all.default, aten.all.dim, aten.all.dims)
def all_(x, dim=None, keepdim=False):
    return jnp.all(x, axis=dims_(dim, x.ndim), keepdims=keepdim)


@lowering(aten.cumsum.default)
def cumsum(x, dim, *, dtype=None):
    if dtype is None and (x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.integer)):
        dtype = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
    return jnp.cumsum(x, axis=dim_(dim, x.ndim), dtype=dt(dtype, dtype))


@lowering(aten.cumprod.default)
def cumprod(x, dim, *, dtype=None):
    return jnp.cumprod(x, axis=dim_(dim, x.ndim), dtype=dt(dtype))


@lowering(aten.logsumexp.default)
def logsumexp(x, dim, keepdim=False):
    return jax.nn.logsumexp(x, axis=dims_(dim, x.ndim), keepdims=keepdim)


@lowering(aten.linalg_vector_norm.default)
def vector_norm(x, ord=2, dim=None, keepdim=False, *, dtype=None):
    x = x.astype(dt(dtype, x.dtype))
    return jnp.linalg.vector_norm(x, ord=ord, axis=dims_(dim, x.ndim), keepdims=keepdim)


@lowering(aten.cummax.default)
def cummax(x, dim):
    d = dim_(dim, x.ndim)
    vals = lax.cummax(x, axis=d)
    idx = jnp.broadcast_to(jnp.arange(x.shape[d]).reshape([-1 if i == d else 1 for i in range(x.ndim)]), x.shape)
    return vals, lax.cummax(jnp.where(x == vals, idx, 0), axis=d)


@lowering(aten.cummin.default)
def cummin(x, dim):
    d = dim_(dim, x.ndim)
    vals = lax.cummin(x, axis=d)
    idx = jnp.broadcast_to(jnp.arange(x.shape[d]).reshape([-1 if i == d else 1 for i in range(x.ndim)]), x.shape)
    return vals, lax.cummax(jnp.where(x == vals, idx, 0), axis=d)

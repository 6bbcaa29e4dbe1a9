"""Reductions and scans: sum/mean/var/amax/argmax/cumsum/logsumexp ..."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from converters.ops.common import aten, dim_, dims_, dt, opmath, scalar_dims
from converters.ops.distance import pnorm
from converters.registry import lowering


def _acc(x, dtype, int_default=True):
    """(x, accumulation dtype): torch's dtype kwarg (ints/bools default to int64 for sums); bf16/fp16
    accumulate in fp32 and round once (jnp skips that upcast when given a dtype)."""
    dtype = dt(dtype)
    if dtype is None and int_default and (x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.integer)):
        dtype = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
    if dtype in (jnp.bfloat16, jnp.float16):
        dtype = jnp.float32
    return opmath(x)[0], dtype


@lowering(aten.sum.dim_IntList, aten.sum.default)
@scalar_dims
def sum_(x, dim=None, keepdim=False, *, dtype=None):
    x, acc = _acc(x, dtype)
    return jnp.sum(x, axis=dims_(dim, x.ndim), keepdims=keepdim, dtype=acc)


@lowering(aten.mean.dim, aten.mean.default)
@scalar_dims
def mean(x, dim=None, keepdim=False, *, dtype=None):
    x, acc = _acc(x, dtype, int_default=False)
    return jnp.mean(x, axis=dims_(dim, x.ndim), keepdims=keepdim, dtype=acc)


@lowering(aten.prod.default, aten.prod.dim_int)
@scalar_dims
def prod(x, dim=None, keepdim=False, *, dtype=None):
    x, acc = _acc(x, dtype)
    return jnp.prod(x, axis=None if dim is None else dim_(dim, x.ndim), keepdims=keepdim, dtype=acc)


@lowering(aten.amax.default)
@scalar_dims
def amax(x, dim=(), keepdim=False):
    return jnp.max(x, axis=dims_(dim, x.ndim), keepdims=keepdim)


@lowering(aten.amin.default)
@scalar_dims
def amin(x, dim=(), keepdim=False):
    return jnp.min(x, axis=dims_(dim, x.ndim), keepdims=keepdim)


@lowering(aten.max.default)
def max_all(x):
    return jnp.max(x)


@lowering(aten.min.default)
def min_all(x):
    return jnp.min(x)


@lowering(aten.max.dim)
@scalar_dims
def max_dim(x, dim, keepdim=False):
    return _at_index(x, dim_(dim, x.ndim), keepdim, jnp.argmax)


def _at_index(x, d, keepdim, arg):
    """(value, index) read at the index: the gradient goes to that one element, as torch's does (jnp.max
    splits it over ties — torch's amax does too, max(dim) does not)."""
    i = arg(x, axis=d, keepdims=True)
    v = jnp.take_along_axis(x, i, axis=d)
    return (v, i) if keepdim else (jnp.squeeze(v, d), jnp.squeeze(i, d))


@lowering(aten.min.dim)
@scalar_dims
def min_dim(x, dim, keepdim=False):
    return _at_index(x, dim_(dim, x.ndim), keepdim, jnp.argmin)


@lowering(aten.argmax.default)
@scalar_dims
def argmax(x, dim=None, keepdim=False):
    if dim is None:
        return jnp.argmax(x.reshape(-1)) if not keepdim else jnp.argmax(x.reshape(-1)).reshape((1,) * x.ndim)
    return jnp.argmax(x, axis=dim_(dim, x.ndim), keepdims=keepdim)


@lowering(aten.argmin.default)
@scalar_dims
def argmin(x, dim=None, keepdim=False):
    if dim is None:
        return jnp.argmin(x.reshape(-1)) if not keepdim else jnp.argmin(x.reshape(-1)).reshape((1,) * x.ndim)
    return jnp.argmin(x, axis=dim_(dim, x.ndim), keepdims=keepdim)


def _correction(correction, unbiased=True):
    return (1 if unbiased else 0) if correction is None else correction


@lowering(aten.var.correction)
@scalar_dims
def var(x, dim=None, *, correction=None, keepdim=False):
    return jnp.var(x, axis=dims_(dim, x.ndim), ddof=_correction(correction), keepdims=keepdim)


@lowering(aten.var.dim)
@scalar_dims
def var_dim(x, dim=None, unbiased=True, keepdim=False):
    return jnp.var(x, axis=dims_(dim, x.ndim), ddof=int(unbiased), keepdims=keepdim)


@lowering(aten.var_mean.correction)
@scalar_dims
def var_mean(x, dim=None, *, correction=None, keepdim=False):
    axis = dims_(dim, x.ndim)
    return jnp.var(x, axis=axis, ddof=_correction(correction), keepdims=keepdim), jnp.mean(x, axis=axis, keepdims=keepdim)


@lowering(aten.std.correction)
@scalar_dims
def std(x, dim=None, *, correction=None, keepdim=False):
    return jnp.std(x, axis=dims_(dim, x.ndim), ddof=_correction(correction), keepdims=keepdim)


@lowering(aten.any.default, aten.any.dim, aten.any.dims, aten._is_any_true.default)
@scalar_dims
def any_(x, dim=None, keepdim=False):
    return jnp.any(x, axis=dims_(dim, x.ndim), keepdims=keepdim)


@lowering(aten.all.default, aten.all.dim, aten.all.dims,
          aten._is_all_true.default)   # torch._check_tensor_all's reduction (its assert is dropped)
@scalar_dims
def all_(x, dim=None, keepdim=False):
    return jnp.all(x, axis=dims_(dim, x.ndim), keepdims=keepdim)


@lowering(aten.cumsum.default)
@scalar_dims
def cumsum(x, dim, *, dtype=None):
    x, acc = _acc(x, dtype)
    return jnp.cumsum(x, axis=dim_(dim, x.ndim), dtype=acc)


@lowering(aten.cumprod.default)
@scalar_dims
def cumprod(x, dim, *, dtype=None):
    x, acc = _acc(x, dtype)
    return jnp.cumprod(x, axis=dim_(dim, x.ndim), dtype=acc)


@lowering(aten.logsumexp.default)
@scalar_dims
def logsumexp(x, dim, keepdim=False):
    return jax.nn.logsumexp(x, axis=dims_(dim, x.ndim), keepdims=keepdim)


@lowering(aten.linalg_vector_norm.default)
@scalar_dims
def vector_norm(x, ord=2, dim=None, keepdim=False, *, dtype=None):
    """Real inputs go through `distance.pnorm` for torch's gradients (0 at a zero norm and at zero
    entries, ±inf-norm ties share the gradient); complex inputs through jnp."""
    x = x.astype(dt(dtype, x.dtype))
    axes = dims_(dim, x.ndim)
    if jnp.iscomplexobj(x) or x.size == 0:
        return jnp.linalg.vector_norm(x, ord=ord, axis=axes, keepdims=keepdim)
    axes = tuple(range(x.ndim)) if axes is None else axes
    rest = [d for d in range(x.ndim) if d not in axes]
    moved = jnp.transpose(x, rest + list(axes)).reshape([x.shape[d] for d in rest] + [-1])
    out = pnorm(moved, float(ord), True)
    if keepdim:
        out = out.reshape([1 if d in axes else x.shape[d] for d in range(x.ndim)])
    return out


def _cum_extreme(x, dim, scan):
    """Running max/min and the index of its latest occurrence (torch's tie rule). Each value is read at its
    index, so its gradient goes there, as torch's backward scatters it (lax.cummax's own rule does not)."""
    d = dim_(dim, x.ndim)
    vals = scan(x, axis=d)
    idx = lax.cummax(jnp.where(x == vals, lax.broadcasted_iota(jnp.int32, x.shape, d), 0), axis=d)
    at_idx = jnp.take_along_axis(x, idx, axis=d)
    return jnp.where(at_idx == vals, at_idx, lax.stop_gradient(vals)), idx


@lowering(aten.cummax.default)
@scalar_dims
def cummax(x, dim):
    return _cum_extreme(x, dim, lax.cummax)


@lowering(aten.cummin.default)
@scalar_dims
def cummin(x, dim):
    return _cum_extreme(x, dim, lax.cummin)

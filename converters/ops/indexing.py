"""Gather/scatter family: advanced indexing, index_put, gather/scatter, embedding, *_scatter."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from converters.ops.common import aten, dim_
from converters.registry import lowering


def _index_tuple(indices):
    return tuple(slice(None) if i is None else i for i in indices)


@lowering(aten.index.Tensor)
def index(x, indices):
    return x[_index_tuple(indices)]


@lowering(aten.index_put.default)
def index_put(x, indices, values, accumulate=False):
    ref = x.at[_index_tuple(indices)]
    values = values.astype(x.dtype)
    return ref.add(values) if accumulate else ref.set(values)


@lowering(aten.index_select.default)
def index_select(x, dim, index):
    return jnp.take(x, index, axis=dim_(dim, x.ndim), mode="clip") if x.ndim else x


def _along(x, dim, index):
    """Full index tuple that addresses `index` along `dim` and iota elsewhere (torch.gather layout)."""
    d = dim_(dim, x.ndim)
    grids = jnp.meshgrid(*[jnp.arange(s) for s in index.shape], indexing="ij", sparse=True)
    return tuple(index if i == d else grids[i] for i in range(index.ndim))


@lowering(aten.gather.default)
def gather(x, dim, index, *, sparse_grad=False):
    if x.ndim == 0:
        return x
    return x[_along(x, dim, index)]


@lowering(aten.scatter.src, aten.scatter.value)
def scatter(x, dim, index, src):
    if not hasattr(src, "shape"):
        src = jnp.full(index.shape, src, x.dtype)
    src = src[tuple(slice(0, s) for s in index.shape)]
    return x.at[_along(x, dim, index)].set(src.astype(x.dtype))


@lowering(aten.scatter_add.default)
def scatter_add(x, dim, index, src):
    src = src[tuple(slice(0, s) for s in index.shape)]
    return x.at[_along(x, dim, index)].add(src.astype(x.dtype))


@lowering(aten.scatter_reduce.two)
def scatter_reduce(x, dim, index, src, reduce, *, include_self=True):
    src = src[tuple(slice(0, s) for s in index.shape)].astype(x.dtype)
    idx = _along(x, dim, index)
    if reduce == "sum":
        base = x if include_self else x.at[idx].set(0)
        return base.at[idx].add(src)
    if reduce == "prod":
        base = x if include_self else x.at[idx].set(1)
        return base.at[idx].multiply(src)
    if reduce in ("amax", "amin"):
        fill = jnp.finfo(x.dtype).min if reduce == "amax" else jnp.finfo(x.dtype).max
        base = x if include_self else x.at[idx].set(fill)
        return base.at[idx].max(src) if reduce == "amax" else base.at[idx].min(src)
    if reduce == "mean":
        base = x if include_self else x.at[idx].set(0)
        count = jnp.ones_like(x).at[idx].add(jnp.ones_like(src)) - (0 if include_self else 1)
        total = base.at[idx].add(src)
        out = total / jnp.maximum(count, 1)
        return out if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.floor_divide(total, jnp.maximum(count, 1))
    raise NotImplementedError(f"scatter_reduce with reduce={reduce!r}")


@lowering(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def masked_fill(x, mask, value):
    return jnp.where(mask, jnp.asarray(value, x.dtype), x)


@lowering(aten.embedding.default)
def embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    out = weight[indices]
    if padding_idx is not None and padding_idx >= 0:  # torch gives the padding row no gradient
        out = jnp.where((indices == padding_idx)[..., None], jax.lax.stop_gradient(out), out)
    return out


@lowering(aten.slice_scatter.default)
def slice_scatter(x, src, dim=0, start=None, end=None, step=1):
    d = dim_(dim, x.ndim)
    lo, hi, _ = slice(start, end).indices(x.shape[d])
    idx = [slice(None)] * x.ndim
    idx[d] = slice(lo, max(lo, hi), step)
    return x.at[tuple(idx)].set(src.astype(x.dtype))


@lowering(aten.select_scatter.default)
def select_scatter(x, src, dim, index):
    d = dim_(dim, x.ndim)
    idx = [slice(None)] * x.ndim
    idx[d] = index
    return x.at[tuple(idx)].set(src.astype(x.dtype))


@lowering(aten.index_add.default)
def index_add(x, dim, index, source, *, alpha=1):
    d = dim_(dim, x.ndim)
    idx = [slice(None)] * x.ndim
    idx[d] = index
    return x.at[tuple(idx)].add((source * alpha).astype(x.dtype))


@lowering(aten.index_copy.default)
def index_copy(x, dim, index, source):
    d = dim_(dim, x.ndim)
    idx = [slice(None)] * x.ndim
    idx[d] = index
    return x.at[tuple(idx)].set(source.astype(x.dtype))


@lowering(aten.diagonal.default, aten.diagonal_copy.default)
def diagonal(x, offset=0, dim1=0, dim2=1):
    return jnp.diagonal(x, offset, dim_(dim1, x.ndim), dim_(dim2, x.ndim))

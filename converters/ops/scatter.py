"""Scatter/put family and strided views: scatter(_reduce), index_reduce, put, take, masked_scatter,
segment_reduce, embedding_bag, as_strided(_copy/_scatter), diagonal_scatter, narrow_copy, unbind_copy.

Every reducing scatter goes through `reduce_into(x, idx, src, reduce)`, where `idx` is a full
`x.at[...]` index tuple with `src`'s shape. Multiplicative scatters carry torch's gradient rule
(`_scatter_mul`): JAX's scatter-mul has no VJP for repeated indices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from converters.ops.common import aten, dim_
from converters.ops.indexing import along, get_or_fill, no_negatives, scale_grad
from converters.registry import lowering

_ALIASES = {"add": "sum", "multiply": "prod", "max": "amax", "min": "amin"}


def _identity(reduce: str, dtype):
    if reduce in ("sum", "mean"):
        return 0
    if reduce == "prod":
        return 1
    if jnp.issubdtype(dtype, jnp.inexact):
        return -jnp.inf if reduce == "amax" else jnp.inf
    info = jnp.iinfo(dtype)
    return info.min if reduce == "amax" else info.max


@jax.custom_vjp
def _scatter_mul(base, idx, src):
    return base.at[idx].multiply(src)


def _scatter_mul_fwd(base, idx, src):
    out = _scatter_mul(base, idx, src)
    return out, (base, idx, src, out)


def _scatter_mul_bwd(res, g):
    """torch's scatter_reduce(prod) backward: exclusive products, zeros handled without dividing by them."""
    base, idx, src, out = res
    masked_base = jnp.where(base == 0, 1, base)
    g_base = g * masked_base.at[idx].multiply(src) / masked_base
    src_zero = src == 0
    zeros_at = jnp.zeros(base.shape, jnp.int32).at[idx].add(src_zero.astype(jnp.int32))[idx]
    single = src_zero & (zeros_at == 1)
    without_zero = base.at[idx].multiply(jnp.where(single, 1, src))
    g_src = jnp.where(single, (g * without_zero)[idx], (g * out)[idx] / jnp.where(src_zero, 1, src))
    return g_base, None, g_src


_scatter_mul.defvjp(_scatter_mul_fwd, _scatter_mul_bwd)


def reduce_into(x, idx, src, reduce: str, include_self: bool = True):
    """Reduce `src` into `x` at `idx` with torch's scatter_reduce / index_reduce semantics."""
    reduce = _ALIASES.get(reduce, reduce)
    src = src.astype(x.dtype)
    base = x if include_self else x.at[idx].set(_identity(reduce, x.dtype))
    if reduce == "sum":
        return base.at[idx].add(src)
    if reduce == "prod":
        return _scatter_mul(base, idx, src)
    if reduce == "amax":
        return base.at[idx].max(src)
    if reduce == "amin":
        return base.at[idx].min(src)
    if reduce == "mean":
        count = jnp.zeros(x.shape, jnp.int32).at[idx].add(1) + int(include_self)
        total = base.at[idx].add(src)
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return total / jnp.maximum(count, 1).astype(x.dtype)
        return jnp.floor_divide(total, jnp.maximum(count, 1).astype(x.dtype))
    raise NotImplementedError(f"reduce={reduce!r}")


def _trim(src, index):
    return src[tuple(slice(0, s) for s in index.shape)] if hasattr(src, "shape") and src.ndim else src


@lowering(aten.scatter.src, aten.scatter.value)
def scatter(x, dim, index, src):
    if index.size == 0 or x.ndim == 0 and index.ndim == 0:
        return x if index.size == 0 else jnp.asarray(src, x.dtype).reshape(())
    src = jnp.broadcast_to(jnp.asarray(_trim(src, index), x.dtype), index.shape)
    return x.at[along(x, dim, index)].set(src)


@lowering(aten.scatter.reduce, aten.scatter.value_reduce)
def scatter_with_reduce(x, dim, index, src, *, reduce):
    if index.size == 0:
        return x
    src = jnp.broadcast_to(jnp.asarray(_trim(src, index), x.dtype), index.shape)
    return reduce_into(x, along(x, dim, index), src, reduce)


@lowering(aten.scatter_add.default)
def scatter_add(x, dim, index, src):
    return x if index.size == 0 else reduce_into(x, along(x, dim, index), _trim(src, index), "sum")


@lowering(aten.scatter_reduce.two)
def scatter_reduce(x, dim, index, src, reduce, *, include_self=True):
    if index.size == 0:
        return x
    return reduce_into(x, along(x, dim, index), _trim(src, index), reduce, include_self)


@lowering(aten.index_reduce.default)
def index_reduce(x, dim, index, source, reduce, *, include_self=True):
    x1, src = jnp.atleast_1d(x), jnp.atleast_1d(source)
    d = dim_(dim, x1.ndim)
    pos = jnp.broadcast_to(index.reshape((-1,) + (1,) * (src.ndim - d - 1)), src.shape[d:])
    grids = jnp.meshgrid(*[jnp.arange(s) for s in src.shape], indexing="ij", sparse=True)
    idx = tuple(pos if i == d else grids[i] for i in range(src.ndim))
    return reduce_into(x1, idx, src, reduce, include_self).reshape(x.shape)


@lowering(aten.put.default)
def put(x, index, source, accumulate=False):
    flat, src = x.reshape(-1), source.reshape(-1).astype(x.dtype)
    ref = flat.at[index.reshape(-1)]
    return (ref.add(src) if accumulate else ref.set(src)).reshape(x.shape)


@lowering(aten.take.default)
def take(x, index):
    return get_or_fill(x.reshape(-1), index)   # negatives wrap, as torch.take's do; out of range reads NaN


@lowering(aten.masked_scatter.default)
def masked_scatter(x, mask, source):
    """The k-th True of the (broadcast) mask takes source.flatten()[k]."""
    shape = jnp.broadcast_shapes(x.shape, mask.shape)
    mask = jnp.broadcast_to(mask, shape)
    x = jnp.broadcast_to(x, shape)
    if source.size == 0:
        return x
    rank = jnp.cumsum(mask.reshape(-1)) - 1
    vals = source.reshape(-1)[jnp.clip(rank, 0, source.size - 1)].reshape(shape)
    return jnp.where(mask, vals.astype(x.dtype), x)


@lowering(aten.segment_reduce.default)
def segment_reduce(data, reduce, *, lengths=None, indices=None, offsets=None, axis=0, unsafe=False,
                   initial=None):
    """Segments along `axis` given by lengths (B..., S) or offsets (B..., S + 1), B... = data's leading dims."""
    if offsets is None:
        offsets = jnp.concatenate([jnp.zeros(lengths.shape[:-1] + (1,), lengths.dtype),
                                   jnp.cumsum(lengths, axis=-1)], axis=-1)
    axis = dim_(axis, data.ndim)
    batch, n_seg, L = data.shape[:axis], offsets.shape[-1] - 1, data.shape[axis]
    nb = int(np.prod(batch))
    offs = offsets.reshape(nb, n_seg + 1)
    pos = jnp.arange(L)
    seg = jax.vmap(lambda o: jnp.searchsorted(o[1:], pos, side="right"))(offs)
    valid = (pos >= offs[:, :1]) & (seg < n_seg)
    ids = jnp.where(valid, seg + n_seg * jnp.arange(nb)[:, None], nb * n_seg).reshape(-1)
    rest = data.shape[axis + 1:]
    src = data.reshape((nb * L,) + rest)
    red = _ALIASES.get(reduce, reduce)
    fill = _identity(red, data.dtype) if initial is None or red == "mean" else initial
    base = jnp.full((nb * n_seg + 1,) + rest, fill, data.dtype)   # last row swallows positions in no segment
    out = reduce_into(base, (ids,), src, "sum" if red == "mean" else red)
    if red == "mean":
        count = jnp.zeros(nb * n_seg + 1, data.dtype).at[ids].add(1).reshape((-1,) + (1,) * len(rest))
        out = out + (0 if initial is None else initial)
        out = jnp.where(count > 0, out / jnp.maximum(count, 1), jnp.nan if initial is None else initial)
    return out[:-1].reshape(batch + (n_seg,) + rest)


_MODE_SUM, _MODE_MEAN, _MODE_MAX = 0, 1, 2


def _embedding_bag(weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
                   per_sample_weights=None, include_last_offset=False, padding_idx=-1, *, forward_only):
    """(output, offset2bag, bag_size, max_indices) with the shapes of torch's CPU meta kernel."""
    n, nw = indices.shape[0], weight.shape[0]
    num_bags = offsets.shape[0] - int(include_last_offset)
    bag = jnp.clip(jnp.searchsorted(offsets, jnp.arange(n), side="right") - 1, 0, max(num_bags - 1, 0))
    keep = indices != padding_idx if padding_idx is not None and padding_idx >= 0 else jnp.ones(n, bool)
    if include_last_offset and offsets.shape[0]:
        # CSR offsets: bag b is indices[offsets[b]:offsets[b + 1]], and indices past the last offset (a padded
        # buffer) are in no bag. torch documents offsets[-1] == len(indices); past it its CPU kernels disagree
        # (sum leaves them out, max takes them in, mean divides by them, backward reads them): bridge leaves
        # them out everywhere, what torch gives for indices[:offsets[-1]]
        keep = keep & (jnp.arange(n) < offsets[-1])
    rows = get_or_fill(weight, no_negatives(indices, nw)).astype(jnp.promote_types(weight.dtype, jnp.float32))  # fp32 sums
    if scale_grad_by_freq:
        rows = scale_grad(rows, indices, nw)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights[:, None].astype(rows.dtype)
    count = jnp.zeros(num_bags, offsets.dtype).at[bag].add(keep.astype(offsets.dtype))
    base = jnp.zeros((num_bags, weight.shape[1]), rows.dtype)
    if mode == _MODE_MAX:
        fill = _identity("amax", rows.dtype)
        best = jnp.full(base.shape, fill, rows.dtype).at[bag].max(jnp.where(keep[:, None], rows, fill))
        out = jnp.where(count[:, None] > 0, best, 0)
        first = jnp.full(best.shape, n, jnp.int32).at[bag].min(
            jnp.where(keep[:, None] & (rows == best[bag]), jnp.arange(n)[:, None], n))
        max_indices = jnp.where(first < n, indices[jnp.clip(first, 0, max(n - 1, 0))], 0)
    else:
        out = base.at[bag].add(jnp.where(keep[:, None], rows, 0))
        if mode == _MODE_MEAN:
            out = out / jnp.maximum(count, 1)[:, None].astype(out.dtype)
        max_indices = count if mode == _MODE_MEAN else jnp.zeros_like(count)
    bag_size = count if mode != _MODE_SUM else jnp.zeros_like(count)
    fast_sum = weight.dtype in (jnp.float32, jnp.float16) and not (padding_idx is not None and padding_idx >= 0)
    offset2bag = bag.astype(offsets.dtype) if mode != _MODE_SUM or not fast_sum else jnp.zeros(0, offsets.dtype)
    if forward_only and include_last_offset:   # the meta kernel sizes these like `offsets`
        bag_size = jnp.pad(bag_size, (0, 1))
    return out.astype(weight.dtype), offset2bag, bag_size, max_indices


@lowering(aten._embedding_bag.default)
def embedding_bag(*args, **kwargs):
    return _embedding_bag(*args, **kwargs, forward_only=False)


@lowering(aten._embedding_bag_forward_only.default)
def embedding_bag_forward_only(*args, **kwargs):
    return _embedding_bag(*args, **kwargs, forward_only=True)


# ------------------------------------------------------------------------------- strided views
def _strided_index(size, stride, storage_offset) -> np.ndarray:
    """Flat positions (in a row-major input) that `as_strided(size, stride, offset)` reads."""
    idx = np.full(tuple(int(s) for s in size), int(storage_offset or 0), np.int64)
    for d, (n, s) in enumerate(zip(size, stride)):
        idx = idx + (np.arange(int(n)) * int(s)).reshape((-1,) + (1,) * (len(size) - d - 1))
    return idx


@lowering(aten.as_strided.default, aten.as_strided_copy.default)
def as_strided(x, size, stride, storage_offset=None):
    return x.reshape(-1)[_strided_index(size, stride, storage_offset)]


@lowering(aten.as_strided_scatter.default)
def as_strided_scatter(x, src, size, stride, storage_offset=None):
    idx = _strided_index(size, stride, storage_offset)
    return x.reshape(-1).at[idx].set(src.astype(x.dtype).reshape(idx.shape)).reshape(x.shape)


@lowering(aten.diagonal_scatter.default)
def diagonal_scatter(x, src, offset=0, dim1=0, dim2=1):
    d1, d2 = dim_(dim1, x.ndim), dim_(dim2, x.ndim)
    moved = jnp.moveaxis(x, (d1, d2), (-2, -1))
    rows, cols = moved.shape[-2:]
    n = max(0, min(rows + min(offset, 0), cols - max(offset, 0)))
    i = np.arange(n)
    moved = moved.at[..., i - min(offset, 0), i + max(offset, 0)].set(src.astype(x.dtype))
    return jnp.moveaxis(moved, (-2, -1), (d1, d2))


@lowering(aten.narrow_copy.default)
def narrow_copy(x, dim, start, length):
    d = dim_(dim, x.ndim)
    start = start + x.shape[d] if start < 0 else start
    return jax.lax.slice_in_dim(x, start, start + length, axis=d)


@lowering(aten.unbind_copy.int)
def unbind_copy(x, dim=0):
    return list(jnp.moveaxis(x, dim_(dim, x.ndim), 0))

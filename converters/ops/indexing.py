"""Gather family: advanced indexing, index_put, gather, index_add/copy, embedding(_renorm), *_scatter
along slices, index generators (tril/triu_indices, repeat_interleave)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bridge.errors import LoweringError
from converters.ops.common import aten, dim_, dt
from converters.registry import lowering


def _index_tuple(indices):
    return tuple(slice(None) if i is None else i for i in indices)


def _data_dependent(what: str):
    return LoweringError(f"{what} has a data-dependent output shape; it cannot run under jax.jit "
                         "(traced values have static shapes)")


def _concrete(*arrays) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


@lowering(aten.nonzero.default)
def nonzero(x):
    """Indices of the non-zero elements, (n, ndim) int64: outside jit only (n depends on the data)."""
    if not _concrete(x):
        raise _data_dependent("nonzero")
    return jnp.asarray(np.argwhere(np.asarray(x)))


@lowering(aten.nonzero_static.default)
def nonzero_static(x, *, size, fill_value=-1):
    """The first `size` non-zero indices, padded with `fill_value`: a static shape, so it runs under jit."""
    if x.size == 0:   # jnp.argwhere ignores fill_value for empty inputs
        return jnp.full((size, x.ndim), fill_value, jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
    return jnp.argwhere(x, size=size, fill_value=fill_value).reshape(size, x.ndim)


def no_negatives(index, size):
    """Negative indices made out of bounds (torch's embedding, index_select and gather reject them)."""
    return jnp.where(index < 0, size, index)


def get_or_fill(x, idx):
    """x[idx] where torch raises on an out-of-bounds index and JAX would clamp it silently: those
    positions read NaN (floats; the lowest integer for ints), so a bad index cannot pass for a result.
    Negative indices in [-n, -1] wrap, as torch's advanced indexing does."""
    return x.at[idx].get(mode="fill")


@lowering(aten.index.Tensor)
def index(x, indices):
    masks = [i for i in indices if i is not None and i.dtype == jnp.bool_]
    if masks and not _concrete(*masks):
        raise _data_dependent("indexing with a boolean mask")
    return x[_index_tuple(indices)] if masks else get_or_fill(x, _index_tuple(indices))


@lowering(aten.masked_select.default)
def masked_select(x, mask):
    if not _concrete(mask):
        raise _data_dependent("masked_select")
    shape = jnp.broadcast_shapes(x.shape, mask.shape)
    return jnp.broadcast_to(x, shape)[np.broadcast_to(np.asarray(mask), shape)]


def _mask_put(x, k, mask, values, accumulate):
    """x[(:,)*k + (mask,)] = values with a static shape: the j-th True takes row j of `values`."""
    m = mask.ndim
    values = values.astype(x.dtype)
    sel_shape = x.shape[:k] + (None,) + x.shape[k + m:]
    nv = values.shape[values.ndim - len(sel_shape) + k] if values.ndim >= len(sel_shape) - k else 1
    values = jnp.broadcast_to(values, tuple(nv if s is None else s for s in sel_shape))
    flat = mask.reshape(-1)
    rank = jnp.clip(jnp.cumsum(flat) - 1, 0, nv - 1)
    picked = jnp.take(values, rank, axis=k).reshape(x.shape)
    where = mask.reshape((1,) * k + mask.shape + (1,) * (x.ndim - k - m))
    return x + jnp.where(where, picked, 0) if accumulate else jnp.where(where, picked, x)


@lowering(aten.index_put.default)
def index_put(x, indices, values, accumulate=False):
    given = [(k, i) for k, i in enumerate(indices) if i is not None]
    if len(given) == 1 and given[0][1].dtype == jnp.bool_:
        return _mask_put(x, given[0][0], given[0][1], values, accumulate)
    values = values.astype(x.dtype)
    if accumulate:
        return x.at[_index_tuple(indices)].add(values)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return x.at[_index_tuple(indices)].set(values)
    layout = tuple(i is not None for i in indices)
    return _put(layout, x, [i for i in indices if i is not None], values)


def _full_index(layout, arrays):
    it = iter(arrays)
    return tuple(next(it) if given else slice(None) for given in layout)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _put(layout, x, arrays, values):
    """x[indices] = values with torch's index_put gradient: every value gets the gradient at the position it
    was written to, duplicates included (JAX's scatter gives it only to the write that lands)."""
    return x.at[_full_index(layout, arrays)].set(values)


@_put.defjvp
def _put_jvp(layout, primals, tangents):
    x, arrays, values = primals
    tx, _, tv = tangents
    at = _full_index(layout, arrays)
    # linear in (tx, tv); its transpose gathers the output gradient at every index, as torch's backward does
    kept = jnp.ones(x.shape, tx.dtype).at[at].set(0)
    return x.at[at].set(values), tx * kept + jnp.zeros_like(tx).at[at].add(tv)


@lowering(aten.index_select.default)
def index_select(x, dim, index):
    if not x.ndim:
        return x
    d = dim_(dim, x.ndim)   # a 0-d index keeps the dim at size 1, as torch
    return jnp.take(x, no_negatives(index.reshape(-1), x.shape[d]), axis=d, mode="fill")


def along(x, dim, index):
    """Full index tuple that addresses `index` along `dim` and iota elsewhere (torch.gather layout)."""
    d = dim_(dim, x.ndim)
    grids = jnp.meshgrid(*[jnp.arange(s) for s in index.shape], indexing="ij", sparse=True)
    return tuple(index if i == d else grids[i] for i in range(index.ndim))


@lowering(aten.gather.default)
def gather(x, dim, index, *, sparse_grad=False):
    if index.size == 0:
        return jnp.zeros(index.shape, x.dtype)
    if x.ndim == 0:
        return x.reshape(index.shape)
    return get_or_fill(x, along(x, dim, no_negatives(index, x.shape[dim_(dim, x.ndim)])))


@lowering(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def masked_fill(x, mask, value):
    return jnp.where(mask, jnp.asarray(value, x.dtype), x)


def scale_grad(rows, indices, num_weights):
    """Forward unchanged; the gradient of each looked-up row divided by its index's frequency."""
    freq = jnp.zeros(num_weights, rows.dtype).at[indices].add(1)[indices]
    return jax.lax.stop_gradient(rows) + (rows - jax.lax.stop_gradient(rows)) / freq[..., None]


@lowering(aten.embedding.default)
def embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    out = get_or_fill(weight, no_negatives(indices, weight.shape[0]))   # an id >= vocab size reads NaN
    if scale_grad_by_freq:
        out = scale_grad(out, indices, weight.shape[0])
    if padding_idx is not None and padding_idx >= 0:  # torch gives the padding row no gradient
        out = jnp.where((indices == padding_idx)[..., None], jax.lax.stop_gradient(out), out)
    return out


@lowering(aten.embedding_renorm.default)
def embedding_renorm(weight, indices, max_norm, norm_type):
    """Rows looked up by `indices` rescaled to norm <= max_norm (torch's 1e-7 guard)."""
    rows = jnp.unique(indices.reshape(-1), size=indices.size, fill_value=weight.shape[0])
    w = weight.astype(jnp.float32)
    norm = jnp.linalg.vector_norm(w[jnp.clip(rows, 0, weight.shape[0] - 1)], ord=norm_type, axis=-1)
    scale = jnp.where(norm > max_norm, max_norm / (norm + 1e-7), 1.0)
    return w.at[rows].multiply(scale[:, None], mode="drop").astype(weight.dtype)


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


def _index_along(x, dim, index, source, update):
    """x.at[..., index, ...] along `dim` (0-d tensors act as 1-element vectors)."""
    x1 = jnp.atleast_1d(x)
    d = dim_(dim, x1.ndim)
    idx = (slice(None),) * d + (index.reshape(-1),)
    src = source.astype(x.dtype).reshape(x1.shape[:d] + (index.size,) + x1.shape[d + 1:])
    return update(x1.at[idx], src).reshape(x.shape)


@lowering(aten.index_add.default)
def index_add(x, dim, index, source, *, alpha=1):
    return _index_along(x, dim, index, source * alpha, lambda ref, s: ref.add(s))


@lowering(aten.index_copy.default)
def index_copy(x, dim, index, source):
    return _index_along(x, dim, index, source, lambda ref, s: ref.set(s))


@lowering(aten.diagonal.default, aten.diagonal_copy.default)
def diagonal(x, offset=0, dim1=0, dim2=1):
    return jnp.diagonal(x, offset, dim_(dim1, x.ndim), dim_(dim2, x.ndim))


# --------------------------------------------------------------------------- index generators
@lowering(aten.tril_indices.default)
def tril_indices(row, col, offset=0, *, dtype=None, layout=None, device=None, pin_memory=None):
    return jnp.asarray(np.stack(np.tril_indices(row, offset, col)), dt(dtype, jnp.int64)).reshape(2, -1)


@lowering(aten.triu_indices.default)
def triu_indices(row, col, offset=0, *, dtype=None, layout=None, device=None, pin_memory=None):
    return jnp.asarray(np.stack(np.triu_indices(row, offset, col)), dt(dtype, jnp.int64)).reshape(2, -1)


@lowering(aten.repeat_interleave.Tensor)
def repeat_interleave(repeats, *, output_size=None):
    """[0]*r0 + [1]*r1 + ...: static only when the graph carries output_size."""
    if output_size is None:
        if not _concrete(repeats):
            raise _data_dependent("repeat_interleave without output_size")
        output_size = int(np.sum(np.asarray(repeats)))
    return jnp.repeat(jnp.arange(repeats.shape[0], dtype=repeats.dtype), repeats,
                      total_repeat_length=int(output_size))

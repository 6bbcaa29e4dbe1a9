"""Sorting, selection and histogram ops (sort, topk, kthvalue, median, mode, searchsorted, histc, histogram...).

Every selection is a stable sort with NaN largest, as torch orders them: ties resolve as torch's stable sort
and as its CPU selection kernels on small rows (the later index for kthvalue/median/mode). torch's CPU kernels
are not stable beyond that (libstdc++'s std::sort / nth_element / partial_sort, a quickselect): on a row of
equal values (a zero-initialised router's scores, a constant mask) they return a fixed permutation, which
`_tied_order` asks torch for once per shape, so such rows select and order what torch does; rows where only
some values tie keep the stable order. Gradients reach the elements selected (a gather at the indices).
Histograms take their bin edges from the arguments or from the data's min/max (values only, so shapes stay
static). bincount/unique/unique_consecutive have data-dependent output sizes (torch.export gives them unbacked
sizes) and are not lowered.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import torch
from jax import lax

from converters.ops.common import aten, as_array, dim_
from converters.registry import lowering


def _index_dtype():
    return jnp.int64 if jax.config.jax_enable_x64 else jnp.int32


def _descending_key(x):
    """An order-reversing key: -x for floats, ~x for ints and bools (no overflow)."""
    return -x if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.invert(x)


def _sort(x, axis: int, descending: bool = False):
    """Stable sort along `axis` with NaN largest: (values, int indices)."""
    idx = lax.broadcasted_iota(_index_dtype(), x.shape, axis)
    if not descending:
        _, vals, idx = lax.sort((x, x, idx), dimension=axis, is_stable=True, num_keys=1)
        return vals, idx
    nan_last = ~jnp.isnan(x) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.zeros(x.shape, bool)
    _, _, vals, idx = lax.sort((nan_last, _descending_key(x), x, idx), dimension=axis, is_stable=True, num_keys=2)
    return vals, idx


def _take(a, pos, axis: int, keepdim: bool):
    """a[..., pos, ...] along axis, where pos has a's shape with axis reduced to 1."""
    out = jnp.take_along_axis(a, pos, axis=axis)
    return out if keepdim else jnp.squeeze(out, axis)


@functools.lru_cache(maxsize=256)
def _tied_order(op: str, n: int, *args):
    """torch's CPU indices for a row of n equal values (a permutation its algorithms' swaps fix), e.g.
    _tied_order("topk", 4, 2, True, True) -> [2, 3]."""
    z = torch.zeros(n)
    with torch.no_grad():
        out = {"topk": lambda k, largest, sorted_: torch.topk(z, k, largest=largest, sorted=sorted_),
               "sort": lambda descending: torch.sort(z, descending=descending),
               "kthvalue": lambda k: torch.kthvalue(z, k),
               "median": lambda: torch.median(z, 0),
               "mode": lambda: torch.mode(z)}[op](*args)
    return out.indices.numpy().astype("int32")


def _all_tied(x, axis: int, nan_ties: bool):
    """Rows (keepdims) whose values all compare equal (with nan_ties, all-NaN rows too: sort's and topk's
    comparators order NaN above everything, so NaNs tie with each other)."""
    first = lax.slice_in_dim(x, 0, 1, axis=axis)
    same = x == first
    if nan_ties and jnp.issubdtype(x.dtype, jnp.inexact):
        same = same | (jnp.isnan(x) & jnp.isnan(first))
    return jnp.all(same, axis=axis, keepdims=True)


def _as_torch_on_ties(x, axis: int, idx, order):
    """idx (positions along axis), with torch's `order` on rows of equal values; values gathered from x."""
    order = jnp.asarray(order).astype(idx.dtype).reshape([-1 if i == axis else 1 for i in range(x.ndim)])
    idx = jnp.where(_all_tied(x, axis, nan_ties=True), order, idx)
    return jnp.take_along_axis(x, idx, axis=axis), idx


def _scalar_safe(fn):
    """Run a dim-wise op on 0-d inputs as 1-element vectors (torch accepts dim 0 / -1 there)."""
    def wrapped(x, *args, **kwargs):
        if x.ndim:
            return fn(x, *args, **kwargs)
        return jax.tree.map(lambda o: o.reshape(()), fn(x.reshape(1), *args, **kwargs))
    return wrapped


@lowering(aten.sort.default, aten.sort.stable)
@_scalar_safe
def sort(x, dim=-1, descending=False, *, stable=None):
    axis = dim_(dim, x.ndim)
    vals, idx = _sort(x, axis, descending)
    if stable or x.shape[axis] <= 1:
        return vals, idx
    return _as_torch_on_ties(x, axis, idx, _tied_order("sort", x.shape[axis], bool(descending)))


@lowering(aten.topk.default)
@_scalar_safe
def topk(x, k, dim=-1, largest=True, sorted=True):
    axis = dim_(dim, x.ndim)
    x_RN = jnp.moveaxis(x, axis, -1)
    if largest and x.dtype != jnp.bool_:
        idx = lax.top_k(x_RN, k)[1].astype(_index_dtype())
    else:
        idx = lax.slice_in_dim(_sort(x_RN, x.ndim - 1, descending=largest)[1], 0, k, axis=x.ndim - 1)
    if k == 0 or x.dtype == jnp.bool_:
        vals = jnp.take_along_axis(x_RN, idx, axis=-1)
    else:
        order = _tied_order("topk", x_RN.shape[-1], k, bool(largest), bool(sorted))
        vals, idx = _as_torch_on_ties(x_RN, x.ndim - 1, idx, order)
    return jnp.moveaxis(vals, -1, axis), jnp.moveaxis(idx, -1, axis)


def _one_on_ties(x, axis, keepdim, idx, index):
    """(value, index) at idx (keepdims), torch's `index` on rows of equal values; the value gathered from x."""
    idx = jnp.where(_all_tied(x, axis, nan_ties=False), jnp.asarray(index).astype(idx.dtype), idx)
    val = jnp.take_along_axis(x, idx, axis=axis)
    return (val, idx) if keepdim else (jnp.squeeze(val, axis), jnp.squeeze(idx, axis))


def _select(x, axis, keepdim, pos):
    """(value, index) at sorted position pos (an array broadcastable to the reduced shape)."""
    vals, idx = _sort(x, axis)
    pos = jnp.broadcast_to(jnp.asarray(pos, idx.dtype), [1 if i == axis else s for i, s in enumerate(x.shape)])
    return _take(vals, pos, axis, keepdim), _take(idx, pos, axis, keepdim)


@lowering(aten.kthvalue.default)
@_scalar_safe
def kthvalue(x, k, dim=-1, keepdim=False):
    axis = dim_(dim, x.ndim)
    return _one_on_ties(x, axis, keepdim, _select(x, axis, True, k - 1)[1], _tied_order("kthvalue", x.shape[axis], k))


def _median(x, axis, keepdim, ignore_nan):
    n = x.shape[axis]
    nans = jnp.sum(jnp.isnan(x), axis=axis, keepdims=True) if jnp.issubdtype(x.dtype, jnp.inexact) \
        else jnp.zeros([1 if i == axis else s for i, s in enumerate(x.shape)], jnp.int32)
    if ignore_nan:  # lower median of the non-NaN values; all-NaN rows give the first NaN
        pos = jnp.maximum((n - nans - 1) // 2, 0)
    else:           # any NaN: the first NaN (NaN sorts last)
        pos = jnp.where(nans > 0, n - nans, (n - 1) // 2)
    return _select(x, axis, keepdim, pos)


@lowering(aten.median.dim)
@_scalar_safe
def median_dim(x, dim=-1, keepdim=False):
    axis = dim_(dim, x.ndim)
    return _one_on_ties(x, axis, keepdim, _median(x, axis, True, ignore_nan=False)[1],
                        _tied_order("median", x.shape[axis]))


@lowering(aten.nanmedian.dim)
@_scalar_safe
def nanmedian_dim(x, dim=-1, keepdim=False):
    return _median(x, dim_(dim, x.ndim), keepdim, ignore_nan=True)


def _evenly(x, v):
    """v, a value x holds, with torch's gradient for a whole-tensor selection: shared evenly by the elements
    equal to it (NaN ones when v is NaN), not given to one of them."""
    tied = (x == v) | (jnp.isnan(x) & jnp.isnan(v)) if jnp.issubdtype(x.dtype, jnp.inexact) else x == v
    share = jnp.where(tied, x, 0).sum() / jnp.maximum(tied.sum(), 1)
    flat = lax.stop_gradient(v) + (share - lax.stop_gradient(share))   # v's value, share's gradient
    return jnp.where(jnp.isfinite(share), flat, v) if jnp.issubdtype(x.dtype, jnp.inexact) else v


@lowering(aten.median.default)
def median(x):
    if not x.size:
        return jnp.full((), jnp.nan, x.dtype)
    return _evenly(x, _median(x.reshape(-1), 0, False, ignore_nan=False)[0])


@lowering(aten.nanmedian.default)
def nanmedian(x):
    if not x.size:
        return jnp.full((), jnp.nan, x.dtype)
    return _evenly(x, _median(x.reshape(-1), 0, False, ignore_nan=True)[0])


@lowering(aten.mode.default)
@_scalar_safe
def mode(x, dim=-1, keepdim=False):
    """Most frequent value (the smallest among equally frequent ones) and its last index, as torch's CPU kernel."""
    axis = dim_(dim, x.ndim)
    vals, idx = _sort(x, axis)
    pos = lax.broadcasted_iota(jnp.int32, x.shape, axis)
    prev = jnp.concatenate([lax.slice_in_dim(vals, 0, 1, axis=axis), lax.slice_in_dim(vals, 0, -1, axis=axis)], axis)
    starts = (pos == 0) | (vals != prev)
    run = pos - lax.cummax(jnp.where(starts, pos, 0), axis=axis)
    best = jnp.argmax(run, axis=axis, keepdims=True)   # first maximal run ends there: the smallest mode value
    return _one_on_ties(x, axis, keepdim, _take(idx, best, axis, True), _tied_order("mode", x.shape[axis]))


# ------------------------------------------------------------------------------ binary search
def _searchsorted(seq, x, side, sorter=None, out_int32=False):
    seq, x = as_array(seq), as_array(x)
    t = jnp.result_type(seq.dtype, x.dtype)
    seq, x = seq.astype(t), x.astype(t)
    if sorter is not None:
        seq = jnp.take_along_axis(seq, sorter, axis=-1)
    if seq.ndim <= 1:
        out = jnp.searchsorted(seq.reshape(-1), x, side=side)
    elif x.size == 0:
        out = jnp.zeros(x.shape, jnp.int32)
    else:  # one sorted row per leading index of x
        rows = math.prod(seq.shape[:-1])
        out = jax.vmap(lambda s, v: jnp.searchsorted(s, v, side=side))(
            seq.reshape(rows, seq.shape[-1]), x.reshape(rows, x.shape[-1])).reshape(x.shape)
    return out.astype(jnp.int32 if out_int32 else _index_dtype())


@lowering(aten.searchsorted.Tensor, aten.searchsorted.Scalar)
def searchsorted(seq, x, *, out_int32=False, right=False, side=None, sorter=None):
    return _searchsorted(seq, x, "right" if right or side == "right" else "left", sorter, out_int32)


@lowering(aten.bucketize.Tensor, aten.bucketize.Scalar)
def bucketize(x, boundaries, *, out_int32=False, right=False):
    return _searchsorted(boundaries, x, "right" if right else "left", None, out_int32)


# ------------------------------------------------------------------------------ histograms
def _linspace(start, end, steps: int, dtype):
    """torch's linspace kernel: start + i*step on the first half, end - (steps-1-i)*step on the second."""
    start, end = jnp.asarray(start, dtype), jnp.asarray(end, dtype)
    if steps == 1:
        return start.reshape(1)
    step = (end - start) / (steps - 1)
    i = jnp.arange(steps, dtype=dtype)
    return jnp.where(jnp.arange(steps) < steps // 2, start + step * i, end - step * (steps - 1 - i))


def _outer_edges(x_MD, d: int, range_):
    """histogramdd's outer edges: the range, or the data's min/max (0..1 when empty), widened by 0.5 if equal."""
    if range_ is not None:
        lo, hi = jnp.asarray(range_[2 * d], x_MD.dtype), jnp.asarray(range_[2 * d + 1], x_MD.dtype)
    elif x_MD.shape[0] == 0:
        lo, hi = jnp.zeros((), x_MD.dtype), jnp.ones((), x_MD.dtype)
    else:
        lo, hi = jnp.min(x_MD[:, d]), jnp.max(x_MD[:, d])
    return jnp.where(lo == hi, lo - 0.5, lo), jnp.where(lo == hi, hi + 0.5, hi)


def _bin_edges(x_MD, bins, range_):
    return [_linspace(*_outer_edges(x_MD, d, range_), int(b) + 1, x_MD.dtype) for d, b in enumerate(bins)]


def _histdd(x, edges, weight=None, density=False, positions=None):
    """Counts (or weights) of the rows of x (..., D) in the D-dimensional bins given by `edges`."""
    x_MD = x.reshape(-1, x.shape[-1])
    nbins = [e.shape[0] - 1 for e in edges]
    valid = jnp.ones(x_MD.shape[0], bool)
    flat = jnp.zeros(x_MD.shape[0], jnp.int32)
    for d, e in enumerate(edges):
        xd = x_MD[:, d]
        valid = valid & (xd >= e[0]) & (xd <= e[-1])
        pos = positions[d] if positions is not None else jnp.searchsorted(e, xd, side="right") - 1
        pos = jnp.clip(jnp.where(pos == nbins[d], nbins[d] - 1, pos), 0, max(nbins[d] - 1, 0))
        flat = flat * nbins[d] + pos.astype(jnp.int32)
    w = jnp.ones(x_MD.shape[0], x.dtype) if weight is None else weight.reshape(-1).astype(x.dtype)
    hist = jnp.zeros(math.prod(nbins), x.dtype).at[flat].add(jnp.where(valid, w, 0)).reshape(nbins)
    if density:
        hist = hist / jnp.sum(hist)
        for d, e in enumerate(edges):
            hist = hist / jnp.diff(e).reshape([-1 if i == d else 1 for i in range(len(edges))])
    return hist


@lowering(aten.histc.default)
def histc(x, bins=100, min=0, max=0):
    """Linear-interpolation binning (no search), as torch's histc kernel."""
    xf = x.reshape(-1)
    lo, hi = jnp.asarray(min, x.dtype), jnp.asarray(max, x.dtype)
    if min == max and xf.size:
        lo, hi = jnp.min(xf), jnp.max(xf)
    lo, hi = jnp.where(lo == hi, lo - 1, lo), jnp.where(lo == hi, hi + 1, hi)
    edges = _linspace(lo, hi, int(bins) + 1, x.dtype)
    pos = jnp.trunc((xf - edges[0]) * bins / (edges[-1] - edges[0]))
    pos = jnp.where(jnp.isfinite(pos), pos, 0).astype(jnp.int32)
    return _histdd(xf[:, None], [edges], positions=[pos])


@lowering(aten.histogram.bin_ct)
def histogram_bin_ct(x, bins=100, *, range=None, weight=None, density=False):
    x_M1 = x.reshape(-1, 1)
    edges = _bin_edges(x_M1, [bins], range)
    return _histdd(x_M1, edges, weight, density), edges[0]


@lowering(aten.histogram.bins_tensor)
def histogram_bins_tensor(x, bins, *, weight=None, density=False):
    return _histdd(x.reshape(-1, 1), [bins], weight, density), bins


@lowering(aten._histogramdd_bin_edges.default)
def histogramdd_bin_edges(x, bins, range=None, weight=None, density=False):
    return _bin_edges(x.reshape(-1, x.shape[-1]), bins, range)


@lowering(aten._histogramdd_from_bin_cts.default)
def histogramdd_from_bin_cts(x, bins, range=None, weight=None, density=False):
    return _histdd(x, _bin_edges(x.reshape(-1, x.shape[-1]), bins, range), weight, density)


@lowering(aten._histogramdd_from_bin_tensors.default)
def histogramdd_from_bin_tensors(x, bins, *, weight=None, density=False):
    return _histdd(x, list(bins), weight, density)

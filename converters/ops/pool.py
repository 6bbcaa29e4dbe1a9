"""Pooling (max with torch's indices, average, adaptive, fractional, Lp via its parts) over torch's
NC... layouts, the window geometry of ceil_mode / padding / dilation as torch computes it."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from converters.ops.common import aten
from converters.ops.conv import _tuple
from converters.registry import lowering


def _pool_geometry(shape_sp, kernel, stride, padding, dilation, ceil_mode):
    """torch's output sizes and the (low, high) padding that yields them."""
    pads, outs = [], []
    for L, k, s, p, d in zip(shape_sp, kernel, stride, padding, dilation):
        span = d * (k - 1) + 1
        num = L + 2 * p - span
        out = (-(-num // s) if ceil_mode else num // s) + 1
        if ceil_mode and (out - 1) * s >= L + p:
            out -= 1
        pads.append((p, max((out - 1) * s + span - L - p, 0)))
        outs.append(out)
    return pads, outs


def _pool_args(x, kernel_size, stride, padding, dilation, nd):
    kernel = _tuple(kernel_size, nd)
    stride = _tuple(stride, nd) if stride else kernel
    return kernel, stride, _tuple(padding, nd), _tuple(dilation, nd)


def _lowest(dtype):
    return -np.inf if jnp.issubdtype(dtype, jnp.floating) else jnp.iinfo(dtype).min


def _max_pool(x, kernel_size, stride, padding, dilation, ceil_mode, nd):
    kernel, stride, padding, dilation = _pool_args(x, kernel_size, stride, padding, dilation, nd)
    lead = x.ndim - nd
    pads, outs = _pool_geometry(x.shape[lead:], kernel, stride, padding, dilation, ceil_mode)
    if stride == kernel and set(dilation) == {1} and all(isinstance(d, int) for d in x.shape[lead:]):
        geo = (tuple(x.shape[lead:]), kernel, tuple(pads), tuple(outs))
        return _tiles_max(x, geo), _tiles_argmax(lax.stop_gradient(x), geo)
    cfg = (nd, (1,) * lead + kernel, (1,) * lead + stride, tuple([(0, 0)] * lead + pads), (1,) * lead + dilation)
    return _window_max(x, *cfg), _window_argmax(lax.stop_gradient(x), *cfg)


# Windows that tile the input (stride == kernel, no dilation: MaxPool2d(2) and the like) are blocks of a
# reshape, so the max, torch's index and the gradient are reductions and selects XLA fuses; the general
# path's argmax gather and its scatter-add gradient cost 1.2-1.5x more (64x16x16x16, 2x2, fwd+bwd).
def _tiles(x, geo, fill):
    """x padded with `fill`, cropped to whole windows and reshaped to (lead..., O1, k1, O2, k2, ...)."""
    sizes, kernel, pads, outs = geo
    lead = x.ndim - len(sizes)
    x = lax.pad(x, np.array(fill, x.dtype), [(0, 0, 0)] * lead + [(lo, hi, 0) for lo, hi in pads])
    x = lax.slice(x, (0,) * x.ndim, x.shape[:lead] + tuple(o * k for o, k in zip(outs, kernel)))
    return x.reshape(x.shape[:lead] + sum(((o, k) for o, k in zip(outs, kernel)), ()))


def _tile_axes(geo, lead):
    return tuple(lead + 2 * i + 1 for i in range(len(geo[0])))


def _tile_taps(geo, lead):
    """Per tile position: the tap number within its window, and whether it lies inside the input
    (both with `lead` leading unit axes)."""
    sizes, kernel, pads, outs = geo
    tap, valid, inner = np.zeros((), np.int32), np.ones((), bool), 1
    for L, k, (lo, _), O in reversed(list(zip(sizes, kernel, pads, outs))):
        pos = np.arange(O)[:, None] * k - lo + np.arange(k)[None, :]
        tap = np.multiply.outer(np.arange(k, dtype=np.int32)[None, :] * inner, np.ones_like(tap)) + tap
        valid = np.multiply.outer((pos >= 0) & (pos < L), valid)
        inner *= k
    full = (1,) * lead + sum(((o, k) for o, k in zip(outs, kernel)), ())
    return np.broadcast_to(tap.reshape((1,) * (len(full) - tap.ndim) + tap.shape), full), valid.reshape(full)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _tiles_max(x, geo):
    return jnp.max(_tiles(x, geo, _lowest(x.dtype)), axis=_tile_axes(geo, x.ndim - len(geo[0])))


def _tiles_tap(x, geo):
    """Tap of torch's pick per window: the first max, or the last nan (its CPU kernel replaces the
    running max when `val > max or isnan(val)`); padding is never picked."""
    lead = x.ndim - len(geo[0])
    axes = _tile_axes(geo, lead)
    tiles = _tiles(x, geo, _lowest(x.dtype))
    tap, valid = _tile_taps(geo, lead)
    hit = valid & (tiles == jnp.max(tiles, axis=axes, keepdims=True))
    pick = jnp.min(jnp.where(hit, tap, np.iinfo(np.int32).max), axis=axes)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        last_nan = jnp.max(jnp.where(valid & jnp.isnan(tiles), tap, -1), axis=axes)
        pick = jnp.where(last_nan >= 0, last_nan, pick)
    return pick


def _tiles_argmax(x, geo):
    """torch's flat spatial input index of each window's pick."""
    sizes, kernel, pads, outs = geo
    pick, flat, inner, stride = _tiles_tap(x, geo), 0, 1, 1
    nd = len(sizes)
    for i in reversed(range(nd)):
        o = np.arange(outs[i]).reshape((1,) * (pick.ndim - nd + i) + (outs[i],) + (1,) * (nd - 1 - i))
        flat = flat + (o * kernel[i] - pads[i][0] + pick // inner % kernel[i]) * stride
        inner, stride = inner * kernel[i], stride * sizes[i]
    return flat.astype(jnp.int32)


@_tiles_max.defjvp
def _tiles_max_jvp(geo, primals, tangents):
    (x,), (t,) = primals, tangents
    lead = x.ndim - len(geo[0])
    axes = _tile_axes(geo, lead)
    pick = jnp.expand_dims(_tiles_tap(lax.stop_gradient(x), geo), axes)
    dy = jnp.sum(jnp.where(_tile_taps(geo, lead)[0] == pick, _tiles(t, geo, 0), 0), axis=axes)
    return _tiles_max(x, geo), dy.astype(t.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4, 5))
def _window_max(x, nd, win, strides, pads, dil):
    """Max over each window; its derivative is the input's at the window's argmax, as in torch."""
    init = np.array(_lowest(x.dtype), x.dtype)
    return lax.reduce_window(x, init, lax.max, win, strides, pads, window_dilation=dil)


@_window_max.defjvp
def _window_max_jvp(nd, win, strides, pads, dil, primals, tangents):
    (x,), (t,) = primals, tangents
    idx = _window_argmax(x, nd, win, strides, pads, dil)
    return _window_max(x, nd, win, strides, pads, dil), _take_flat(t, idx, nd)


def _take_flat(x, idx, nd):
    """x[..., idx] over the flattened trailing `nd` axes of x (idx holds flat spatial indices)."""
    lead = x.shape[:x.ndim - nd]
    at = idx.reshape(lead + (math.prod(idx.shape[len(lead):]),))
    return jnp.take_along_axis(x.reshape(lead + (math.prod(x.shape[len(lead):]),)), at, axis=-1).reshape(idx.shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4, 5))
def _window_argmax(x, nd, win, strides, pads, dil):
    """Flat spatial index of each window's max as torch returns it: the first occurrence, or the last
    nan (an order on (value, index) pairs, so the reduction may combine them in any order)."""
    lead = x.ndim - nd
    iota = jnp.broadcast_to(jnp.arange(math.prod(x.shape[lead:]), dtype=jnp.int32).reshape(x.shape[lead:]), x.shape)

    def pick(a, b):
        (va, ia), (vb, ib) = a, b
        nan_a, nan_b = jnp.isnan(va), jnp.isnan(vb)
        take_b = jnp.where(nan_a | nan_b, nan_b & (~nan_a | (ib > ia)), (vb > va) | ((vb == va) & (ib < ia)))
        return jnp.where(take_b, vb, va), jnp.where(take_b, ib, ia)

    init = np.array(_lowest(x.dtype), x.dtype)
    big = jnp.asarray(np.iinfo(np.int32).max, jnp.int32)
    return lax.reduce_window((x, iota), (init, big), pick, win, strides, pads, window_dilation=dil)[1]


@_window_argmax.defjvp
def _window_argmax_jvp(nd, win, strides, pads, dil, primals, tangents):
    out = _window_argmax(*primals, nd, win, strides, pads, dil)
    return out, np.zeros(out.shape, jax.dtypes.float0)


@lowering(aten.max_pool2d_with_indices.default)
def max_pool2d_with_indices(x, kernel_size, stride=(), padding=(0,), dilation=(1,), ceil_mode=False):
    return _max_pool(x, kernel_size, stride, padding, dilation, ceil_mode, 2)


@lowering(aten.max_pool3d_with_indices.default)
def max_pool3d_with_indices(x, kernel_size, stride=(), padding=(0,), dilation=(1,), ceil_mode=False):
    return _max_pool(x, kernel_size, stride, padding, dilation, ceil_mode, 3)


def _gather_windows_max(x, tables):
    """Max of windows given per spatial axis as index tables broadcastable to lead + (O, K), each row
    starting at its window's start (padded rows repeat the start, which wins ties by coming first).

    Returns the values (whose derivative goes to the argmax only, as torch's) and int64 flat spatial indices.
    """
    nd = len(tables)
    lead = x.ndim - nd
    tables = [t.reshape((1,) * (lead + 2 - t.ndim) + t.shape) for t in tables]
    y = x
    for i, idx in enumerate(tables):
        O, K = idx.shape[-2:]
        if isinstance(idx, np.ndarray) and idx.shape[:-2] == (1,) * lead:
            y = jnp.take(y, idx.reshape(O * K), axis=lead + i)
        else:
            y = jnp.take_along_axis(y, idx.reshape(idx.shape[:-2] + (1,) * i + (O * K,) + (1,) * (nd - i - 1)),
                                    axis=lead + i)
    outs, ks = tuple(t.shape[-2] for t in tables), tuple(t.shape[-1] for t in tables)
    y = y.reshape(y.shape[:lead] + sum(((o, k) for o, k in zip(outs, ks)), ()))
    y = y.transpose(tuple(range(lead)) + tuple(lead + 2 * i + j for j in (0, 1) for i in range(nd)))  # outs, then ks
    y = y.reshape(y.shape[:lead + nd] + (math.prod(ks),))
    arg = jnp.argmax(lax.stop_gradient(y), axis=-1)
    vals = jnp.take_along_axis(y, arg[..., None], axis=-1)[..., 0]
    flat, stride, inner = 0, 1, 1
    for i in reversed(range(nd)):
        start = tables[i][..., 0].reshape(tables[i].shape[:lead] + (1,) * i + (outs[i],) + (1,) * (nd - i - 1))
        flat = flat + (start + arg // inner % ks[i]) * stride
        stride, inner = stride * x.shape[lead + i], inner * ks[i]
    return vals, flat


def _adaptive_table(L, O):
    """torch's adaptive windows [floor(i*L/O), ceil((i+1)*L/O)), padded to one width with the window start."""
    lo, hi = (np.arange(O) * L) // O, -(-((np.arange(O) + 1) * L) // O)
    idx = lo[:, None] + np.arange(int((hi - lo).max()))
    return np.where(idx < hi[:, None], idx, lo[:, None]).astype(np.int32)


@lowering(aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default)
def adaptive_max_pool(x, output_size):
    nd = len(output_size)
    return _gather_windows_max(x, [_adaptive_table(L, O) for L, O in zip(x.shape[-nd:], output_size)])


def _fractional_tables(x, kernel_size, output_size, samples):
    """Pseudo-random window starts of fractional max pooling from `samples` (..., nd) (torch's generate_intervals)."""
    nd = len(output_size)
    tables = []
    for i, (L, O, k) in enumerate(zip(x.shape[-nd:], output_size, kernel_size)):
        u = samples[..., nd - 1 - i] if nd == 2 else samples[..., i]  # 2-d samples are (w, h); 3-d (t, h, w)
        u = u.reshape(x.shape[:x.ndim - nd])  # unbatched inputs come with samples (1, C, nd)
        alpha = jnp.asarray(L - k, u.dtype) / jnp.asarray(max(O - 1, 1), u.dtype)
        i_O = jnp.arange(O, dtype=u.dtype)
        starts = (((i_O + u[..., None]) * alpha).astype(jnp.int32) - (u * alpha).astype(jnp.int32)[..., None])
        starts = starts.at[..., O - 1].set(L - k)
        tables.append(starts[..., None] + jnp.arange(k, dtype=jnp.int32))
    return tables


@lowering(aten.fractional_max_pool2d.default, aten.fractional_max_pool3d.default)
def fractional_max_pool(x, kernel_size, output_size, random_samples):
    nd = len(output_size)
    return _gather_windows_max(x, _fractional_tables(x, _tuple(kernel_size, nd), output_size, random_samples))


def _avg_divisor(L, O, k, s, p, count_include_pad):
    """torch's per-axis divisor: the window clipped to the padded input, or to the input itself."""
    start = np.arange(O) * s - p
    end = np.minimum(start + k, L + p)
    if count_include_pad:
        return end - start
    return np.maximum(np.minimum(end, L) - np.maximum(start, 0), 1)  # empty windows sum to 0


def _avg_pool(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, nd):
    kernel, stride, padding, _ = _pool_args(x, kernel_size, stride, padding, (1,), nd)
    lead = x.ndim - nd
    pads, outs = _pool_geometry(x.shape[lead:], kernel, stride, padding, (1,) * nd, ceil_mode)
    acc = jnp.promote_types(x.dtype, jnp.float32)  # torch sums low-precision floats in fp32
    total = lax.reduce_window(x.astype(acc), np.array(0, acc), lax.add, (1,) * lead + kernel, (1,) * lead + stride,
                              [(0, 0)] * lead + pads)
    if divisor_override:
        return (total / divisor_override).astype(x.dtype)
    count = np.ones((), np.int64)
    for L, O, k, s, p in zip(x.shape[lead:], outs, kernel, stride, padding):
        count = np.multiply.outer(count, _avg_divisor(L, O, k, s, p, count_include_pad))
    return (total / count.astype(acc)).astype(x.dtype)


@lowering(aten.avg_pool1d.default)
def avg_pool1d(x, kernel_size, stride=(), padding=(0,), ceil_mode=False, count_include_pad=True):
    return _avg_pool(x, kernel_size, stride, padding, ceil_mode, count_include_pad, None, 1)


@lowering(aten.avg_pool2d.default)
def avg_pool2d(x, kernel_size, stride=(), padding=(0,), ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    return _avg_pool(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, 2)


@lowering(aten.avg_pool3d.default)
def avg_pool3d(x, kernel_size, stride=(), padding=(0,), ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    return _avg_pool(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, 3)


def _adaptive_matrix(L: int, out: int, dtype):
    """(out, L) averaging matrix with torch's windows [floor(i*L/out), ceil((i+1)*L/out))."""
    m = np.zeros((out, L), np.float64)
    for i in range(out):
        a, b = (i * L) // out, -(-((i + 1) * L) // out)
        m[i, a:b] = 1.0 / (b - a)
    return jnp.asarray(m, dtype)


def _adaptive_avg(x, output_size):
    nd = len(output_size)
    for i, out in enumerate(output_size):
        axis = x.ndim - nd + i
        L = x.shape[axis]
        if out == L:
            continue
        if L % out == 0:
            shape = x.shape[:axis] + (out, L // out) + x.shape[axis + 1:]
            x = jnp.mean(x.reshape(shape), axis=axis + 1)
        else:
            x = jnp.moveaxis(jnp.tensordot(x, _adaptive_matrix(L, out, x.dtype), axes=[[axis], [1]]), -1, axis)
    return x


@lowering(aten._adaptive_avg_pool2d.default, aten._adaptive_avg_pool3d.default, aten.adaptive_avg_pool1d.default)
def adaptive_avg_pool(x, output_size):
    return _adaptive_avg(x, tuple(output_size))

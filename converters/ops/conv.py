"""Convolution and pooling with torch's NC... layouts passed as dimension numbers (no transposes)."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from converters.ops.common import aten, dot_precision
from converters.registry import lowering

_SPATIAL = "DHW"


def _dimension_numbers(nd: int):
    s = _SPATIAL[-nd:] if nd <= 3 else "".join(chr(ord("a") + i) for i in range(nd))
    return lax.ConvDimensionNumbers(*lax.conv_dimension_numbers(
        (1,) * (nd + 2), (1,) * (nd + 2), ("NC" + s, "OI" + s, "NC" + s)))


def _tuple(v, n):
    return tuple(v) * n if len(v) == 1 else tuple(v)


@lowering(aten.convolution.default)
def convolution(x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
    nd = w.ndim - 2
    stride, padding, dilation = _tuple(stride, nd), _tuple(padding, nd), _tuple(dilation, nd)
    dn = _dimension_numbers(nd)
    with dot_precision(x, w):
        y = _conv(x, w, stride, padding, dilation, transposed, output_padding, groups, dn, nd)
    if bias is not None:
        y = y + bias.reshape((1, -1) + (1,) * nd)
    return y


def _conv(x, w, stride, padding, dilation, transposed, output_padding, groups, dn, nd):
    if not transposed:
        y = lax.conv_general_dilated(x, w, stride, [(p, p) for p in padding], rhs_dilation=dilation,
                                     dimension_numbers=dn, feature_group_count=groups)
    else:
        y = _conv_transpose(x, w, stride, padding, dilation, _tuple(output_padding, nd), groups, dn)
    return y


def _conv_transpose(x, w_IOk, stride, padding, dilation, output_padding, groups, dn):
    """Transposed conv = dilated-input conv with the kernel flipped and (in, out) swapped per group."""
    cin, cout_g = w_IOk.shape[:2]
    k = w_IOk.shape[2:]
    w = w_IOk.reshape((groups, cin // groups, cout_g) + k).swapaxes(1, 2).reshape((groups * cout_g, cin // groups) + k)
    w = jnp.flip(w, axis=tuple(range(2, w.ndim)))
    pads = [(d * (kk - 1) - p, d * (kk - 1) - p + op) for kk, p, d, op in zip(k, padding, dilation, output_padding)]
    return lax.conv_general_dilated(x, w, (1,) * len(k), pads, lhs_dilation=stride, rhs_dilation=dilation,
                                    dimension_numbers=dn, feature_group_count=groups)


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


def _max_pool(x, kernel_size, stride, padding, dilation, ceil_mode, nd):
    kernel, stride, padding, dilation = _pool_args(x, kernel_size, stride, padding, dilation, nd)
    lead = x.ndim - nd
    pads, _ = _pool_geometry(x.shape[lead:], kernel, stride, padding, dilation, ceil_mode)
    init = np.array(-np.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min, x.dtype)  # concrete: keeps max differentiable
    win, strides = (1,) * lead + kernel, (1,) * lead + stride
    full_pads = [(0, 0)] * lead + pads
    dil = (1,) * lead + dilation
    vals = lax.reduce_window(x, init, lax.max, win, strides, full_pads, window_dilation=dil)
    return vals, _window_argmax(lax.stop_gradient(x), init, nd, win, strides, tuple(full_pads), dil)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5, 6))
def _window_argmax(x, init, nd, win, strides, pads, dil):
    """Flat spatial index of each window's max (first occurrence, NaN wins), as torch returns it."""
    lead = x.ndim - nd
    iota = jnp.broadcast_to(jnp.arange(math.prod(x.shape[lead:]), dtype=jnp.int32).reshape(x.shape[lead:]), x.shape)

    def pick(a, b):
        (va, ia), (vb, ib) = a, b
        take_b = (vb > va) | ((vb == va) & (ib < ia)) | (jnp.isnan(vb) & ~jnp.isnan(va))
        return jnp.where(take_b, vb, va), jnp.where(take_b, ib, ia)

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


def _avg_pool(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, nd):
    kernel, stride, padding, _ = _pool_args(x, kernel_size, stride, padding, (1,), nd)
    lead = x.ndim - nd
    pads, _ = _pool_geometry(x.shape[lead:], kernel, stride, padding, (1,) * nd, ceil_mode)
    win, strides, full_pads = (1,) * lead + kernel, (1,) * lead + stride, [(0, 0)] * lead + pads
    total = lax.reduce_window(x, np.array(0, x.dtype), lax.add, win, strides, full_pads)
    if divisor_override:
        return total / divisor_override
    if count_include_pad:  # torch counts the symmetric padding, not the extra ceil_mode overhang
        ones = jnp.pad(jnp.ones(x.shape[lead:], x.dtype), [(p, p) for p in padding])
        count = lax.reduce_window(ones, np.array(0, x.dtype), lax.add, kernel, stride,
                                  [(0, hi - lo) for lo, hi in pads])
    else:
        count = lax.reduce_window(jnp.ones(x.shape[lead:], x.dtype), np.array(0, x.dtype), lax.add,
                                  kernel, stride, pads)
    return total / count


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

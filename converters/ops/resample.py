"""Resampling: padding modes, upsampling/interpolation, grid sampling, im2col/col2im.

Upsampling is separable: per spatial axis a static (out, taps) table of source indices and weights, computed
in numpy with torch's CPU formulas in its opmath precision, applied as one gather and a weighted sum.
"""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from converters.ops.common import aten
from converters.registry import lowering


# ------------------------------------------------------------------------------------------ padding
def _pad(x, pad, mode):
    """torch's pad list (last dim first, (low, high) pairs): negative entries crop, the rest pad in `mode`."""
    nd = len(pad) // 2
    lead = x.ndim - nd
    pairs = [(pad[2 * (nd - 1 - i)], pad[2 * (nd - 1 - i) + 1]) for i in range(nd)]
    x = x[(slice(None),) * lead + tuple(slice(max(-lo, 0), x.shape[lead + i] - max(-hi, 0))
                                       for i, (lo, hi) in enumerate(pairs))]
    return jnp.pad(x, [(0, 0)] * lead + [(max(lo, 0), max(hi, 0)) for lo, hi in pairs], mode=mode)


@lowering(aten.reflection_pad1d.default, aten.reflection_pad2d.default, aten.reflection_pad3d.default)
def reflection_pad(x, padding):
    return _pad(x, padding, "reflect")


@lowering(aten.replication_pad1d.default, aten.replication_pad2d.default, aten.replication_pad3d.default)
def replication_pad(x, padding):
    """out[j] = x[clip(j - low, 0, L - 1)] per axis: negative pads crop, yet the edge stays the input's."""
    nd = len(padding) // 2
    for i in range(nd):
        axis, lo, hi = x.ndim - 1 - i, padding[2 * i], padding[2 * i + 1]
        L = x.shape[axis]
        x = jnp.take(x, np.clip(np.arange(L + lo + hi) - lo, 0, L - 1), axis=axis)
    return x


@lowering(aten._pad_circular.default)
def pad_circular(x, pad):
    return _pad(x, pad, "wrap")


# ------------------------------------------------------------------------------------- upsampling
def _opmath(x):
    return np.float64 if x.dtype == jnp.float64 else np.float32


def _scale(L, O, align_corners, scale, ft):
    """area_pixel_compute_scale: input step per output step (1/scale_factor when one was given)."""
    if align_corners:
        return ft((L - 1) / (O - 1)) if O > 1 else ft(0)
    return ft(1.0 / scale) if scale is not None and scale > 0 else ft(L) / ft(O)


def _source(s, O, align_corners, ft, clamp=True):
    """area_pixel_compute_source_index for every output index (clamped at 0 unless cubic)."""
    i = np.arange(O, dtype=ft)
    if align_corners:
        return s * i
    src = s * (i + ft(0.5)) - ft(0.5)
    return np.maximum(src, ft(0)) if clamp else src


def _nearest_taps(L, O, scale, exact, ft):
    s = _scale(L, O, False, scale, ft)
    src = _source(s, O, False, ft) + ft(0.5) if exact else s * np.arange(O, dtype=ft)
    return np.minimum(np.floor(src).astype(np.int64), L - 1)[:, None], None


def _linear_taps(L, O, align_corners, scale, ft):
    if O == L and not align_corners:
        return np.arange(O)[:, None], None
    src = _source(_scale(L, O, align_corners, scale, ft), O, align_corners, ft)
    i0 = np.minimum(np.floor(src).astype(np.int64), L - 1)
    lam = np.clip(src - i0.astype(ft), 0, 1).astype(ft)
    return np.stack([i0, i0 + (i0 < L - 1)], 1), np.stack([ft(1) - lam, lam], 1)


def _cubic(t, A):
    """Cubic convolution kernel at distances |t| (torch's cubic_convolution1/2)."""
    t = np.abs(t)
    near = ((A + 2) * t - (A + 3)) * t * t + 1
    far = ((A * t - 5 * A) * t + 8 * A) * t - 4 * A
    return np.where(t < 1, near, np.where(t < 2, far, 0)).astype(t.dtype)


def _cubic_taps(L, O, align_corners, scale, ft):
    src = _source(_scale(L, O, align_corners, scale, ft), O, align_corners, ft, clamp=False)
    i0 = np.minimum(np.floor(src).astype(np.int64), L - 1)
    t = np.clip(src - i0.astype(ft), 0, 1).astype(ft)
    offs = np.arange(-1, 3)
    w = _cubic(t[:, None] - offs.astype(ft), ft(-0.75))
    return np.clip(i0[:, None] + offs, 0, L - 1), w


def _aa_taps(L, O, align_corners, scale, ft, cubic):
    """Antialiased (PIL-style) taps: a filter stretched by the downscale factor, normalized per output."""
    s = _scale(L, O, align_corners, scale, ft)
    half = 2.0 if cubic else 1.0
    support = half * s if s >= 1 else half
    K = int(math.ceil(support)) * 2 + 1
    inv = 1.0 / s if s >= 1 else 1.0
    idx, w = np.zeros((O, K), np.int64), np.zeros((O, K), np.float64)
    for i in range(O):
        center = s * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        n = min(max(min(int(center + support + 0.5), L) - lo, 0), K)
        j = np.arange(n)
        x = (j + lo - center + 0.5) * inv
        f = _cubic(x, -0.5) if cubic else np.maximum(1 - np.abs(x), 0)
        idx[i, :n], idx[i, n:] = lo + j, lo
        w[i, :n] = f / f.sum() if f.sum() != 0 else f
    return idx, w.astype(ft)


def _resample(x, out_size, taps):
    """Apply per-axis (indices (O, K), weights (O, K) or None) tables to the trailing spatial axes."""
    nd = len(out_size)
    ft = _opmath(x)
    floating = jnp.issubdtype(x.dtype, jnp.floating)
    y = x.astype(ft) if floating else x
    for i, O in reversed(list(enumerate(out_size))):  # innermost axis first, as torch sums
        axis = x.ndim - nd + i
        idx, w = taps(x.shape[axis], int(O), i, ft)
        g = jnp.take(y, idx.reshape(-1), axis=axis, mode="clip")
        g = g.reshape(g.shape[:axis] + idx.shape + g.shape[axis + 1:])
        if w is None:
            y = g[(slice(None),) * (axis + 1) + (0,)]
            continue
        y = jnp.sum(g.astype(ft) * w.reshape(w.shape + (1,) * (x.ndim - axis - 1)), axis=axis + 1)
        if not floating:  # integer images (uint8) round and saturate after each pass, as torch's
            y = jnp.clip(jnp.round(y), jnp.iinfo(x.dtype).min, jnp.iinfo(x.dtype).max).astype(x.dtype)
    return y.astype(x.dtype)


def _out_size(x, output_size, scale_factors):
    if output_size is not None:
        return tuple(output_size)
    nd = len(scale_factors)
    return tuple(int(L * s) for L, s in zip(x.shape[-nd:], scale_factors))


def _vec(fn):
    """A `.vec` overload (output_size or scale_factors) in terms of the per-axis-scales body."""
    def lowered(x, output_size, *rest):
        *mid, scale_factors = rest
        size = _out_size(x, output_size, scale_factors)
        return fn(x, size, *mid, *(scale_factors or [None] * len(size)))
    lowered.__name__ = fn.__name__ + "_vec"
    return lowered


def upsample_nearest(x, output_size, *scales):
    return _resample(x, output_size, lambda L, O, i, ft: _nearest_taps(L, O, scales[i] if scales else None, False, ft))


def upsample_nearest_exact(x, output_size, *scales):
    return _resample(x, output_size, lambda L, O, i, ft: _nearest_taps(L, O, scales[i] if scales else None, True, ft))


def upsample_linear(x, output_size, align_corners, *scales):
    return _resample(x, output_size,
                     lambda L, O, i, ft: _linear_taps(L, O, align_corners, scales[i] if scales else None, ft))


def upsample_bicubic(x, output_size, align_corners, *scales):
    return _resample(x, output_size,
                     lambda L, O, i, ft: _cubic_taps(L, O, align_corners, scales[i] if scales else None, ft))


def upsample_bilinear_aa(x, output_size, align_corners, *scales):
    return _resample(x, output_size, lambda L, O, i, ft: _aa_taps(
        L, O, align_corners, scales[i] if scales else None, ft, cubic=False))


def upsample_bicubic_aa(x, output_size, align_corners, *scales):
    return _resample(x, output_size, lambda L, O, i, ft: _aa_taps(
        L, O, align_corners, scales[i] if scales else None, ft, cubic=True))


for _fn, _defaults, _vecs in [
    (upsample_nearest, [aten.upsample_nearest1d.default, aten.upsample_nearest2d.default,
                        aten.upsample_nearest3d.default],
     [aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec]),
    (upsample_nearest_exact, [aten._upsample_nearest_exact1d.default, aten._upsample_nearest_exact2d.default,
                              aten._upsample_nearest_exact3d.default],
     [aten._upsample_nearest_exact1d.vec, aten._upsample_nearest_exact2d.vec, aten._upsample_nearest_exact3d.vec]),
    (upsample_linear, [aten.upsample_linear1d.default, aten.upsample_bilinear2d.default,
                       aten.upsample_trilinear3d.default],
     [aten.upsample_linear1d.vec, aten.upsample_bilinear2d.vec, aten.upsample_trilinear3d.vec]),
    (upsample_bicubic, [aten.upsample_bicubic2d.default], [aten.upsample_bicubic2d.vec]),
    (upsample_bilinear_aa, [aten._upsample_bilinear2d_aa.default], [aten._upsample_bilinear2d_aa.vec]),
    (upsample_bicubic_aa, [aten._upsample_bicubic2d_aa.default], [aten._upsample_bicubic2d_aa.vec]),
]:
    lowering(*_defaults)(_fn)
    lowering(*_vecs)(_vec(_fn))


# ----------------------------------------------------------------------------------- grid sampling
def _unnormalize(c, L, align_corners):
    return (c + 1) * ((L - 1) / 2) if align_corners else (c + 1) * (L / 2) - 0.5


def _clip(c, L):
    """clip to [0, L-1] with torch's gradient (0 at and beyond the bounds)."""
    return jnp.where(c <= 0, 0.0, jnp.where(c >= L - 1, float(L - 1), c)).astype(c.dtype)


def _reflect(c, twice_lo, twice_hi):
    if twice_lo == twice_hi:
        return jnp.zeros_like(c)
    lo, span = twice_lo / 2, (twice_hi - twice_lo) / 2
    c = jnp.abs(c - lo)
    extra, flips = jnp.fmod(c, span), jnp.floor(c / span)
    return jnp.where(flips % 2 == 0, extra + lo, span - extra + lo)


def _pad_coord(c, L, padding, align_corners):
    """grid_sampler's compute_coordinates: 0 zeros (unchanged), 1 border, 2 reflection."""
    if padding == 0:
        return c
    if padding == 2:
        c = _reflect(c, 0, 2 * (L - 1)) if align_corners else _reflect(c, -1, 2 * L - 1)
    return _clip(c, L)


def _axis_taps(c, L, mode, padding, align_corners):
    """Per-axis list of (integer index, weight) taps for one sampling mode."""
    if mode == 1:  # nearest (round half to even, as nearbyint)
        return [(jnp.round(_pad_coord(c, L, padding, align_corners)), None)]
    if mode == 0:
        c = _pad_coord(c, L, padding, align_corners)
        i0 = jnp.floor(c)
        t = c - i0
        return [(i0, 1 - t), (i0 + 1, t)]
    i0 = jnp.floor(c)
    t = c - i0
    A = -0.75
    w = [((A * (t + 1) - 5 * A) * (t + 1) + 8 * A) * (t + 1) - 4 * A,
         ((A + 2) * t - (A + 3)) * t * t + 1,
         ((A + 2) * (1 - t) - (A + 3)) * (1 - t) * (1 - t) + 1,
         ((A * (2 - t) - 5 * A) * (2 - t) + 8 * A) * (2 - t) - 4 * A]
    return [(_pad_coord(i0 + k - 1, L, padding, align_corners), w[k]) for k in range(4)]


def _grid_sample(x, grid, mode, padding, align_corners):
    """x (N, C, *S), grid (N, *O, nd) with the last spatial axis first -> (N, C, *O), as one gather of all taps."""
    nd = grid.shape[-1]
    ft = _opmath(x)
    N, C, sizes = x.shape[0], x.shape[1], x.shape[2:]
    grid = grid.astype(ft)
    axes = [_axis_taps(_unnormalize(grid[..., nd - 1 - d], L, align_corners), L, mode, padding, align_corners)
            for d, L in enumerate(sizes)]
    flat, weight = [], []
    for combo in itertools.product(*axes):
        ok, f, w = True, 0, 1
        for (i, wi), L in zip(combo, sizes):
            ok = ok & (i >= 0) & (i <= L - 1)
            f = f * L + jnp.clip(i, 0, L - 1).astype(jnp.int32)
            w = w if wi is None else w * wi
        flat.append(f)
        weight.append(jnp.where(ok, w, 0).astype(ft))
    x_NSC = x.astype(ft).reshape(N, C, math.prod(sizes)).transpose(0, 2, 1)
    n = jnp.arange(N).reshape((1, N) + (1,) * (grid.ndim - 2))
    taps = x_NSC[n, jnp.stack(flat)]                          # (T, N, *O, C)
    out = jnp.sum(taps * jnp.stack(weight)[..., None], axis=0)
    return jnp.moveaxis(out, -1, 1).astype(x.dtype)


@lowering(aten.grid_sampler_2d.default, aten.grid_sampler_3d.default)
def grid_sampler(x, grid, interpolation_mode, padding_mode, align_corners):
    return _grid_sample(x, grid, interpolation_mode, padding_mode, align_corners)


# ----------------------------------------------------------------------------------- im2col / col2im
def _im2col(x, kernel_size, dilation, padding, stride):
    """(N, C, H, W) -> (N, C*kh*kw, L): sliding patches, channel-major as torch's unfold."""
    y = lax.conv_general_dilated_patches(x, tuple(kernel_size), tuple(stride), [(p, p) for p in padding],
                                         rhs_dilation=tuple(dilation), precision=lax.Precision.HIGHEST)
    return y.reshape(y.shape[:2] + (math.prod(y.shape[2:]),))


@lowering(aten.im2col.default)
def im2col(x, kernel_size, dilation, padding, stride):
    if x.ndim == 3:
        return _im2col(x[None], kernel_size, dilation, padding, stride)[0]
    return _im2col(x, kernel_size, dilation, padding, stride)


@lowering(aten.col2im.default)
def col2im(cols, output_size, kernel_size, dilation, padding, stride):
    """The adjoint of im2col: overlapping patches summed back into (N, C, *output_size)."""
    batched = cols.ndim == 3
    cols = cols if batched else cols[None]
    c = cols.shape[1] // math.prod(kernel_size)
    img = jax.ShapeDtypeStruct((cols.shape[0], c) + tuple(output_size), cols.dtype)
    (x,) = jax.linear_transpose(lambda a: _im2col(a, kernel_size, dilation, padding, stride), img)(cols)
    return x if batched else x[0]

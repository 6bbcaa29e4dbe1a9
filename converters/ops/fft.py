"""Fourier transforms (torch.fft → jnp.fft), complex views and conjugation, Tensor.unfold.

torch.fft lowers to three primitives: `_fft_r2c` (real → complex, forward), `_fft_c2c` and `_fft_c2r`
(complex → real, inverse). Their `normalization` int scales by 1 (0), 1/sqrt(n) (1) or 1/n (2)
whatever the direction, so it maps to jnp's `norm` per direction. JAX differentiates all of them
(the onesided transforms' transposes double the non-DC/Nyquist bins as torch's backward does).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from converters.ops.common import aten, dim_
from converters.registry import lowering

_FORWARD_NORM = ("backward", "ortho", "forward")   # jnp norm whose forward transform scales like torch's mode
_INVERSE_NORM = ("forward", "ortho", "backward")   # same for the inverse transform


def _axes(dim, ndim) -> tuple[int, ...]:
    return tuple(dim_(d, ndim) for d in dim)


def _complex(x):
    return x if jnp.iscomplexobj(x) else x.astype(jnp.result_type(x.dtype, jnp.complex64))


@lowering(aten._fft_r2c.default)
def fft_r2c(x, dim, normalization, onesided):
    axes, norm = _axes(dim, x.ndim), _FORWARD_NORM[normalization]
    if not axes:
        return _complex(x)
    if onesided:
        return jnp.fft.rfftn(x, axes=axes, norm=norm)
    return jnp.fft.fftn(_complex(x), axes=axes, norm=norm)


@lowering(aten._fft_c2c.default)
def fft_c2c(x, dim, normalization, forward):
    axes = _axes(dim, x.ndim)
    if not axes:
        return x
    if forward:
        return jnp.fft.fftn(x, axes=axes, norm=_FORWARD_NORM[normalization])
    return jnp.fft.ifftn(x, axes=axes, norm=_INVERSE_NORM[normalization])


@lowering(aten._fft_c2r.default)
def fft_c2r(x, dim, normalization, last_dim_size):
    axes = _axes(dim, x.ndim)
    s = [x.shape[a] for a in axes[:-1]] + [int(last_dim_size)]
    return jnp.fft.irfftn(x, s=s, axes=axes, norm=_INVERSE_NORM[normalization])


# ------------------------------------------------------------------------------ complex views
@lowering(aten._conj.default, aten._conj_physical.default, aten._conj_copy.default)
def conj(x):
    return jnp.conj(x)


@lowering(aten.view_as_real.default, aten.view_as_real_copy.default)
def view_as_real(z):
    return jnp.stack([jnp.real(z), jnp.imag(z)], axis=-1)


@lowering(aten.view_as_complex.default, aten.view_as_complex_copy.default)
def view_as_complex(x_2):
    return lax.complex(x_2[..., 0], x_2[..., 1])


@lowering(aten.complex.default)
def complex_(re, im):
    return lax.complex(*jnp.broadcast_arrays(re, im))


@lowering(aten.polar.default)
def polar(r, theta):
    r, theta = jnp.broadcast_arrays(r, theta)
    return lax.complex(r * jnp.cos(theta), r * jnp.sin(theta))


# ------------------------------------------------------------------------------------- unfold
@lowering(aten.unfold.default, aten.unfold_copy.default)
def unfold(x, dimension, size, step):
    """Sliding windows of `size` every `step` along `dimension`, appended as a new last axis.

    Built from ceil(size/step) contiguous slices of the dim reshaped to rows of `step` (no gather):
    window i is rows i .. i+m-1 concatenated, cut to `size`.
    """
    if x.ndim == 0:
        return x.reshape(1)[:size]
    d = dim_(dimension, x.ndim)
    n = x.shape[d]
    nwin = (n - size) // step + 1
    if size == 0:
        return jnp.zeros(x.shape[:d] + (nwin,) + x.shape[d + 1:] + (0,), x.dtype)
    m = math.ceil(size / step)
    rows = nwin + m - 1
    x = jnp.moveaxis(x, d, -1)
    if rows * step > n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, rows * step - n)])
    x_RS = x[..., :rows * step].reshape(x.shape[:-1] + (rows, step))
    win_WM = jnp.concatenate([x_RS[..., j:j + nwin, :] for j in range(m)], axis=-1)[..., :size]
    return jnp.moveaxis(win_WM, -2, d)

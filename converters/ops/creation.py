"""Tensor factories: arange, full, *_like, empty, scalar_tensor, eye, linspace, window functions."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from converters.ops.common import aten, default_float, dt, size_
from converters.dtypes import jax_dtype
from converters.registry import lowering


def _infer(value, dtype):
    """torch's default dtype for a factory filled with `value`."""
    if dtype is not None:
        return dt(dtype)
    if isinstance(value, bool):
        return jnp.bool_
    if isinstance(value, int):
        return jax_dtype(torch.int64)
    if hasattr(value, "dtype"):
        return value.dtype
    return default_float()


@lowering(aten.arange.default, aten.arange.start, aten.arange.start_step)
def arange(*args, dtype=None, layout=None, device=None, pin_memory=None):
    if len(args) == 1:
        args = (0,) + args
    values = list(args) + [1] * (3 - len(args))
    if dtype is None:
        dtype = torch.int64 if all(isinstance(a, int) for a in values) else torch.get_default_dtype()
    return jnp.arange(*values, dtype=dt(dtype))


@lowering(aten.full.default)
def full(size, fill_value, *, dtype=None, layout=None, device=None, pin_memory=None):
    return jnp.full(size_(size), fill_value, dtype=_infer(fill_value, dtype))


@lowering(aten.full_like.default)
def full_like(x, fill_value, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return jnp.full(x.shape, fill_value, dtype=dt(dtype, x.dtype))


@lowering(aten.zeros_like.default, aten.empty_like.default)
def zeros_like(x, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return jnp.zeros(x.shape, dtype=dt(dtype, x.dtype))


@lowering(aten.ones_like.default)
def ones_like(x, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return jnp.ones(x.shape, dtype=dt(dtype, x.dtype))


@lowering(aten.zeros.default, aten.empty.memory_format)
def zeros(size, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return jnp.zeros(size_(size), dtype=dt(dtype, default_float()))


@lowering(aten.ones.default)
def ones(size, *, dtype=None, layout=None, device=None, pin_memory=None):
    return jnp.ones(size_(size), dtype=dt(dtype, default_float()))


@lowering(aten.empty_strided.default)
def empty_strided(size, stride, *, dtype=None, layout=None, device=None, pin_memory=None):
    return jnp.zeros(size_(size), dtype=dt(dtype, default_float()))


@lowering(aten.empty_permuted.default)
def empty_permuted(size, physical_layout, *, dtype=None, layout=None, device=None, pin_memory=None):
    return jnp.zeros(size_(size), dtype=dt(dtype, default_float()))   # memory layout is XLA's concern


@lowering(aten.new_zeros.default, aten.new_empty.default)
def new_zeros(x, size, *, dtype=None, layout=None, device=None, pin_memory=None):
    return jnp.zeros(size_(size), dtype=dt(dtype, x.dtype))


@lowering(aten.new_empty_strided.default)
def new_empty_strided(x, size, stride, *, dtype=None, layout=None, device=None, pin_memory=None):
    return jnp.zeros(size_(size), dtype=dt(dtype, x.dtype))


@lowering(aten.new_ones.default)
def new_ones(x, size, *, dtype=None, layout=None, device=None, pin_memory=None):
    return jnp.ones(size_(size), dtype=dt(dtype, x.dtype))


@lowering(aten.new_full.default)
def new_full(x, size, fill_value, *, dtype=None, layout=None, device=None, pin_memory=None):
    return jnp.full(size_(size), fill_value, dtype=dt(dtype, x.dtype))


@lowering(aten.scalar_tensor.default)
def scalar_tensor(s, *, dtype=None, layout=None, device=None, pin_memory=None):
    return jnp.asarray(s, dtype=dt(dtype, default_float()))


@lowering(aten.eye.default, aten.eye.m)
def eye(n, m=None, *, dtype=None, layout=None, device=None, pin_memory=None):
    return jnp.eye(n, m, dtype=dt(dtype, default_float()))


@lowering(aten.linspace.default)
def linspace(start, end, steps, *, dtype=None, layout=None, device=None, pin_memory=None):
    """bf16/fp16 in fp32, rounded once (as torch's CPU kernel does, up to its SIMD chunking)."""
    dtype = dt(dtype, default_float())
    wide = jnp.float32 if dtype in (jnp.bfloat16, jnp.float16) else dtype
    return jnp.linspace(start, end, steps, dtype=wide).astype(dtype)


@lowering(aten.fill.Scalar, aten.fill.Tensor)
def fill(x, value):
    return jnp.full(x.shape, value, dtype=x.dtype)


@lowering(aten.logspace.default, aten.logspace.Tensor_Tensor, aten.logspace.Tensor_Scalar, aten.logspace.Scalar_Tensor)
def logspace(start, end, steps, base=10.0, *, dtype=None, layout=None, device=None, pin_memory=None):
    """torch's kernel: start/end rounded to the output dtype, exponents and powers in double, rounded once."""
    dtype = dt(dtype, default_float())
    wide = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    lo, hi = (lax.convert_element_type(jnp.asarray(v, wide), dtype).astype(wide) for v in (start, end))
    step = (hi - lo) / max(steps - 1, 1)
    i = jnp.arange(steps, dtype=wide)
    exps = jnp.where(i < steps // 2, lo + step * i, hi - step * (steps - 1 - i))
    if steps == 1:   # torch fills with base ** start, start not rounded
        exps = jnp.full((1,), start, wide)
    return jnp.power(jnp.asarray(base, wide), exps).astype(dtype)


def _window(symmetric):
    """A window function of static length: torch's periodic window (the default) is the symmetric one of
    length + 1 without its last point. Computed in float64 at trace time, then cast."""
    def lower(window_length, periodic=True, *params, dtype=None, layout=None, device=None, pin_memory=None):
        n = int(window_length)
        w = np.ones(n) if n <= 1 else symmetric(n + 1, *params)[:-1] if periodic else symmetric(n, *params)
        return jnp.asarray(w, dt(dtype, default_float()))
    return lower


def _cosine_sum(*coeffs):
    return lambda n: sum((-1) ** k * c * np.cos(2 * np.pi * k * np.arange(n) / (n - 1)) for k, c in enumerate(coeffs))


_WINDOWS = {
    "hamming_window": lambda n, alpha=0.54, beta=0.46: _cosine_sum(alpha, beta)(n),
    "blackman_window": _cosine_sum(0.42, 0.5, 0.08),
    "bartlett_window": lambda n: 1 - np.abs(2 * np.arange(n) / (n - 1) - 1),
    "kaiser_window": lambda n, beta=12.0: np.kaiser(n, beta),
}
for _name, _symmetric in _WINDOWS.items():
    _packet = getattr(aten, _name)
    lowering(*(getattr(_packet, o) for o in _packet.overloads() if "out" not in o))(_window(_symmetric))

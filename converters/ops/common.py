"""Helpers shared by the op families: ATen overload handles, dims, dtypes, scalars."""
from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import jax

import jax.numpy as jnp
import torch

from converters.dtypes import jax_dtype

aten = torch.ops.aten


def dim_(d: int, ndim: int) -> int:
    """Normalize a possibly negative dim (torch allows dim 0/-1 on 0-d tensors)."""
    n = max(ndim, 1)
    return d % n


def scalar_dims(fn):
    """For lowerings taking (x, dim...): torch accepts dim 0/-1 on a 0-d `x`, JAX does not. A 0-d `x` runs
    as shape (1,) and every array result comes back 0-d (what torch returns for 0-d inputs)."""

    @functools.wraps(fn)
    def wrapped(x, *args, **kwargs):
        if getattr(x, "ndim", None) != 0:
            return fn(x, *args, **kwargs)
        return jax.tree.map(lambda o: o.reshape(()) if hasattr(o, "reshape") else o, fn(x.reshape(1), *args, **kwargs))

    return wrapped


def dims_(dims, ndim: int) -> tuple[int, ...] | None:
    """Normalize an int / list of dims; None or [] (reduce all) → None."""
    if dims is None:
        return None
    if isinstance(dims, int):
        dims = [dims]
    if len(dims) == 0:
        return None
    return tuple(sorted({dim_(d, ndim) for d in dims}))


def dt(dtype: torch.dtype | None, default=None):
    """torch dtype kwarg → JAX dtype (None stays None unless a default is given)."""
    if dtype is None:
        return default
    return jax_dtype(dtype) if isinstance(dtype, torch.dtype) else dtype


def default_float():
    return jax_dtype(torch.get_default_dtype())


def as_array(x, like=None):
    """Python scalars → arrays with torch's default dtypes (float32 / int64 / bool)."""
    if hasattr(x, "dtype"):
        return x
    if isinstance(x, bool):
        return jnp.asarray(x, dtype=jnp.bool_)
    if isinstance(x, int):
        return jnp.asarray(x, dtype=jax_dtype(torch.int64))
    if isinstance(x, complex):
        return jnp.asarray(x, dtype=jnp.complex64)
    return jnp.asarray(x, dtype=default_float())


def astype(x, dtype):
    """`x.astype(dtype)` as torch's CPU kernels cast: a real float to an integer narrower than 32 bits goes
    through int64 and wraps (-1.5 -> 255 as uint8), where XLA's direct conversion would saturate.

    Example:
        >>> astype(jnp.array([-1.5, 300.2]), jnp.uint8)   # [255, 44], as torch
    """
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(dtype, jnp.integer) and dtype.itemsize < 4:
        x = x.astype(jax.dtypes.canonicalize_dtype(jnp.int64))
    return x.astype(dtype)


def opmath(*xs):
    """bf16/fp16 arrays as fp32: torch's CPU kernels compute these in fp32 and round once at the end."""
    return tuple(x.astype(jnp.float32) if getattr(x, "dtype", None) in (jnp.bfloat16, jnp.float16) else x for x in xs)


def size_(shape: Sequence) -> tuple[int, ...]:
    return tuple(int(s) for s in shape)


def dot_precision(*arrays):
    """Context for dots/convs: fp16 has no 'highest' precision on CPU; its default already accumulates in fp32."""
    if any(getattr(a, "dtype", None) == jnp.float16 for a in arrays):
        return jax.default_matmul_precision("default")
    return contextlib.nullcontext()

"""Random ops. Each node draws from `fold_in(rng, node_index)`: same key, same numbers."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from converters.ops.common import aten, default_float, dt, size_
from converters.registry import lowering


def _dropout_active(node) -> bool:
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return bool(p) and train is not False


def _dropout(key, x, p):
    if key is None:
        return x, jnp.ones(x.shape, jnp.bool_)
    if p >= 1:
        return jnp.zeros_like(x), jnp.zeros(x.shape, jnp.bool_)
    keep = jax.random.bernoulli(key, 1 - p, x.shape)
    return jnp.where(keep, x / (1 - p), jnp.zeros((), x.dtype)).astype(x.dtype), keep


@lowering(aten.native_dropout.default, random=_dropout_active)
def native_dropout(key, x, p, train):
    return _dropout(key, x, p)


@lowering(aten.dropout.default, random=_dropout_active)
def dropout(key, x, p, train):
    return _dropout(key, x, p)[0]


@lowering(aten.rand.default, random=True)
def rand(key, size, *, dtype=None, layout=None, device=None, pin_memory=None, generator=None):
    return jax.random.uniform(key, size_(size), dt(dtype, default_float()))


@lowering(aten.randn.default, random=True)
def randn(key, size, *, dtype=None, layout=None, device=None, pin_memory=None, generator=None):
    return jax.random.normal(key, size_(size), dt(dtype, default_float()))


@lowering(aten.rand_like.default, random=True)
def rand_like(key, x, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return jax.random.uniform(key, x.shape, dt(dtype, x.dtype))


@lowering(aten.randn_like.default, random=True)
def randn_like(key, x, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return jax.random.normal(key, x.shape, dt(dtype, x.dtype))


@lowering(aten.bernoulli.default, random=True)
def bernoulli(key, p, *, generator=None):
    return jax.random.bernoulli(key, p).astype(p.dtype)


@lowering(aten.bernoulli.p, random=True)
def bernoulli_p(key, x, p=0.5, *, generator=None):
    return jax.random.bernoulli(key, p, x.shape).astype(x.dtype)


@lowering(aten.randint.low, random=True)
def randint_low(key, low, high, size, *, dtype=None, layout=None, device=None, pin_memory=None, generator=None):
    return jax.random.randint(key, size_(size), low, high, dtype=dt(dtype, jnp.int32))


@lowering(aten.randint.default, random=True)
def randint(key, high, size, *, dtype=None, layout=None, device=None, pin_memory=None, generator=None):
    return jax.random.randint(key, size_(size), 0, high, dtype=dt(dtype, jnp.int32))


@lowering(aten.randperm.default, random=True)
def randperm(key, n, *, dtype=None, layout=None, device=None, pin_memory=None, generator=None):
    return jax.random.permutation(key, n).astype(dt(dtype, jnp.int32))

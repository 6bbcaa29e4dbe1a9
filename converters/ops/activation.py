"""Activation functions, kept whole so JAX sees its own primitives (gelu, silu, ...)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from converters.ops.common import aten
from converters.registry import lowering


@lowering(aten.relu.default)
def relu(x):
    return jax.nn.relu(x)


@lowering(aten.gelu.default)
def gelu(x, approximate="none"):
    return jax.nn.gelu(x, approximate=approximate == "tanh")


@lowering(aten.silu.default)
def silu(x):
    return jax.nn.silu(x)


@lowering(aten.sigmoid.default)
def sigmoid(x):
    return jax.nn.sigmoid(x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.float32))


@lowering(aten.hardtanh.default)
def hardtanh(x, min_val=-1.0, max_val=1.0):
    """Gradient 1 strictly inside (min_val, max_val) and 0 at the bounds, as torch's (jnp.clip gives 0.5 there)."""
    return jnp.where(x <= min_val, min_val, jnp.where(x >= max_val, max_val, x))


@lowering(aten.leaky_relu.default)
def leaky_relu(x, negative_slope=0.01):
    return jnp.where(x > 0, x, x * negative_slope)


@lowering(aten.elu.default)
def elu(x, alpha=1.0, scale=1.0, input_scale=1.0):
    return scale * jnp.where(x > 0, x, alpha * jnp.expm1(x * input_scale))


@lowering(aten.softplus.default)
def softplus(x, beta=1.0, threshold=20.0):
    return jnp.where(x * beta > threshold, x, jnp.log1p(jnp.exp(x * beta)) / beta)


@lowering(aten.hardswish.default)
def hardswish(x):
    """torch's gradient at the kinks: 0 at x = -3, 1 at x = 3."""
    return jnp.where(x <= -3, jnp.zeros((), x.dtype), jnp.where(x < 3, x * (x + 3) / 6, x))


@lowering(aten.hardsigmoid.default)
def hardsigmoid(x):
    """torch's gradient: 1/6 strictly inside (-3, 3), 0 at the kinks."""
    return jnp.where(x <= -3, jnp.zeros((), x.dtype), jnp.where(x >= 3, jnp.ones((), x.dtype), (x + 3) / 6))


@lowering(aten.mish.default)
def mish(x):
    return x * jnp.tanh(jax.nn.softplus(x))


@lowering(aten.glu.default)
def glu(x, dim=-1):
    a, b = jnp.split(x, 2, axis=dim)
    return a * jax.nn.sigmoid(b)


@lowering(aten.logit.default)
def logit(x, eps=None):
    if eps is not None:
        x = jnp.clip(x, eps, 1 - eps)
    return jnp.log(x / (1 - x))


@lowering(aten._prelu_kernel.default)
def prelu(x, weight):
    return jnp.where(x > 0, x, weight * x)


@lowering(aten.threshold.default)
def threshold(x, threshold, value):
    return jnp.where(x <= threshold, value, x)   # NaN stays NaN, as torch

"""Integer and floating-point bit ops: gcd, lcm, frexp, ldexp, logcumsumexp."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from converters.ops.common import aten, as_array, dim_
from converters.ops.special import _floats
from converters.registry import lowering


# ------------------------------------------------------------------------------ integer / float bits
@lowering(aten.gcd.default)
def gcd(a, b):
    return jnp.gcd(a, b)


@lowering(aten.lcm.default)
def lcm(a, b):
    g = jnp.gcd(a, b)
    return jnp.where(g == 0, 0, jnp.abs(a // jnp.where(g == 0, 1, g) * b))


@jax.custom_jvp
def _frexp(x):
    """jnp.frexp, with subnormals decomposed on the bits (XLA's CPU arithmetic flushes them to zero)."""
    mantissa, exponent = jnp.frexp(x)
    info = jnp.finfo(x.dtype)
    itype = jnp.int64 if info.bits == 64 else jnp.int32
    u = lax.bitcast_convert_type(x, itype)
    mag = u & ((1 << (info.bits - 1)) - 1)
    lead = (info.bits - 1) - lax.clz(mag)                      # position of the leading 1 of a subnormal
    frac = jnp.left_shift(mag, jnp.maximum(info.nmant - lead, 0)) & ((1 << info.nmant) - 1)
    bits = (u - mag) | ((-info.minexp) << info.nmant) | frac      # sign | exponent of [0.5, 1) | fraction
    sub = (mag != 0) & ((mag >> info.nmant) == 0)
    return (jnp.where(sub, lax.bitcast_convert_type(bits, x.dtype), mantissa),
            jnp.where(sub, lead + info.minexp - info.nmant + 1, exponent).astype(jnp.int32))


@_frexp.defjvp
def _frexp_jvp(primals, tangents):
    mantissa, exponent = _frexp(primals[0])
    return (mantissa, exponent), (tangents[0] * jnp.exp2(-exponent.astype(mantissa.dtype)),
                                  jnp.zeros(exponent.shape, jax.dtypes.float0))


@lowering(aten.frexp.Tensor)
def frexp(x):
    mantissa, exponent = _frexp(_floats(x))
    return mantissa, exponent.astype(jnp.int32)


@lowering(aten.ldexp.Tensor)
def ldexp(x, other):
    x, other = as_array(x), as_array(other)
    return x * jnp.power(2.0, other.astype(jnp.result_type(x.dtype, jnp.float32)))


@lowering(aten.logcumsumexp.default)
def logcumsumexp(x, dim):
    x1 = jnp.atleast_1d(x)
    return lax.cumlogsumexp(x1, axis=dim_(dim, x.ndim)).reshape(x.shape)

"""Pointwise math: unary functions, arithmetic, comparisons, logic, where/clamp.

Output dtypes follow torch through the interpreter's per-node cast, so bodies stay one line.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from converters.ops import special   # torch's digamma/i0 gradients
from converters.ops.common import aten, as_array, default_float, opmath
from converters.registry import lowering


def _float(x):
    x = as_array(x)
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(default_float())


def _sign(x):
    """torch's sign of NaN is 0 ((0 < x) - (x < 0)); jnp.sign gives NaN. Complex sgn keeps x / |x|."""
    return jnp.where(jnp.isnan(x), 0, jnp.sign(x)).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) \
        else jnp.sign(x)


@jax.custom_jvp
def _abs(x):
    return jnp.abs(x)


@_abs.defjvp
def _abs_jvp(primals, tangents):
    """torch's derivative sgn(x): 0 at 0 (JAX's is 1 there), so an L1 term at an exact match adds nothing."""
    (x,), (dx,) = primals, tangents
    return jnp.abs(x), jnp.sign(x) * dx


_UNARY = {
    "abs": lambda x: _abs(x) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.abs(x), "neg": jnp.negative,
    "exp": lambda x: jnp.exp(_float(x)), "exp2": lambda x: jnp.exp2(_float(x)),
    "expm1": lambda x: jnp.expm1(_float(x)), "log": lambda x: jnp.log(_float(x)),
    "log2": lambda x: jnp.log2(_float(x)), "log10": lambda x: jnp.log10(_float(x)),
    "log1p": lambda x: jnp.log1p(_float(x)), "sqrt": lambda x: jnp.sqrt(_float(x)),
    "rsqrt": lambda x: lax.rsqrt(_float(x)), "sin": lambda x: jnp.sin(_float(x)),
    "cos": lambda x: jnp.cos(_float(x)), "tan": lambda x: jnp.tan(_float(x)),
    "asin": lambda x: jnp.arcsin(_float(x)), "acos": lambda x: jnp.arccos(_float(x)),
    "atan": lambda x: jnp.arctan(_float(x)), "sinh": lambda x: jnp.sinh(_float(x)),
    "cosh": lambda x: jnp.cosh(_float(x)), "tanh": lambda x: jnp.tanh(_float(x)),
    "asinh": lambda x: jnp.arcsinh(_float(x)), "acosh": lambda x: jnp.arccosh(_float(x)),
    "atanh": lambda x: jnp.arctanh(_float(x)), "erf": lambda x: jax.scipy.special.erf(_float(x)),
    "erfc": lambda x: jax.scipy.special.erfc(_float(x)), "erfinv": lambda x: jax.scipy.special.erfinv(_float(x)),
    "lgamma": lambda x: jax.scipy.special.gammaln(_float(x)), "digamma": lambda x: special.digamma(_float(x)),
    "ceil": jnp.ceil, "floor": jnp.floor, "trunc": jnp.trunc, "round": jnp.round, "frac": lambda x: x - jnp.trunc(x),
    "sign": _sign, "sgn": _sign, "reciprocal": lambda x: 1 / _float(x), "signbit": jnp.signbit,
    "isnan": jnp.isnan, "isinf": jnp.isinf, "isfinite": jnp.isfinite, "isneginf": jnp.isneginf,
    "isposinf": jnp.isposinf, "logical_not": jnp.logical_not, "bitwise_not": jnp.invert,
    "real": jnp.real, "imag": jnp.imag, "conj_physical": jnp.conj, "angle": jnp.angle,
    "i0": lambda x: special.i0(_float(x)), "sinc": lambda x: jnp.sinc(_float(x)),
    "deg2rad": lambda x: jnp.deg2rad(_float(x)), "rad2deg": lambda x: jnp.rad2deg(_float(x)),
    "square": lambda x: x * x,
}
for _name, _fn in _UNARY.items():
    _packet = getattr(aten, _name, None)
    if _packet is not None and "default" in _packet.overloads():
        lowering(_packet.default)(lambda x, _fn=_fn: _fn(x))


@lowering(aten.round.decimals)
def round_decimals(x, *, decimals=0):
    return jnp.round(x, decimals)


@lowering(aten.nan_to_num.default)
def nan_to_num(x, nan=0.0, posinf=None, neginf=None):
    return jnp.nan_to_num(x, nan=0.0 if nan is None else nan, posinf=posinf, neginf=neginf)


def _int_div(a, b, mode):
    a, b = as_array(a), as_array(b)
    if mode is None:
        return jnp.true_divide(_float(a), b) if not jnp.issubdtype(b.dtype, jnp.inexact) else jnp.true_divide(a, b)
    if jnp.issubdtype(jnp.result_type(a, b), jnp.integer):
        return lax.div(*jnp.broadcast_arrays(*_promote(a, b))) if mode == "trunc" else jnp.floor_divide(a, b)
    q = jnp.true_divide(a, b)
    return jnp.trunc(q) if mode == "trunc" else jnp.floor_divide(a, b)


def _promote(a, b):
    t = jnp.result_type(a, b)
    return jnp.asarray(a, t), jnp.asarray(b, t)


def _pow(a, b):
    """Integer-valued scalar exponents use exact repeated multiplication, as torch does."""
    if isinstance(b, float) and b.is_integer() and abs(b) <= 8:
        return jnp.power(_float(a), int(b))
    return jnp.power(a, b)


@jax.custom_jvp
def _nextafter(a, b):
    return jnp.nextafter(a, b)


@_nextafter.defjvp
def _nextafter_jvp(primals, tangents):
    """torch's convention: d/da = 1, d/db = 0 (JAX has no rule)."""
    out = _nextafter(*primals)
    return out, jnp.broadcast_to(tangents[0], out.shape).astype(out.dtype)


_BINARY = {
    "mul": jnp.multiply, "div": lambda a, b: _int_div(a, b, None), "true_divide": lambda a, b: _int_div(a, b, None),
    "maximum": jnp.maximum, "minimum": jnp.minimum,
    # NaN-ignoring; a tie's gradient all to `a`, as torch's backward
    "fmax": lambda a, b: jnp.where((a >= b) | jnp.isnan(b), a, b),
    "fmin": lambda a, b: jnp.where((a <= b) | jnp.isnan(b), a, b),
    "atan2": lambda a, b: jnp.arctan2(_float(a), b), "hypot": jnp.hypot, "copysign": lambda a, b: jnp.copysign(_float(a), b),
    "nextafter": _nextafter, "logaddexp": jnp.logaddexp, "logaddexp2": jnp.logaddexp2,
    "remainder": jnp.remainder, "fmod": jnp.fmod, "floor_divide": lambda a, b: _int_div(a, b, "floor"),
    "pow": lambda a, b: _pow(a, b),
    "eq": jnp.equal, "ne": jnp.not_equal, "lt": jnp.less, "le": jnp.less_equal, "gt": jnp.greater,
    "ge": jnp.greater_equal, "bitwise_and": jnp.bitwise_and, "bitwise_or": jnp.bitwise_or,
    "bitwise_xor": jnp.bitwise_xor, "logical_and": jnp.logical_and, "logical_or": jnp.logical_or,
    "logical_xor": jnp.logical_xor, "bitwise_left_shift": jnp.left_shift, "bitwise_right_shift": jnp.right_shift,
    # `a << b`, `a & b` on tensors: torch.export records the operator overloads themselves
    "__lshift__": jnp.left_shift, "__rshift__": jnp.right_shift, "__and__": jnp.bitwise_and,
    "__or__": jnp.bitwise_or, "__xor__": jnp.bitwise_xor,
    "xlogy": lambda a, b: jax.scipy.special.xlogy(_float(a), _float(b)), "igamma": jax.scipy.special.gammainc,
    "igammac": jax.scipy.special.gammaincc, "heaviside": lambda a, b: jnp.heaviside(a, b).astype(a.dtype),
}
for _name, _fn in _BINARY.items():
    _packet = getattr(aten, _name, None)
    if _packet is None:
        continue
    for _ov in ("Tensor", "Scalar", "Tensor_Tensor", "Tensor_Scalar", "Scalar_Tensor", "default", "Scalar_Scalar"):
        if _ov in _packet.overloads():
            lowering(getattr(_packet, _ov))(lambda a, b, _fn=_fn: _fn(a, b))
    if "out" in _packet.overloads():   # core ATen lists some out= overloads: functional here, `out` ignored
        lowering(_packet.out)(lambda a, b, *, out=None, _fn=_fn: _fn(a, b))


@lowering(aten.div.Tensor_mode, aten.div.Scalar_mode)
def div_mode(a, b, *, rounding_mode=None):
    return _int_div(a, b, rounding_mode)


@lowering(aten.add.Tensor, aten.add.Scalar)
def add(a, b, *, alpha=1):
    return jnp.add(a, b if alpha == 1 else b * alpha)


@lowering(aten.sub.Tensor, aten.sub.Scalar)
def sub(a, b, *, alpha=1):
    return jnp.subtract(a, b if alpha == 1 else b * alpha)


@lowering(aten.rsub.Tensor, aten.rsub.Scalar)
def rsub(a, b, *, alpha=1):
    return jnp.subtract(b, a if alpha == 1 else a * alpha)


@lowering(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def where(cond, a, b):
    return jnp.where(cond, a, b)


def _at_least(x, lo):
    """max(x, lo) with torch's clamp gradient: a tie goes to x (jnp.maximum splits it); NaN in either propagates."""
    return jnp.where(x < lo, lo, jnp.where(x >= lo, x, x + lo))


def _at_most(x, hi):
    return jnp.where(x > hi, hi, jnp.where(x <= hi, x, x + hi))


@lowering(aten.clamp.default, aten.clamp.Tensor)
def clamp(x, min=None, max=None):
    if min is not None:
        x = _at_least(x, min)
    if max is not None:
        x = _at_most(x, max)
    return x


@lowering(aten.clamp_min.default, aten.clamp_min.Tensor)
def clamp_min(x, min):
    return _at_least(x, min)


@lowering(aten.clamp_max.default, aten.clamp_max.Tensor)
def clamp_max(x, max):
    return _at_most(x, max)


@lowering(aten.lerp.Scalar, aten.lerp.Tensor)
def lerp(a, b, w):
    return a + w * (b - a)


@lowering(aten.addcmul.default)
def addcmul(x, a, b, *, value=1):
    x, a, b = opmath(x, a, b)
    return x + value * a * b


@lowering(aten.addcdiv.default)
def addcdiv(x, a, b, *, value=1):
    x, a, b = opmath(x, a, b)
    return x + value * a / b

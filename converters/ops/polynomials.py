"""Orthogonal polynomials of tensor degree (Chebyshev T/U/V/W and shifted, Hermite H/He, Laguerre, Legendre).

torch's recurrences run in a `lax.while_loop` up to the largest n, with torch's edge cases (n < 0, |x| = 1,
large n); torch has no autograd for them, so neither do we (stop_gradient).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from converters.ops.common import aten, as_array
from converters.ops.special import _floats
from converters.registry import lowering


# ------------------------------------------------------------------------------ orthogonal polynomials
def _degree(n, x):
    """torch casts the float degree to int64 (non-finite or out-of-range degrees act as negative ones)."""
    n = jnp.broadcast_to(n, jnp.broadcast_shapes(n.shape, x.shape))
    return jnp.where(jnp.isfinite(n) & (jnp.abs(n) < 2.0 ** 63), jnp.trunc(n), -1.0)


def _recurrence(x, n, q0, step, skip):
    """q_{j+1} = step(j, p=q_{j-1}, q=q_j) for j = 1 .. n - 1 from (1, q0), per element (torch's loop);
    elements in `skip` (closed forms) or already NaN do not keep the loop running."""
    x, q0 = jnp.broadcast_arrays(x, q0)

    def live(j, q):
        return (j <= n - 1) & ~skip & ~jnp.isnan(q)

    def body(st):
        j, p, q = st
        go = live(j, q)
        return j + 1, jnp.where(go, q, p), jnp.where(go, step(j, p, q), q)

    init = (jnp.ones((), x.dtype), jnp.ones_like(x), q0)
    return lax.while_loop(lambda st: jnp.any(live(st[0], st[2])), body, init)[2]


def _select(default, *cases):
    """Cases (condition, value) in torch's order: the first that holds wins."""
    for cond, value in reversed(cases):
        default = jnp.where(cond, value, default)
    return default


def _chebyshev(kind: str, shifted: bool):
    """T/U/V/W (shifted: of 2x - 1), with torch's closed forms for large n on (-1, 1) and at the ends."""
    def fn(x, n):
        y = x + x - 1 if shifted else x
        even = jnp.fmod(n, 2) == 0
        q0 = {"t": y, "u": y + y, "v": y + y - 1, "w": y + y + 1}[kind]
        hi, lo = (x == 1, x == 0) if shifted else (jnp.abs(x) == 1, jnp.abs(x) == 1)
        big = (n > (4 if shifted and kind == "w" else 6 if shifted or kind == "t" else 8)) & (jnp.abs(y) < 1)
        th = jnp.arccos(jnp.where(big, y, 0))
        n1, n21 = n + 1, n + n + 1
        if kind == "t":
            ends = (1.0, jnp.where(even, 1.0, -1.0))
            closed = jnp.cos(n * th)
        elif kind == "u":
            ends = (n1, jnp.where(even, n1, -n1))
            closed = jnp.where(jnp.sin(th) != 0, jnp.sin(n1 * th) / jnp.sin(th), n1 * jnp.cos(n1 * th) / y)
        elif kind == "v":
            ends = (1.0, jnp.where(even, n21, -n21))
            closed = jnp.where(jnp.sin(th / 2) != 1, jnp.cos((n + 0.5) * th) / jnp.cos(th / 2), ends[1])
        else:
            ends = (n21, jnp.where(even, 1.0, -1.0))
            fallback = ends[1] if shifted else jnp.where(y > 0, n21, ends[1])
            closed = jnp.where(jnp.cos(th / 2) != 1, jnp.sin((n + 0.5) * th) / jnp.sin(th / 2), fallback)
        at_ends = jnp.where(y > 0, ends[0], ends[1]) if not shifted else jnp.where(hi, ends[0], ends[1])
        skip = (n < 2) | hi | lo | big
        rec = _recurrence(x, n, q0, lambda j, p, q: (y + y) * q - p, skip)
        return _select(rec, (n < 0, 0.0), (hi | lo, at_ends), (big, closed), (n == 0, 1.0), (n == 1, q0))
    return fn


def _hermite(physicists: bool):
    def fn(x, n):
        q0 = x + x if physicists else x
        step = (lambda j, p, q: (x + x) * q - (j + j) * p) if physicists else (lambda j, p, q: x * q - j * p)
        limit = 128 if x.dtype == jnp.float32 else 512
        rec = _recurrence(x, n, q0, step, (n < 2) | (n > limit))
        return _select(rec, (n < 0, 0.0), (n == 0, 1.0), (n == 1, q0), (n > limit, jnp.nan))
    return fn


def _laguerre(x, n):
    rec = _recurrence(x, n, 1 - x, lambda j, p, q: ((j + j + (1 - x)) * q - j * p) / (j + 1), (n < 2) | (x == 0))
    return _select(rec, (n < 0, 0.0), (x == 0, 1.0), (n == 0, 1.0), (n == 1, 1 - x))


def _legendre(x, n):
    ends = jnp.abs(x) == 1
    rec = _recurrence(x, n, x, lambda j, p, q: ((j + j + 1) * x * q - j * p) / (j + 1), (n < 2) | ends)
    at_ends = jnp.where((x > 0) | (jnp.fmod(n, 2) == 0), 1.0, -1.0)
    return _select(rec, (n < 0, 0.0), (ends, at_ends), (n == 0, 1.0), (n == 1, x))


_POLYNOMIALS = {f"special_{'shifted_' if s else ''}chebyshev_polynomial_{k}": _chebyshev(k, s)
                for k in "tuvw" for s in (False, True)}
_POLYNOMIALS.update(special_hermite_polynomial_h=_hermite(True), special_hermite_polynomial_he=_hermite(False),
                    special_laguerre_polynomial_l=_laguerre, special_legendre_polynomial_p=_legendre)


def _polynomial(fn):
    def lower(x, n):
        x, n = _floats(lax.stop_gradient(as_array(x)), lax.stop_gradient(as_array(n)))
        x = jnp.broadcast_to(x, jnp.broadcast_shapes(x.shape, n.shape))
        return fn(x, _degree(n, x))
    return lower


for _name, _fn in _POLYNOMIALS.items():
    _packet = getattr(aten, _name)
    lowering(_packet.default, _packet.x_scalar, _packet.n_scalar)(_polynomial(_fn))

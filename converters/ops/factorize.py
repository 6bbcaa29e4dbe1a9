"""Matrix factorizations: svd, qr, eigh/eig, householder products, matrix_exp, pinv (solvers: `solvers.py`).

Conventions kept from torch: pivots are 1-based int32 (LAPACK's), `info` outputs are int32 of the batch
shape, outputs a flag turns off are empty `(0,)` tensors. Gradients follow torch where it differs from
plain autodiff: factorizations that read one triangle (eigh, cholesky) give the symmetrized gradient of
the whole matrix; cholesky_solve/cholesky_inverse/pinv/eig use torch's closed forms (custom JVPs).
`info` is exact where LAPACK's is computable from the result (LU: first zero pivot; LDL: first zero
block); cholesky's is always 0 (XLA's Cholesky cannot report where it failed: the result is NaN instead).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jax import lax
from jax._src.lax.linalg import geqrf as _geqrf   # LAPACK geqrf; lax.linalg does not re-export it

from converters.ops.common import aten
from converters.registry import lowering

_HI = lax.Precision.HIGHEST


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _mH(x):
    return jnp.conj(_mT(x))


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HI)


def _empty(x):
    return jnp.zeros((0,), x.dtype)


def _eye_like(x):
    """Identity matrices with x's (batch, m, n) shape."""
    return jnp.broadcast_to(jnp.eye(x.shape[-2], x.shape[-1], dtype=x.dtype), x.shape)


def _bcast(a, b):
    """Broadcast the batch dims of two stacks of matrices."""
    batch = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return jnp.broadcast_to(a, batch + a.shape[-2:]), jnp.broadcast_to(b, batch + b.shape[-2:])


def _herm(a, upper: bool):
    """The Hermitian matrix one triangle of `a` defines (what LAPACK reads); the gradient flows to all of `a`."""
    t, strict = (jnp.triu(a), jnp.triu(a, 1)) if upper else (jnp.tril(a), jnp.tril(a, -1))
    h = t + _mH(strict)
    if jnp.iscomplexobj(a):     # the diagonal's imaginary part is ignored
        h = jnp.where(jnp.eye(a.shape[-1], dtype=bool), jnp.real(h).astype(a.dtype), h)
    return a + lax.stop_gradient(h - a)


# ------------------------------------------------------------------------------------ SVD, QR, eig
@lowering(aten._linalg_svd.default)
def svd(a, full_matrices=False, compute_uv=True, *, driver=None):
    if not compute_uv:
        return _empty(a), jnp.linalg.svd(a, compute_uv=False), _empty(a)
    u, s, vh = tuple(jnp.linalg.svd(a, full_matrices=False))
    m, n = a.shape[-2:]
    if full_matrices and m != n:   # torch's gradient ignores the complement: an orthonormal basis of it, constant
        k = min(m, n)
        if m > k:
            u = jnp.concatenate([u, jnp.linalg.qr(lax.stop_gradient(u), mode="complete")[0][..., k:]], -1)
        else:
            vh = jnp.concatenate([vh, _mH(jnp.linalg.qr(lax.stop_gradient(_mH(vh)), mode="complete")[0][..., k:])], -2)
    return u, s, vh


@lowering(aten.linalg_qr.default)
def qr(a, mode="reduced"):
    m, n = a.shape[-2:]
    if mode == "r":
        return _empty(a), jnp.linalg.qr(a, mode="r")
    if m >= n:
        return tuple(jnp.linalg.qr(a, mode=mode))
    # wide: Householder QR only looks at the leading square block; torch differentiates through it like this
    q, r = jnp.linalg.qr(a[..., :m])
    return q, jnp.concatenate([r, _mm(_mH(q), a[..., m:])], -1)


@lowering(aten._linalg_eigh.default)
def eigh(a, UPLO="L", compute_v=True):
    w, v = tuple(jnp.linalg.eigh(_herm(a, UPLO == "U"), UPLO=UPLO, symmetrize_input=True))
    return (w, v) if compute_v else (w, _empty(a))


@jax.custom_jvp
def _eig(a):
    return tuple(jnp.linalg.eig(a))


@_eig.defjvp
def _eig_jvp(primals, tangents):
    """torch's linalg_eig_jvp: dL = diag(V⁻¹ dA V); dV normalized to keep ‖v‖ = 1 (first order)."""
    (a,), (da,) = primals, tangents
    w, v = _eig(a)
    dp = jnp.linalg.solve(v, _mm(da.astype(v.dtype), v))
    dw = jnp.diagonal(dp, axis1=-2, axis2=-1)
    e = w[..., None, :] - w[..., :, None]
    off = ~jnp.eye(w.shape[-1], dtype=bool)
    dx = _mm(v, jnp.where(off, dp / jnp.where(off, e, 1), 0))
    dv = dx - v * jnp.real(jnp.sum(jnp.conj(v) * dx, axis=-2))[..., None, :]
    return (w, v), (dw, dv)


@lowering(aten.linalg_eig.default)
def eig(a):
    return _eig(a)


@lowering(aten.linalg_householder_product.default)
def householder_product(a, tau):
    return _apply_q(a, tau, _eye_like(a))


def _apply_q(a, tau, x, adjoint=False):
    """H_0 H_1 … H_{k-1} x (or its adjoint), H_i = I - tau_i v_i v_iᴴ: differentiable, unlike LAPACK's orgqr."""
    k = tau.shape[-1]
    v = jnp.tril(a[..., :k], -1) + jnp.eye(a.shape[-2], k, dtype=a.dtype)
    vs, ts = jnp.moveaxis(v, -1, 0), jnp.moveaxis(tau, -1, 0)
    if adjoint:
        ts = jnp.conj(ts)
    else:
        vs, ts = vs[::-1], ts[::-1]

    def step(x, vt):
        v_i, t_i = vt
        return x - (t_i[..., None] * v_i)[..., :, None] * _mm(jnp.conj(v_i)[..., None, :], x), None

    return lax.scan(step, x, (vs, ts))[0]


@lowering(aten.ormqr.default)
def ormqr(a, tau, c, left=True, transpose=False):
    if left:
        return _apply_q(a, tau, c, adjoint=transpose)
    return _mH(_apply_q(a, tau, _mH(c), adjoint=not transpose))


@lowering(aten.geqrf.default)
def geqrf(a):
    return _geqrf(a)


@lowering(aten.linalg_matrix_exp.default)
def matrix_exp(a):
    work = jnp.promote_types(a.dtype, jnp.float32)
    return jsl.expm(a.astype(work)).astype(a.dtype)


# ------------------------------------------------------------------------------------ pinv
@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _pinv(a, atol, rtol, hermitian):
    if hermitian:
        w, u = jnp.linalg.eigh(_herm(a, False), symmetrize_input=False)
        s, vh_inv = jnp.abs(w), _mH(u) / w[..., :, None]
    else:
        u, s, vh = jnp.linalg.svd(a, full_matrices=False)
        vh_inv = vh / s[..., :, None]
    tol = jnp.maximum(atol[..., None], rtol[..., None] * jnp.max(s, -1, keepdims=True, initial=0))
    keep = (s > tol)[..., :, None]
    return _mm(_mH(jnp.where(keep, vh_inv, 0)), _mH(u))


@_pinv.defjvp
def _pinv_jvp(hermitian, primals, tangents):
    """d(A⁺) = -A⁺ dA A⁺ + A⁺A⁺ᴴ dAᴴ (I - A A⁺) + (I - A⁺A) dAᴴ A⁺ᴴ A⁺ (constant rank; torch's pinv_backward)."""
    a, atol, rtol = primals
    da = tangents[0]
    p = _pinv(a, atol, rtol, hermitian)
    ph, dah = _mH(p), _mH(da)
    dp = (-_mm(_mm(p, da), p) + _mm(_mm(p, ph), dah - _mm(dah, _mm(a, p)))
          + _mm(dah - _mm(_mm(p, a), dah), _mm(ph, p)))
    return p, dp


@lowering(aten.linalg_pinv.atol_rtol_tensor, aten.linalg_pinv.atol_rtol_float)
def pinv(a, *, atol=None, rtol=None, hermitian=False):
    m, n = a.shape[-2:]
    real = jnp.finfo(a.dtype).dtype
    if rtol is None:
        default = jnp.finfo(real).eps * max(m, n)
        rtol = default if atol is None else jnp.where(jnp.asarray(atol) > 0, 0.0, default)
    atol = 0.0 if atol is None else atol
    if a.size == 0:
        return jnp.zeros(a.shape[:-2] + (n, m), a.dtype)
    return _pinv(a, jnp.asarray(atol, real), jnp.asarray(rtol, real), hermitian)


@lowering(aten.linalg_pinv.default, aten.linalg_pinv.rcond_tensor)
def pinv_rcond(a, rcond, hermitian=False):
    return pinv(a, atol=0.0, rtol=rcond, hermitian=hermitian)

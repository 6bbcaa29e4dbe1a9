"""Determinants, LU, triangular and Cholesky solves, LDL: the solver half of the factorizations.

Same conventions as `converters.ops.factorize`: 1-based int32 pivots, int32 `info` of the batch shape
(exact for LU and LDL; cholesky's is 0: XLA returns NaN instead of reporting), torch's closed-form
gradients where they differ from plain autodiff.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from bridge.errors import LoweringError
from converters.ops.common import aten
from converters.ops.factorize import _mT, _mH, _mm, _empty, _eye_like, _bcast, _herm
from converters.registry import lowering


# ------------------------------------------------------------------------------------ det, LU, solves
def _lu(a):
    """LAPACK getrf: (LU, 1-based int32 pivots, 0-based permutation, info = first exactly-zero pivot)."""
    lu, piv, perm = lax.linalg.lu(a)
    zero = jnp.diagonal(lu, axis1=-2, axis2=-1) == 0
    first = jnp.argmax(zero, -1) if zero.shape[-1] else jnp.zeros(zero.shape[:-1], jnp.int32)
    info = jnp.where(jnp.any(zero, -1), first + 1, 0).astype(jnp.int32)
    return lu, (piv + 1).astype(jnp.int32), perm, info


def _lu_stopped(a):
    lu, piv, _, info = _lu(lax.stop_gradient(a))
    return lu, piv, info


@lowering(aten._linalg_det.default)
def det(a):
    lu, piv, _ = _lu_stopped(a)
    if a.shape[-1] == 0:     # JAX's det JVP indexes the (empty) LU
        return jnp.ones(a.shape[:-2], a.dtype), lu, piv
    return jnp.linalg.det(a), lu, piv


@lowering(aten._linalg_slogdet.default)
def slogdet(a):
    sign, logabs = jnp.linalg.slogdet(a)
    lu, piv, _ = _lu_stopped(a)
    return sign, logabs, lu, piv


@lowering(aten.linalg_inv_ex.default)
def inv_ex(a, *, check_errors=False):
    return jnp.linalg.inv(a), _lu_stopped(a)[2]


@lowering(aten._linalg_solve_ex.default)
def solve_ex(a, b, *, left=True, check_errors=False):
    vector = b.ndim == 1 or (b.ndim == a.ndim - 1 and b.shape == a.shape[:-1])
    bm = b[..., None] if vector else b
    if not left:
        bm = _mT(bm)
    am, bm = _bcast(a if left else _mT(a), bm)
    x = jnp.linalg.solve(am, bm)
    x = x[..., 0] if vector else (x if left else _mT(x))
    return (x,) + _lu_stopped(a)


@lowering(aten.linalg_lu_factor_ex.default)
def lu_factor_ex(a, *, pivot=True, check_errors=False):
    if not pivot:
        raise LoweringError("linalg.lu_factor(pivot=False): LU without pivoting is not implemented (torch: CUDA only)")
    lu, piv, _, info = _lu(a)
    return lu, piv, info


def _unpack(lu, perm, m):
    k = min(lu.shape[-2:])
    l = jnp.tril(lu[..., :, :k], -1) + jnp.eye(m, k, dtype=lu.dtype)
    u = jnp.triu(lu[..., :k, :])
    p = _mT(jax.nn.one_hot(perm, m, dtype=lu.dtype))     # A = P L U
    return p, l, u


@lowering(aten.linalg_lu.default)
def lu(a, *, pivot=True):
    if not pivot:
        raise LoweringError("linalg.lu(pivot=False): LU without pivoting is not implemented (torch: CUDA only)")
    lu_, _, perm, _ = _lu(a)
    return _unpack(lu_, perm, a.shape[-2])


def _perm(piv, m):
    return lax.linalg.lu_pivots_to_permutation(piv.astype(jnp.int32) - 1, m)


@lowering(aten.lu_unpack.default)
def lu_unpack(lu_, piv, unpack_data=True, unpack_pivots=True):
    m = lu_.shape[-2]
    p, l, u = _unpack(lu_, _perm(piv, m) if unpack_pivots else jnp.zeros(piv.shape[:-1] + (m,), jnp.int32), m)
    return (p if unpack_pivots else _empty(lu_),) + ((l, u) if unpack_data else (_empty(lu_), _empty(lu_)))


def _tri(a, b, *, lower, unit=False, left=True, transpose=False, conj=False):
    a, b = _bcast(a, b)
    return lax.linalg.triangular_solve(a, b, left_side=left, lower=lower, unit_diagonal=unit,
                                       transpose_a=transpose, conjugate_a=conj)


@lowering(aten.linalg_lu_solve.default)
def lu_solve(lu_, piv, b, *, left=True, adjoint=False):
    if not left:    # X A = B  <=>  Aᴴ Xᴴ = Bᴴ
        return _mH(lu_solve(lu_, piv, _mH(b), adjoint=not adjoint))
    n = lu_.shape[-1]
    batch = jnp.broadcast_shapes(lu_.shape[:-2], piv.shape[:-1], b.shape[:-2])
    lu_ = jnp.broadcast_to(lu_, batch + lu_.shape[-2:])
    perm = jnp.broadcast_to(_perm(piv, n), batch + (n,))
    b = jnp.broadcast_to(b, batch + b.shape[-2:])
    if not adjoint:     # A = P L U: X = U⁻¹ L⁻¹ Pᵀ B
        y = _tri(lu_, jnp.take_along_axis(b, perm[..., None], -2), lower=True, unit=True)
        return _tri(lu_, y, lower=False)
    y = _tri(lu_, b, lower=False, transpose=True, conj=True)
    y = _tri(lu_, y, lower=True, unit=True, transpose=True, conj=True)
    return jnp.take_along_axis(y, jnp.argsort(perm)[..., None], -2)


@lowering(aten.linalg_solve_triangular.default)
def solve_triangular(a, b, *, upper, left=True, unitriangular=False):
    return _tri(a, b, lower=not upper, unit=unitriangular, left=left)


@lowering(aten.triangular_solve.default)
def triangular_solve(b, a, upper=True, transpose=False, unitriangular=False):
    x = _tri(a, b, lower=not upper, unit=unitriangular, transpose=transpose)
    return x, jnp.broadcast_to(a, x.shape[:-2] + a.shape[-2:])


# ------------------------------------------------------------------------------------ Cholesky
@lowering(aten.linalg_cholesky_ex.default)
def cholesky_ex(a, *, upper=False, check_errors=False):
    l = lax.linalg.cholesky(_herm(a, upper), symmetrize_input=True)
    return (_mH(l) if upper else l), jnp.zeros(a.shape[:-2], jnp.int32)


@lowering(aten.cholesky.default)
def cholesky(a, upper=False):
    return cholesky_ex(a, upper=upper)[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _cho_solve(l, b, upper):
    """(L Lᴴ)⁻¹ B from one triangle (U: Uᴴ U); its JVP takes the whole dL, as torch's backward does."""
    lower = _mH(jnp.triu(l)) if upper else jnp.tril(l)
    return _tri(lower, _tri(lower, b, lower=True), lower=True, transpose=True, conj=True)


@_cho_solve.defjvp
def _cho_solve_jvp(upper, primals, tangents):
    l, b = primals
    dl, db = tangents
    x = _cho_solve(l, b, upper)
    low, dlow = (_mH(jnp.triu(l)), _mH(dl)) if upper else (jnp.tril(l), dl)
    da = _mm(dlow, _mH(low)) + _mm(low, _mH(dlow))
    return x, _cho_solve(l, db - _mm(da, x), upper)


@lowering(aten.cholesky_solve.default)
def cholesky_solve(b, l, upper=False):
    l, b = _bcast(l, b)
    return _cho_solve(l, b, upper)


@lowering(aten.cholesky_inverse.default)
def cholesky_inverse(l, upper=False):
    return _cho_solve(l, _eye_like(l), upper)


@lowering(aten._linalg_check_errors.default)
def check_errors(info, api_name, *, is_matrix):
    """torch raises on a nonzero `info`; under jit there is nothing to raise on, the results carry NaN/inf."""
    return None


# ------------------------------------------------------------------------------------ LDL (LAPACK sytf2 / sytrs, lower)
_BK_ALPHA = (1 + 17 ** 0.5) / 8


def _cabs1(x):
    return jnp.abs(jnp.real(x)) + jnp.abs(jnp.imag(x)) if jnp.iscomplexobj(x) else jnp.abs(x)


def _ldl_one(a):
    """Bunch-Kaufman on one symmetric matrix, as LAPACK's sytf2 (lower). The trailing block is kept full."""
    n = a.shape[-1]
    r = jnp.arange(n)
    low = r[:, None] >= r[None, :]
    a = jnp.where(low, a, a.T)

    def body(state):
        k, a, ipiv, info = state
        col = jnp.where(r > k, _cabs1(a[:, k]), -1)
        imax = jnp.argmax(col)
        colmax = jnp.maximum(col[imax], 0)
        absakk = _cabs1(a[k, k])
        rowmax = jnp.max(jnp.where((r >= k) & (r != imax), _cabs1(a[imax]), 0))
        zero = jnp.maximum(absakk, colmax) == 0
        stay = zero | (absakk >= _BK_ALPHA * colmax) | (absakk >= _BK_ALPHA * colmax * (colmax / rowmax))
        two = ~stay & ~(_cabs1(a[imax, imax]) >= _BK_ALPHA * rowmax)     # else: 1x1 pivot at imax
        kp = jnp.where(stay, k, imax)
        kstep = jnp.where(two, 2, 1)
        kk = k + kstep - 1
        p = r.at[kk].set(kp).at[kp].set(kk)
        a = jnp.where(r[None, :] >= k, a[p][:, p], a)        # symmetric swap inside the trailing block only
        # 1x1 pivot: A22 -= x xᵀ / d, column k scaled by 1/d
        d11 = 1 / a[k, k]
        x = jnp.where(r > k, a[:, k], 0)
        upd1 = x[:, None] * (-d11 * x)[None, :]
        col1 = jnp.where(r > k, a[:, k] * d11, a[:, k])
        # 2x2 pivot on (k, k+1): A22 -= [a_k a_k1] D⁻¹ [a_k a_k1]ᵀ, columns replaced by the multipliers
        k1 = jnp.minimum(k + 1, n - 1)
        d21 = a[k1, k]
        e11, e22 = a[k1, k1] / d21, a[k, k] / d21
        t = 1 / (e11 * e22 - 1) / d21
        below = r > k1
        ak, ak1 = jnp.where(below, a[:, k], 0), jnp.where(below, a[:, k1], 0)
        wk, wk1 = t * (e11 * ak - ak1), t * (e22 * ak1 - ak)
        upd2 = -(ak[:, None] * wk[None, :] + ak1[:, None] * wk1[None, :])
        upd = jnp.where(two, upd2, jnp.where(zero, 0, upd1))
        upd = jnp.where(low, upd, upd.T)
        a = a + upd
        a = a.at[:, k].set(jnp.where(two, jnp.where(below, wk, a[:, k]), jnp.where(zero, a[:, k], col1)))
        a = a.at[:, k1].set(jnp.where(two, jnp.where(below, wk1, a[:, k1]), a[:, k1]))
        pv = jnp.where(two, -(kp + 1), kp + 1).astype(jnp.int32)
        ipiv = ipiv.at[k1].set(jnp.where(two, pv, ipiv[k1])).at[k].set(pv)
        info = jnp.where((info == 0) & zero, k + 1, info).astype(jnp.int32)
        return k + kstep, a, ipiv, info

    state = (jnp.int32(0), a, jnp.zeros(n, jnp.int32), jnp.int32(0))
    _, a, ipiv, info = lax.while_loop(lambda s: s[0] < n, body, state)
    return jnp.tril(a), ipiv, info


def _batched(fn, *xs, core):
    """vmap `fn` over the (broadcast) batch dims of its arguments; core = number of core dims of each."""
    batch = jnp.broadcast_shapes(*(x.shape[:x.ndim - c] for x, c in zip(xs, core)))
    flat = [jnp.broadcast_to(x, batch + x.shape[x.ndim - c:]).reshape((-1,) + x.shape[x.ndim - c:])
            for x, c in zip(xs, core)]
    outs = jax.vmap(fn)(*flat)
    return jax.tree.map(lambda o: o.reshape(batch + o.shape[1:]), outs)


@lowering(aten.linalg_ldl_factor_ex.default)
def ldl_factor_ex(a, *, hermitian=False, check_errors=False):
    if hermitian and jnp.iscomplexobj(a):
        raise LoweringError("linalg.ldl_factor(hermitian=True) on complex input is not supported (LAPACK hetrf)")
    if a.shape[-1] == 0:
        return a, jnp.zeros(a.shape[:-1], jnp.int32), jnp.zeros(a.shape[:-2], jnp.int32)
    return _batched(_ldl_one, a, core=[2])


def _ldl_solve_one(ld, ipiv, b):
    """LAPACK sytrs (lower): solve L D Lᵀ X = B with sytf2's interleaved interchanges."""
    n = ld.shape[-1]
    r = jnp.arange(n)

    def swap(b, i, j):
        p = r.at[i].set(j).at[j].set(i)
        return b[p]

    def fwd(state):
        k, b = state
        two = ipiv[k] < 0
        k1 = jnp.minimum(k + 1, n - 1)
        kk = jnp.where(two, k1, k)
        b = swap(b, kk, jnp.abs(ipiv[k]) - 1)
        below = jnp.where(two, r > k1, r > k)[:, None]
        b = b - jnp.where(below, ld[:, k, None] * b[k] + jnp.where(two, ld[:, k1, None] * b[k1], 0), 0)
        d21 = ld[k1, k]
        e11, e22 = ld[k, k] / d21, ld[k1, k1] / d21
        den = e11 * e22 - 1
        bk, bk1 = b[k] / d21, b[k1] / d21
        b2 = b.at[k].set((e22 * bk - bk1) / den).at[k1].set((e11 * bk1 - bk) / den)
        b1 = b.at[k].set(b[k] / ld[k, k])
        return k + jnp.where(two, 2, 1), jnp.where(two, b2, b1)

    def bwd(state):
        k, b = state
        two = ipiv[k] < 0
        k0 = jnp.maximum(k - 1, 0)
        below = (r > k)[:, None]
        b = b.at[k].add(-jnp.sum(jnp.where(below, ld[:, k, None] * b, 0), 0))
        b = b.at[k0].add(jnp.where(two, -jnp.sum(jnp.where(below, ld[:, k0, None] * b, 0), 0), 0))
        b = swap(b, k, jnp.abs(ipiv[k]) - 1)
        return k - jnp.where(two, 2, 1), b

    _, b = lax.while_loop(lambda s: s[0] < n, fwd, (jnp.int32(0), b))
    _, b = lax.while_loop(lambda s: s[0] >= 0, bwd, (jnp.int32(n - 1), b))
    return b


@lowering(aten.linalg_ldl_solve.default)
def ldl_solve(ld, piv, b, *, hermitian=False):
    if hermitian and jnp.iscomplexobj(ld):
        raise LoweringError("linalg.ldl_solve(hermitian=True) on complex input is not supported (LAPACK hetrs)")
    if ld.shape[-1] == 0:
        return jnp.broadcast_to(b, jnp.broadcast_shapes(ld.shape[:-2], b.shape[:-2]) + b.shape[-2:])
    return _batched(_ldl_solve_one, ld, piv, b, core=[2, 1, 2])

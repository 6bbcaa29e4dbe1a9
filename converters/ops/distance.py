"""Pairwise distances and norms with torch's gradients: cdist, pdist, dist, and _trilinear (bilinear)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from converters.ops.common import aten
from converters.registry import lowering


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def pnorm(d, p: float, split_ties: bool = False):
    """p-norm over the last axis (any real p, ±inf included) with torch's gradients: 0 at a zero norm
    and at zero entries; for p = ±inf the whole gradient to every tie (cdist/pdist) or shared among
    them (split_ties: norm/dist)."""
    a = jnp.abs(d)
    if p == 0:
        return jnp.sum(a != 0, axis=-1).astype(d.dtype)
    if p == 1:
        return jnp.sum(a, axis=-1)
    if p == 2:
        return jnp.sqrt(jnp.sum(a * a, axis=-1))
    if p == float("inf"):
        return jnp.max(a, axis=-1, initial=0)
    if p == -float("inf"):
        return jnp.min(a, axis=-1)
    return jnp.sum(a ** p, axis=-1) ** (1 / p)


@pnorm.defjvp
def _pnorm_jvp(p, split_ties, primals, tangents):
    (d,), (t,) = primals, tangents
    n = pnorm(d, p, split_ties)
    nk = n[..., None]
    if p == 0:
        grad = jnp.zeros_like(d)
    elif p == 1:
        grad = jnp.sign(d)
    elif abs(p) == float("inf"):
        tie = (jnp.abs(d) == nk) & (nk != 0)
        grad = jnp.sign(d) * tie / (jnp.maximum(jnp.sum(tie, axis=-1, keepdims=True), 1) if split_ties else 1)
    else:   # zero entries (|d|^(p-1) = inf for p < 1) and zero norms get 0, as in torch
        safe_n, safe_d = jnp.where(nk == 0, 1, nk), jnp.where(d == 0, 1, d)
        grad = jnp.where((nk == 0) | (d == 0), 0, jnp.sign(d) * jnp.abs(safe_d) ** (p - 1) / safe_n ** (p - 1))
    return n, jnp.sum(grad * t, axis=-1)


@lowering(aten._cdist_forward.default)
def cdist(x1, x2, p, compute_mode=None):
    """Direct differences (the float64-accurate answer torch's mm path approximates)."""
    return pnorm(x1[..., :, None, :] - x2[..., None, :, :], float(p))


@lowering(aten._pdist_forward.default)
def pdist(x, p=2.0):
    i, j = np.triu_indices(x.shape[0], 1)
    return pnorm(x[i] - x[j], float(p))


@lowering(aten.dist.default)
def dist(x, other, p=2):
    return pnorm((x - other).reshape(-1), float(p), True)


@lowering(aten._trilinear.default)
def trilinear(i1, i2, i3, expand1, expand2, expand3, sumdim, unroll_dim=1):
    """sum over `sumdim` of i1*i2*i3, each unsqueezed at its `expand` dims (nn.functional.bilinear)."""
    nd = i1.ndim + len(expand1)
    letters = "abcdefghijklmnopqrstuvwxyz"[:nd]
    subs = ["".join(c for k, c in enumerate(letters) if k not in set(e)) for e in (expand1, expand2, expand3)]
    out = "".join(c for k, c in enumerate(letters) if k not in set(sumdim))
    return jnp.einsum(f"{subs[0]},{subs[1]},{subs[2]}->{out}", i1, i2, i3, precision=jax.lax.Precision.HIGHEST)

"""Losses kept whole: cross-entropy as one fused log-sum-exp, without materialising log-probabilities.

The class pick is a compare against an iota instead of a gather, so the backward pass is one
elementwise expression (softmax - one-hot) that XLA fuses, not a scatter into a zeroed logits-sized
buffer: on an LM head this is most of the loss's cost.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from converters.ops.common import aten
from converters.registry import lowering

NONE, MEAN, SUM = 0, 1, 2


def _class_axis(x) -> int:
    return 1 if x.ndim >= 2 else 0


def _reduce(loss, reduction, denom):
    if reduction == NONE:
        return loss
    total = jnp.sum(loss)
    return total if reduction == SUM else total / denom


@lowering(aten.cross_entropy_loss.default)
def cross_entropy_loss(x, target, weight=None, reduction=MEAN, ignore_index=-100, label_smoothing=0.0):
    axis = _class_axis(x)
    x32 = x.astype(jnp.float32)
    logp = x32 - jax.nn.logsumexp(x32, axis=axis, keepdims=True)
    n_classes = x.shape[axis]
    w_C = None if weight is None else weight.astype(jnp.float32)
    w_bcast = None if w_C is None else w_C.reshape((n_classes,) + (1,) * (x.ndim - axis - 1))
    if jnp.issubdtype(target.dtype, jnp.floating):       # class probabilities
        probs = target.astype(jnp.float32)
        if label_smoothing:
            probs = probs * (1 - label_smoothing) + label_smoothing / n_classes
        terms = logp * probs if w_bcast is None else logp * probs * w_bcast
        loss = -jnp.sum(terms, axis=axis)
        return _reduce(loss, reduction, loss.size if x.ndim >= 2 else 1).astype(x.dtype)
    valid = target != ignore_index
    safe = jnp.where(valid, target, 0)
    iota = lax.broadcasted_iota(safe.dtype, x.shape, axis)
    onehot = iota == jnp.expand_dims(safe, axis)
    picked = jnp.sum(jnp.where(onehot, logp, 0.0), axis=axis)
    w_y = jnp.ones(picked.shape, jnp.float32) if w_C is None else w_C[safe]
    w_y = jnp.where(valid, w_y, 0.0)
    nll = -picked * w_y
    denom = jnp.sum(w_y)
    loss = _reduce(nll, reduction, denom)
    if label_smoothing:
        smooth = -jnp.sum(logp if w_bcast is None else logp * w_bcast, axis=axis)
        smooth = jnp.where(valid, smooth, 0.0)
        if reduction == MEAN and w_C is None:
            smooth_red = jnp.sum(smooth) / jnp.sum(valid)
        else:
            smooth_red = _reduce(smooth, reduction, denom)
        loss = (1 - label_smoothing) * loss + smooth_red * (label_smoothing / n_classes)
    return loss.astype(x.dtype)

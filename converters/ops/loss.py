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
from converters.registry import lowering, lowering_by_name

NONE, MEAN, SUM = 0, 1, 2
_REDUCTIONS = {"none": NONE, "mean": MEAN, "sum": SUM}


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
    nll, w_y, smooth = _per_sample(logp, target, w_C, ignore_index, axis)
    return _combine(nll, w_y, smooth, target != ignore_index, reduction, label_smoothing, n_classes,
                    w_C is not None).astype(x.dtype)


def _per_sample(logp, target, w_C, ignore_index, axis):
    """Per sample: weighted NLL of the target, the target's class weight (0 where ignored), and the
    label-smoothing term (the (weighted) sum of -log p over classes, 0 where ignored)."""
    valid = target != ignore_index
    safe = jnp.where(valid, target, 0)
    iota = lax.broadcasted_iota(safe.dtype, logp.shape, axis)
    onehot = iota == jnp.expand_dims(safe, axis)
    picked = jnp.sum(jnp.where(onehot, logp, 0.0), axis=axis)
    w_y = jnp.ones(picked.shape, jnp.float32) if w_C is None else w_C[safe]
    w_y = jnp.where(valid, w_y, 0.0)
    w_bcast = None if w_C is None else w_C.reshape(w_C.shape + (1,) * (logp.ndim - axis - 1))
    smooth = -jnp.sum(logp if w_bcast is None else logp * w_bcast, axis=axis)
    return -picked * w_y, w_y, jnp.where(valid, smooth, 0.0)


def _combine(nll, w_y, smooth, valid, reduction, label_smoothing, n_classes, weighted):
    """torch's reduction of the per-sample terms (mean divides by the summed target weights)."""
    denom = jnp.sum(w_y)
    loss = _reduce(nll, reduction, denom)
    if label_smoothing:
        if reduction == MEAN and not weighted:
            smooth_red = jnp.sum(smooth) / jnp.sum(valid)
        else:
            smooth_red = _reduce(smooth, reduction, denom)
        loss = (1 - label_smoothing) * loss + smooth_red * (label_smoothing / n_classes)
    return loss


def _linear_ce_terms(x_NF, w_CF, target_N, b_C, w_C, ignore_index, chunk: int):
    """Per-sample CE terms of `x_NF @ w_CFᵀ + b_C`, `chunk` rows at a time: each chunk's logits are
    rematerialised in the backward pass, so at most chunk × C logits are alive (torch's chunked op)."""
    def terms(x, t):
        logits = jnp.einsum("nf,cf->nc", x, w_CF, preferred_element_type=jnp.float32)
        if b_C is not None:
            logits = logits + b_C.astype(jnp.float32)
        logp = logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)
        return _per_sample(logp, t, w_C, ignore_index, 1)

    n = x_NF.shape[0]
    if chunk <= 0 or chunk >= n:
        return terms(x_NF, target_N)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n   # padded rows are computed and dropped
    x = jnp.pad(x_NF, ((0, pad), (0, 0))).reshape(n_chunks, chunk, -1)
    t = jnp.pad(target_N, (0, pad)).reshape(n_chunks, chunk)
    out = lax.map(lambda xt: jax.checkpoint(terms)(*xt), (x, t))
    return tuple(o.reshape(-1)[:n] for o in out)


def _linear_ce(x_NF, w_CF, target_N, b_C, w_C, reduction, ignore_index, label_smoothing, chunk):
    # torch's chunked op has no derivative for the class weights: none flows to them here either
    w_C = None if w_C is None else lax.stop_gradient(w_C.astype(jnp.float32))
    nll, w_y, smooth = _linear_ce_terms(x_NF, w_CF, target_N, b_C, w_C, ignore_index, chunk)
    return _combine(nll, w_y, smooth, target_N != ignore_index, reduction, label_smoothing, w_CF.shape[0],
                    w_C is not None).astype(x_NF.dtype)


@lowering_by_name("torch_nn._linear_cross_entropy_batch_chunked.default")
def linear_cross_entropy_chunked(x_NF, w_CF, target_N, b_C, w_C, reduction, ignore_index, label_smoothing,
                                 batch_chunk_size, acc_policy, acc_dtype, allow_retain_graph,
                                 input_grad, weight_grad, bias_grad):
    """torch.nn.functional.linear_cross_entropy with options (mean/sum): (loss, and the gradients of
    the loss w.r.t. input / linear weight / linear bias that torch precomputes, (0, ...)-sized where
    not asked for; JAX differentiates the loss itself, so these are constants)."""
    red = _REDUCTIONS[reduction]
    args = (x_NF, w_CF, b_C)
    loss, vjp = jax.vjp(lambda x, w, b: _linear_ce(x, w, target_N, b, w_C, red, ignore_index,
                                                   label_smoothing, batch_chunk_size), *args)
    grads = lax.stop_gradient(vjp(jnp.ones((), loss.dtype)))
    empty = [(0, 0), (0, 0), (0,)]
    return (loss,) + tuple(g.astype(x_NF.dtype) if want and g is not None else jnp.zeros(e, x_NF.dtype)
                           for g, want, e in zip(grads, (input_grad, weight_grad, bias_grad), empty))


@lowering_by_name("torch_nn._linear_cross_entropy_batch_chunked_no_reduction.default")
def linear_cross_entropy_chunked_none(x_NF, w_CF, target_N, b_C, w_C, ignore_index, batch_chunk_size,
                                      acc_policy, acc_dtype):
    """torch.nn.functional.linear_cross_entropy with options, reduction='none': the per-sample loss."""
    return _linear_ce(x_NF, w_CF, target_N, b_C, w_C, NONE, ignore_index, 0.0, batch_chunk_size)


@lowering(aten.multilabel_margin_loss_forward.default)
def multilabel_margin_loss(x, target, reduction):
    """Per sample, sum over its targets j (the classes listed before the first -1, repeats counted) and the
    classes i it does not list of max(0, 1 - x[j] + x[i]) / C, as torch's kernel (its decomposition ignores
    the -1 end). Returns (loss, is_target) like the ATen op."""
    x_NC, t_NC = jnp.atleast_2d(x), jnp.atleast_2d(target)
    C = x_NC.shape[1]
    class_C = jnp.arange(C)
    listed_NC = class_C < jnp.min(jnp.where(t_NC == -1, class_C, C), axis=-1, keepdims=True)
    t_NC = jnp.where(listed_NC, t_NC, 0)
    is_target_NC = jnp.any((t_NC[:, :, None] == class_C) & listed_NC[:, :, None], axis=1)
    x_j_NC = jnp.take_along_axis(x_NC, t_NC, axis=1)
    hinge_NJC = jnp.maximum(1 - x_j_NC[:, :, None] + x_NC[:, None, :], 0) / C
    loss_N = jnp.where(listed_NC[:, :, None] & ~is_target_NC[:, None, :], hinge_NJC, 0).sum((1, 2))
    loss = loss_N.reshape(()) if x.ndim < 2 else loss_N
    return _reduce(loss, reduction, max(loss_N.shape[0], 1)), is_target_NC.astype(x.dtype).reshape(target.shape)

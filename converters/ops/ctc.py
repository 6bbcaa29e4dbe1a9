"""CTC loss (bridge::ctc_loss, which capture routes F.ctc_loss / nn.CTCLoss to; see converters/ctc.py).

The forward recursion over the blank-extended labels runs in log space under `lax.scan`; JAX derives the
backward pass. Values are torch's for any `log_probs` (they are not renormalised). Gradients are the true
derivative: torch's backward assumes `log_probs` came from log_softmax and returns the gradient as seen
through it, so gradients agree with torch's upstream of a log_softmax, which is how CTC heads use it.
"""
from __future__ import annotations

import jax.numpy as jnp
import torch
from jax import lax

import converters.ctc  # noqa: F401  (defines torch.ops.bridge.ctc_loss)
from converters.registry import lowering

_NEG = -1e30   # log 0 kept finite, so sums and their gradients stay finite on impossible paths


def _padded_targets(targets, target_lengths, mask):
    """(B, S) targets from padded targets, concatenated ones, or padded ones read through `mask`."""
    if mask is not None:   # targets[mask], concatenated: valid entries first, in row-major order (stable)
        flat, keep = targets.reshape(-1), mask.reshape(-1)
        order = jnp.argsort(jnp.logical_not(keep), stable=True)
        concatenated, bound = flat[order], targets.shape[-1] if targets.ndim == 2 else flat.shape[0]
    elif targets.ndim == 1:
        concatenated, bound = targets, targets.shape[0]
    else:
        return targets
    offsets = jnp.cumsum(target_lengths) - target_lengths
    index = offsets[:, None] + jnp.arange(bound)[None, :]
    return concatenated[jnp.clip(index, 0, concatenated.shape[0] - 1)]


def _log_likelihood(lp_TBC, labels_BS, input_lengths, target_lengths, blank: int):
    T, B, _ = lp_TBC.shape
    S = labels_BS.shape[1]
    # entries past a target's length are padding (e.g. -100) torch never reads: the blank stands in
    labels_BS = jnp.where(jnp.arange(S)[None] < target_lengths[:, None], labels_BS, blank)
    L = 2 * S + 1
    ext_BL = jnp.full((B, L), blank, labels_BS.dtype).at[:, 1::2].set(labels_BS)
    # skip over a blank to the next label: only between different labels
    skip_BL = jnp.zeros((B, L), bool).at[:, 2:].set((ext_BL[:, 2:] != blank) & (ext_BL[:, 2:] != ext_BL[:, :-2]))
    emit_TBL = jnp.take_along_axis(lp_TBC, jnp.broadcast_to(ext_BL[None], (T, B, L)), axis=2)
    alpha0_BL = jnp.full((B, L), _NEG, lp_TBC.dtype).at[:, 0].set(emit_TBL[0, :, 0])
    alpha0_BL = alpha0_BL.at[:, 1].set(jnp.where(target_lengths > 0, emit_TBL[0, :, 1], _NEG)) if L > 1 else alpha0_BL

    def step(alpha_BL, inputs):
        t, emit_BL = inputs
        stay = alpha_BL
        prev = jnp.concatenate([jnp.full((B, 1), _NEG, alpha_BL.dtype), alpha_BL[:, :-1]], axis=1)
        prev2 = jnp.concatenate([jnp.full((B, 2), _NEG, alpha_BL.dtype), alpha_BL[:, :-2]], axis=1)
        prev2 = jnp.where(skip_BL, prev2, _NEG)
        top = jnp.maximum(jnp.maximum(stay, prev), prev2)
        new = top + jnp.log(jnp.exp(stay - top) + jnp.exp(prev - top) + jnp.exp(prev2 - top)) + emit_BL
        new = jnp.maximum(new, _NEG)
        return jnp.where((t < input_lengths)[:, None], new, alpha_BL), None

    alpha_BL, _ = lax.scan(step, alpha0_BL, (jnp.arange(1, T), emit_TBL[1:]))
    last = jnp.take_along_axis(alpha_BL, (2 * target_lengths)[:, None], axis=1)[:, 0]
    before = jnp.take_along_axis(alpha_BL, jnp.maximum(2 * target_lengths - 1, 0)[:, None], axis=1)[:, 0]
    before = jnp.where(target_lengths > 0, before, _NEG)
    return jnp.logaddexp(last, before)


@lowering(torch.ops.bridge.ctc_loss.default)
def ctc_loss(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity, mask=None):
    unbatched = log_probs.ndim == 2
    if unbatched:
        log_probs, targets = log_probs[:, None], targets[None] if mask is None else targets
        input_lengths, target_lengths = jnp.reshape(input_lengths, (1,)), jnp.reshape(target_lengths, (1,))
    input_lengths, target_lengths = input_lengths.astype(jnp.int32), target_lengths.astype(jnp.int32)
    labels_BS = _padded_targets(targets, target_lengths, mask).astype(jnp.int32)
    too_long = target_lengths > labels_BS.shape[1]   # concatenated targets past the bound: no honest value
    ll = _log_likelihood(log_probs, labels_BS, input_lengths, target_lengths, blank)
    impossible = ll <= _NEG / 2
    loss = jnp.where(impossible, jnp.inf, -ll)
    if zero_infinity:
        loss = jnp.where(impossible, jnp.zeros_like(loss), loss)
    loss = jnp.where(too_long, jnp.nan, loss)
    if reduction == "none":
        return loss[0] if unbatched else loss
    if reduction == "sum":
        return jnp.sum(loss)
    return jnp.mean(loss / jnp.maximum(target_lengths, 1).astype(loss.dtype))

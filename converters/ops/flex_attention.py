"""FlexAttention (`torch.nn.attention.flex_attention`): the `flex_attention` higher-order op.

torch.export keeps the call whole, with `score_mod(score, b, h, q_idx, kv_idx, *buffers)` and the block mask's
`mask_mod(b, h, q_idx, kv_idx, *buffers)` as FX subgraphs written for one score. As torch's own reference
(`math_attention`) does, the lowering computes every score, maps both subgraphs over the batch, head, query and
key indices with four `vmap`s, and takes a softmax that gives zeros, not NaN, on rows with every key masked.
The block mask's block indices only let kernels skip blocks `mask_mod` rules out: they do not change a value.
Returns (out, logsumexp, max score), the last two in base-2 units as torch's op does (flex_attention converts
back). JAX differentiates it, score_mod's captured parameters included.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import torch

from converters.ops.nn import safe_softmax
from converters.registry import lowering


def _run(gm, inputs):
    from converters.interpreter import run_graph   # the interpreter imports every op family
    return run_graph(gm, inputs)[0]


def _over_bhqk(fn, with_score: bool):
    """`fn(*score, b, h, q_idx, kv_idx)` written for one score, mapped over 1-d index vectors (and a [B, H, Q, K]
    score) by four nested vmaps, innermost over the keys: indices broadcast only where `fn` combines them."""
    lead = (0,) if with_score else ()
    for axis in (3, 2, 1, 0):
        fn = jax.vmap(fn, in_axes=lead + tuple(0 if i == axis else None for i in range(4)))
    return fn


def _repeat_heads(x, heads):
    """GQA: key/value heads repeated so each query head reads its group's (torch's repeat_interleave)."""
    return x if x.shape[1] == heads else jnp.repeat(x, heads // x.shape[1], axis=1)


@lowering(torch.ops.higher_order.flex_attention)
def flex_attention(query, key, value, score_mod, block_mask, scale, kernel_options=None,
                   score_mod_other_buffers=(), mask_mod_other_buffers=()):
    work = jnp.float64 if query.dtype == jnp.float64 else jnp.float32
    B, H, Q = query.shape[:3]
    key, value = _repeat_heads(key, H), _repeat_heads(value, H)
    key = jnp.broadcast_to(key, (B, *key.shape[1:]))
    value = jnp.broadcast_to(value, (B, *value.shape[1:]))
    scores_BHQK = jnp.einsum("bhqd,bhkd->bhqk", query.astype(work), key.astype(work)) * scale
    idx = [jnp.arange(n, dtype=jnp.int32) for n in scores_BHQK.shape]
    modded = _over_bhqk(lambda s, *i: _run(score_mod, [s, *i, *score_mod_other_buffers]), True)(scores_BHQK, *idx)
    keep = _over_bhqk(lambda *i: _run(block_mask[-1], [*i, *mask_mod_other_buffers]), False)(*idx)
    post = jnp.where(keep, modded.astype(work), -jnp.inf)
    live = jnp.any(post != -jnp.inf, axis=-1)
    lse = jnp.where(live, jax.nn.logsumexp(jnp.where(live[..., None], post, 0.0), axis=-1), -jnp.inf)
    max_score = jnp.max(post, axis=-1)
    probs = safe_softmax(post, -1)   # zeros, not nan, on rows with every key masked
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(query.dtype), value.astype(query.dtype),
                     preferred_element_type=query.dtype)
    return out, lse / math.log(2), max_score / math.log(2)

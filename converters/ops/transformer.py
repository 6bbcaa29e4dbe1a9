"""torch's fused transformer fast path, written out: eval-mode nn.TransformerEncoderLayer / nn.MultiheadAttention
run without autograd (frozen weights, torch.no_grad(), inference_mode) export as single ATen ops.

Masks follow the fast path's rules: any non-zero (or True) entry masks its key out, `mask_type` 0 is an (L, S)
attention mask, 1 a (B, S) key-padding mask, 2 anything broadcastable to (B, H, L, S); fully masked rows give 0.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from converters.ops.activation import gelu, relu
from converters.ops.common import aten, dot_precision
from converters.ops.linalg import linear
from converters.ops.nn import layer_norm
from converters.registry import lowering


def _masked_softmax_BHLS(x, mask, mask_type):
    if mask is None:
        return jax.nn.softmax(x, axis=-1)
    m = mask if mask.dtype == jnp.bool_ else mask != 0
    if mask_type == 0:
        m = m.reshape((1,) * (x.ndim - 2) + m.shape[-2:])
    elif mask_type == 1:
        m = m.reshape(m.shape[:1] + (1,) * (x.ndim - 2) + m.shape[-1:])
    m = jnp.broadcast_to(m, x.shape)
    w = jax.nn.softmax(jnp.where(m, -jnp.inf, x), axis=-1)
    return jnp.where(jnp.all(m, axis=-1, keepdims=True), jnp.zeros((), w.dtype), w)


@lowering(aten._masked_softmax.default)
def masked_softmax(x, mask, dim=None, mask_type=None):
    """softmax over `dim` (default last) ignoring positions where `mask` is True."""
    d = x.ndim - 1 if dim is None else dim % x.ndim
    return jnp.moveaxis(_masked_softmax_BHLS(jnp.moveaxis(x, d, -1), mask, mask_type), -1, d)


@lowering(aten._native_multi_head_attention.default)
def native_multi_head_attention(q_BLD, k_BSD, v_BSD, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight,
                                proj_bias, mask=None, need_weights=True, average_attn_weights=True, mask_type=None):
    """Batch-first multi-head attention with packed in-projection; (output, weights or an empty tensor)."""
    wq, wk, wv = jnp.split(qkv_weight, 3)
    bq, bk, bv = jnp.split(qkv_bias, 3) if qkv_bias is not None else (None,) * 3
    dh = embed_dim // num_head

    def heads(x, w, b):   # (B, T, D) -> (B, H, T, dh)
        y = linear(x, w, b)
        return y.reshape(y.shape[:-1] + (num_head, dh)).swapaxes(-2, -3)

    q = heads(q_BLD, wq, bq) / math.sqrt(dh)
    k, v = heads(k_BSD, wk, bk), heads(v_BSD, wv, bv)
    with dot_precision(q, k):
        w = _masked_softmax_BHLS(jnp.einsum("...hld,...hsd->...hls", q, k), mask, mask_type)
        ctx = jnp.einsum("...hls,...hsd->...hld", w, v)
    out = linear(ctx.swapaxes(-2, -3).reshape(q_BLD.shape[:-1] + (embed_dim,)), proj_weight, proj_bias)
    if not need_weights:
        return out, jnp.zeros((0,), out.dtype)
    return out, (jnp.mean(w, axis=-3) if average_attn_weights else w)


@lowering(aten._transformer_encoder_layer_fwd.default)
def transformer_encoder_layer_fwd(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu,
                                  norm_first, eps, norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2,
                                  ffn_weight_1, ffn_bias_1, ffn_weight_2, ffn_bias_2, mask=None, mask_type=None):
    """nn.TransformerEncoderLayer's eval fast path (batch-first, dropout off)."""
    def norm(x, w, b):
        return layer_norm(x, [embed_dim], w, b, eps)[0]

    def attention(x):
        return native_multi_head_attention(x, x, x, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight,
                                           proj_bias, mask, False, True, mask_type)[0]

    def ffn(x):
        h = linear(x, ffn_weight_1, ffn_bias_1)
        return linear(gelu(h) if use_gelu else relu(h), ffn_weight_2, ffn_bias_2)

    if norm_first:
        x = src + attention(norm(src, norm_weight_1, norm_bias_1))
        return x + ffn(norm(x, norm_weight_2, norm_bias_2))
    x = norm(src + attention(src), norm_weight_1, norm_bias_1)
    return norm(x + ffn(x), norm_weight_2, norm_bias_2)

"""High-level NN ops kept whole: softmax, layer/group/batch/rms norm, scaled dot-product attention.

Low-precision inputs are computed in fp32 and cast back, as torch's CPU kernels do.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from converters.ops.common import aten, dim_, dot_precision, dt, scalar_dims
from converters.registry import lowering


def _f32(x):
    return x.astype(jnp.float32) if x.dtype in (jnp.bfloat16, jnp.float16) else x


@lowering(aten._softmax.default)
@scalar_dims
def softmax(x, dim, half_to_float=False):
    return jax.nn.softmax(_f32(x), axis=dim_(dim, x.ndim))


@lowering(aten._safe_softmax.default)
def safe_softmax(x, dim, dtype=None):
    """Softmax that returns zeros, not nan, on slices that are all -inf (torch's attention softmax)."""
    axis = dim_(dim, x.ndim)
    xf = _f32(x) if dtype is None else x.astype(dt(dtype))
    live = jnp.any(x != -jnp.inf, axis=axis, keepdims=True)
    y = jax.nn.softmax(jnp.where(live, xf, jnp.zeros((), xf.dtype)), axis=axis)
    return jnp.where(live, y, jnp.zeros((), y.dtype)).astype(x.dtype if dtype is None else dt(dtype))


@lowering(aten._log_softmax.default)
@scalar_dims
def log_softmax(x, dim, half_to_float=False):
    return jax.nn.log_softmax(_f32(x), axis=dim_(dim, x.ndim))


@lowering(aten.native_layer_norm.default)
def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    xf = _f32(x)
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
    rstd = jax.lax.rsqrt(var + eps)
    y = (xf - mean) * rstd
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    # torch's backward ignores gradients flowing into the saved mean / rstd outputs
    return y.astype(x.dtype), jax.lax.stop_gradient(mean), jax.lax.stop_gradient(rstd)


@lowering(aten.rms_norm.default)
def rms_norm(x, normalized_shape, weight=None, eps=None):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    xf = _f32(x)
    eps = jnp.finfo(xf.dtype).eps if eps is None else eps
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=axes, keepdims=True) + eps)
    return (y if weight is None else y * weight).astype(x.dtype)


@lowering(aten.native_group_norm.default)
def group_norm(x, weight, bias, N, C, HxW, group, eps):
    xf = _f32(x).reshape(N, group, C // group * HxW)   # explicit size: N may be 0
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(var + eps)
    y = ((xf - mean) * rstd).reshape(x.shape)
    bshape = (1, C) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(bshape)
    if bias is not None:
        y = y + bias.reshape(bshape)
    return y.astype(x.dtype), mean.reshape(N, group), rstd.reshape(N, group)


def _bn_apply(x, mean, invstd, weight, bias):
    bshape = (1, -1) + (1,) * (x.ndim - 2)
    y = (_f32(x) - mean.reshape(bshape)) * invstd.reshape(bshape)
    if weight is not None:
        y = y * weight.reshape(bshape)
    if bias is not None:
        y = y + bias.reshape(bshape)
    return y.astype(x.dtype)


def _batch_stats(x):
    axes = (0,) + tuple(range(2, x.ndim))
    xf = _f32(x)
    mean = jnp.mean(xf, axis=axes)
    var = jnp.mean(jnp.square(xf - mean.reshape((1, -1) + (1,) * (x.ndim - 2))), axis=axes)
    n = x.size // x.shape[1]
    return mean, var, n


def _saved(*stats):
    """torch's backward ignores gradients flowing into saved statistics and running-stat updates."""
    return tuple(jax.lax.stop_gradient(s) for s in stats)


def _bn_train(x, weight, bias, running_mean, running_var, momentum, eps):
    mean, var, n = _batch_stats(x)
    invstd = jax.lax.rsqrt(var + eps)
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * var * (n / max(n - 1, 1))
    return (_bn_apply(x, mean, invstd, weight, bias),) + _saved(mean, invstd, new_mean, new_var)


@lowering(aten._native_batch_norm_legit_functional.default)
def batch_norm_train(x, weight, bias, running_mean, running_var, training, momentum, eps):
    if not training:   # eval on CPU: empty saved stats, running stats unchanged
        y, empty, _ = batch_norm_eval(x, weight, bias, running_mean, running_var, momentum, eps)
        return y, empty, empty, running_mean, running_var
    return _bn_train(x, weight, bias, running_mean, running_var, momentum, eps)


@lowering(aten._native_batch_norm_legit.default)
def batch_norm_legit(x, weight, bias, running_mean, running_var, training, momentum, eps):
    """The in-place form (core ATen): JAX arrays are immutable, so the running statistics it would update
    are not returned; exported graphs use the functional form above, which returns them."""
    return batch_norm_train(x, weight, bias, running_mean, running_var, training, momentum, eps)[:3]


@lowering(aten._batch_norm_with_update_functional.default)
def batch_norm_with_update(x, weight, bias, running_mean, running_var, momentum, eps):
    """(y, save_mean, save_invstd, reserve (empty uint8), new running_mean, new running_var)."""
    y, mean, invstd, new_mean, new_var = _bn_train(x, weight, bias, running_mean, running_var, momentum, eps)
    return y, mean, invstd, jnp.zeros((0,), jnp.uint8), new_mean, new_var


@lowering(aten._native_batch_norm_legit_no_training.default)
def batch_norm_eval(x, weight, bias, running_mean, running_var, momentum, eps):
    invstd = jax.lax.rsqrt(running_var.astype(jnp.float32) + eps)
    return _bn_apply(x, running_mean, invstd, weight, bias), jnp.zeros((0,)), jnp.zeros((0,))


@lowering(aten._native_batch_norm_legit.no_stats)
def batch_norm_no_stats(x, weight, bias, training, momentum, eps):
    mean, var, _ = _batch_stats(x)
    invstd = jax.lax.rsqrt(var + eps)
    return (_bn_apply(x, mean, invstd, weight, bias),) + _saved(mean, invstd)


def _sdpa_random(node) -> bool:
    p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
    return bool(p)


@lowering(aten.scaled_dot_product_attention.default, random=_sdpa_random)
def scaled_dot_product_attention(rng, q_BNTH, k_BKSH, v_BKSH, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 *, scale=None, enable_gqa=False):
    """torch (..., N, T, H) layout → jax.nn.dot_product_attention's (B, T, N, H); masks are (B, N, T, S) in both.
    Leading dims broadcast across q, k, v and the mask (and heads too, unless `enable_gqa`), as in torch."""
    nd = max(q_BNTH.ndim, k_BKSH.ndim, v_BKSH.ndim, 4)
    q, k, v = (t.reshape((1,) * (nd - t.ndim) + t.shape) for t in (q_BNTH, k_BKSH, v_BKSH))
    batch = jnp.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    heads = [t.shape[-3] for t in (q, k, v)] if enable_gqa else [max(t.shape[-3] for t in (q, k, v))] * 3
    q, k, v = (jnp.broadcast_to(t, batch + (n,) + t.shape[-2:]).reshape((-1, n) + t.shape[-2:])
               for t, n in zip((q, k, v), heads))
    mask = bias = None
    if attn_mask is not None:
        m = attn_mask.reshape((1,) * (nd - attn_mask.ndim) + attn_mask.shape)
        m = m.reshape((1,) + m.shape[-3:]) if all(d == 1 for d in m.shape[:-3]) else \
            jnp.broadcast_to(m, batch + m.shape[-3:]).reshape((-1,) + m.shape[-3:])
        if m.dtype == jnp.bool_:
            mask = m
        else:
            bias = m.astype(q.dtype)
    live = None   # query rows whose mask admits some key: torch returns zeros for the others
    if mask is not None:
        live = jnp.any(mask, axis=-1, keepdims=True)
    elif bias is not None:
        live = jnp.any(bias != -jnp.inf, axis=-1, keepdims=True)
        bias = jnp.where(live, bias, jnp.zeros((), bias.dtype))   # no -inf - -inf = nan, in value or gradient
    with dot_precision(q):
        out = _attention(rng, q, k, v, mask, bias, dropout_p, is_causal, scale)
    if live is not None:
        out = jnp.where(live, out, jnp.zeros((), out.dtype))
    return out.reshape((batch + out.shape[-3:])[nd - max(q_BNTH.ndim, k_BKSH.ndim, v_BKSH.ndim):])


def _attention(rng, q, k, v, mask, bias, dropout_p, is_causal, scale):
    """fp32: XLA's attention. bf16/fp16: cuDNN's fused (flash) attention on GPUs where it accepts the
    shapes, else attention written out with fp32 logits (jax.nn.dot_product_attention's XLA path pins
    fp16 dots to F16_F16_F32, which CPUs cannot compile, and its bf16 backward needs implicit promotion)."""
    hq, hv = q.shape[-1], v.shape[-1]
    if hv != hq:   # torch lets the value head dim differ (MLA); XLA's and cuDNN's attention take zero padding
        width, scale = max(hq, hv), 1 / math.sqrt(hq) if scale is None else scale

        def pad(t):
            return jnp.pad(t, [(0, 0)] * (t.ndim - 1) + [(0, width - t.shape[-1])])
        return _attention(rng, pad(q), pad(k), pad(v), mask, bias, dropout_p, is_causal, scale)[..., :hv]
    low = q.dtype in (jnp.bfloat16, jnp.float16)
    if rng is None and low and jax.default_backend() == "gpu":
        try:
            return _jax_attention(q, k, v, mask, bias, scale, is_causal, "cudnn")
        except (ValueError, NotImplementedError, TypeError, RuntimeError):
            pass   # cuDNN refuses these shapes/masks: written out below
    if rng is not None or low:
        return _attention_math(rng, q, k, v, mask, bias, dropout_p, is_causal, scale)
    return _jax_attention(q, k, v, mask, bias, scale, is_causal, None)


def _jax_attention(q, k, v, mask, bias, scale, is_causal, implementation):
    return jax.nn.dot_product_attention(
        q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), bias=bias, mask=mask,
        scale=scale, is_causal=is_causal, implementation=implementation).swapaxes(1, 2)


def _attention_math(key, q, k, v, mask, bias, p, is_causal, scale):
    """Attention written out (fp32 logits and softmax), with dropout on the weights when `key` is set."""
    n, kh = q.shape[1], k.shape[1]
    if kh != n:
        k, v = jnp.repeat(k, n // kh, axis=1), jnp.repeat(v, n // kh, axis=1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = jnp.einsum("bnth,bnsh->bnts", _f32(q), _f32(k)) * scale
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    if is_causal:
        t, s = logits.shape[-2:]
        logits = jnp.where(jnp.tril(jnp.ones((t, s), bool)), logits, -jnp.inf)
    w = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        w = jnp.where(jnp.any(mask, axis=-1, keepdims=True), w, 0)
    if key is not None:
        w = jnp.where(jax.random.bernoulli(key, 1 - p, w.shape), w / (1 - p), 0)
    w = w.astype(v.dtype)
    return jnp.einsum("bnts,bnsh->bnth", w, v)

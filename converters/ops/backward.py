"""ATen backward ops that appear in graphs (core opset): each is the VJP of its forward lowering.

`_vjp(forward, primals, cotangent, mask)` runs `jax.vjp` of the registered forward lowering and keeps
the gradients torch's `output_mask` asks for (None elsewhere, as torch returns undefined tensors).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from converters.ops.common import aten
from converters.registry import lookup, lowering


def _forward(op):
    return lookup(op).fn


def _vjp(fn, primals, cotangent, mask=None):
    """Gradients of `fn` (its first output when it returns a tuple) at `primals`, where `mask` allows."""
    mask = (True,) * len(primals) if mask is None else tuple(mask)
    live = [i for i, (p, m) in enumerate(zip(primals, mask)) if m and p is not None]
    if not live:
        return (None,) * len(primals)

    def first(*xs):
        args = list(primals)
        for i, x in zip(live, xs):
            args[i] = x
        out = fn(*args)
        return out[0] if isinstance(out, (tuple, list)) else out

    out, pull = jax.vjp(first, *[primals[i] for i in live])
    grads = dict(zip(live, pull(cotangent.astype(out.dtype))))
    return tuple(grads.get(i) for i in range(len(primals)))


@lowering(aten.convolution_backward.default)
def convolution_backward(grad_output, x, w, bias_sizes, stride, padding, dilation, transposed,
                         output_padding, groups, output_mask):
    conv = _forward(aten.convolution.default)
    g_x, g_w = _vjp(lambda a, b: conv(a, b, None, stride, padding, dilation, transposed, output_padding, groups),
                    (x, w), grad_output, output_mask[:2])
    g_b = jnp.sum(grad_output, axis=(0,) + tuple(range(2, grad_output.ndim))) if output_mask[2] else None
    return g_x, g_w, g_b


def _eps(x, mean, rstd):
    """The eps the forward used, recovered from its saved statistics per row: rstd = (var + eps)^-1/2."""
    if x.size == 0:
        return 0.0
    xf = x.reshape(mean.size, -1).astype(jnp.float32)
    var_R = jnp.mean(jnp.square(xf - mean.reshape(-1, 1).astype(jnp.float32)), axis=-1)
    eps = jnp.mean(1 / jnp.square(rstd.reshape(-1).astype(jnp.float32)) - var_R)
    return jax.lax.stop_gradient(jnp.maximum(eps, 0))


@lowering(aten.native_layer_norm_backward.default)
def native_layer_norm_backward(grad_out, x, normalized_shape, mean, rstd, weight, bias, output_mask):
    norm = _forward(aten.native_layer_norm.default)
    eps = _eps(x, mean, rstd)
    return _vjp(lambda a, w, b: norm(a, normalized_shape, w, b, eps), (x, weight, bias), grad_out, output_mask)


@lowering(aten.native_group_norm_backward.default)
def native_group_norm_backward(grad_out, x, mean, rstd, weight, N, C, HxW, group, output_mask):
    norm = _forward(aten.native_group_norm.default)
    eps = _eps(x, mean, rstd)
    g_x, g_w = _vjp(lambda a, w: norm(a, w, None, N, C, HxW, group, eps), (x, weight), grad_out, output_mask[:2])
    g_b = jnp.sum(grad_out, axis=(0,) + tuple(range(2, grad_out.ndim))) if output_mask[2] else None
    return g_x, g_w, g_b


@lowering(aten.max_pool2d_with_indices_backward.default)
def max_pool2d_with_indices_backward(grad_output, x, kernel_size, stride, padding, dilation, ceil_mode, indices):
    """Each output's gradient goes to the input position its saved (flat spatial) index names."""
    lead, hw = x.shape[:-2], x.shape[-2] * x.shape[-1]
    g = grad_output.reshape(-1, grad_output.shape[-2] * grad_output.shape[-1])
    idx = indices.reshape(g.shape)
    rows = jnp.arange(g.shape[0])[:, None]
    return jnp.zeros((g.shape[0], hw), grad_output.dtype).at[rows, idx].add(g).reshape(lead + x.shape[-2:])


@lowering(aten.avg_pool2d_backward.default)
def avg_pool2d_backward(grad_output, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                        divisor_override):
    pool = _forward(aten.avg_pool2d.default)
    return _vjp(lambda a: pool(a, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override),
                (x,), grad_output)[0]


@lowering(aten._adaptive_avg_pool2d_backward.default)
def adaptive_avg_pool2d_backward(grad_output, x):
    pool = _forward(aten._adaptive_avg_pool2d.default)
    return _vjp(lambda a: pool(a, grad_output.shape[-2:]), (x,), grad_output)[0]


@lowering(aten.embedding_dense_backward.default)
def embedding_dense_backward(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
    emb = _forward(aten.embedding.default)
    weight = jnp.zeros((num_weights, grad_output.shape[-1]), grad_output.dtype)
    return _vjp(lambda w: emb(w, indices, padding_idx, scale_grad_by_freq), (weight,), grad_output)[0]

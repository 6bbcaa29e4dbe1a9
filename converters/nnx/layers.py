"""Builders: a torch layer's settings → the NNX module that computes the same function.

Each builder is a few lines keyed by torch type (`@builder(nn.Linear)`). Parametric modules are
built abstractly (`nnx.eval_shape`, no random init); `convert.py` then fills their variables from
the torch tensors through the layout table. A setting that cannot be carried over exactly raises
`UnsupportedModuleError` naming it.
"""
from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx
from torch import nn

from bridge.errors import UnsupportedModuleError
from converters.dtypes import jax_dtype
from converters.nnx import modules as M
from converters.nnx.pooling import AdaptivePool, AvgPool, MaxPool


@dataclasses.dataclass
class Context:
    rngs: nnx.Rngs
    path: str = ""
    channels_last: bool = False     # Flatten receives (N, *spatial, C) feature maps

    def unsupported(self, m, reason: str):
        return UnsupportedModuleError(type(m).__name__, self.path, reason)


BUILDERS: dict[type, callable] = {}


def builder(*types):
    def register(fn):
        for t in types:
            BUILDERS[t] = fn
        return fn
    return register


def find_builder(cls: type):
    """The builder of `cls` or of its nearest torch base, unless `cls` overrides that base's forward."""
    for base in cls.__mro__:
        if base in BUILDERS:
            return BUILDERS[base] if cls.forward is base.forward else None
    return None


def abstract(cls, *args, **kwargs):
    """`cls(*args, **kwargs)` built without drawing random weights; every variable is filled afterwards."""
    return nnx.eval_shape(lambda: cls(*args, **kwargs, rngs=nnx.Rngs(0)))


def _dtype(m):
    w = getattr(m, "weight", None)
    return jax_dtype(w.dtype if w is not None else None)


def _bias(m) -> bool:
    return getattr(m, "bias", None) is not None


@builder(nn.Linear)
def linear(m, ctx):
    return abstract(nnx.Linear, m.in_features, m.out_features, use_bias=_bias(m), param_dtype=_dtype(m))


def _conv_pads(m):
    if m.padding == "valid":
        return [(0, 0)] * len(m.kernel_size)
    if m.padding == "same":
        totals = [d * (k - 1) for k, d in zip(m.kernel_size, m.dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in m.padding]


_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


@builder(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(m, ctx):
    pads = _conv_pads(m)
    common = dict(strides=m.stride, kernel_dilation=m.dilation, feature_group_count=m.groups,
                  use_bias=_bias(m), param_dtype=_dtype(m))
    args = (m.in_channels, m.out_channels, m.kernel_size)
    if m.padding_mode == "zeros":
        return abstract(nnx.Conv, *args, padding=pads, **common)
    flax_same = [(d * (k - 1) // 2, (d * (k - 1) + 1) // 2) for k, d in zip(m.kernel_size, m.dilation)]
    if m.padding_mode in ("reflect", "circular") and pads == flax_same:   # Flax's own modes pad exactly so
        return abstract(nnx.Conv, *args, padding=m.padding_mode.upper(), **common)
    return abstract(M.Conv, *args, pad_width=pads, padding_mode=_PAD_MODES[m.padding_mode], **common)


@builder(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose(m, ctx):
    if m.groups != 1:
        raise ctx.unsupported(m, f"groups={m.groups} (nnx.ConvTranspose has no feature groups)")
    # torch's output is the stride-dilated input convolved with the flipped kernel, padded by
    # d·(k-1) - padding on the left and that plus output_padding on the right.
    pads = [(d * (k - 1) - p, d * (k - 1) - p + op)
            for k, d, p, op in zip(m.kernel_size, m.dilation, m.padding, m.output_padding)]
    return abstract(nnx.ConvTranspose, m.in_channels, m.out_channels, m.kernel_size, strides=m.stride,
                    padding=pads, kernel_dilation=m.dilation, use_bias=_bias(m), param_dtype=_dtype(m))


@builder(nn.Embedding)
def embedding(m, ctx):
    if m.max_norm is not None or m.scale_grad_by_freq:
        raise ctx.unsupported(m, "max_norm / scale_grad_by_freq have no NNX equivalent")
    return abstract(M.Embed, m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx, param_dtype=_dtype(m))


def _trailing(shape):
    axes = tuple(range(-len(shape), 0))
    return math.prod(shape), axes


@builder(nn.LayerNorm)
def layer_norm(m, ctx):
    n, axes = _trailing(m.normalized_shape)
    return abstract(nnx.LayerNorm, n, epsilon=m.eps, use_bias=_bias(m), use_scale=m.weight is not None,
                    reduction_axes=axes, feature_axes=axes, use_fast_variance=False, param_dtype=_dtype(m))


@builder(nn.RMSNorm)
def rms_norm(m, ctx):
    n, axes = _trailing(m.normalized_shape)
    eps = float(jax.numpy.finfo(_dtype(m)).eps) if m.eps is None else m.eps   # torch: eps of the input dtype
    return abstract(nnx.RMSNorm, n, epsilon=eps, use_scale=m.weight is not None, reduction_axes=axes,
                    feature_axes=axes, use_fast_variance=False, param_dtype=_dtype(m))


@builder(nn.GroupNorm)
def group_norm(m, ctx):
    return abstract(nnx.GroupNorm, m.num_channels, m.num_groups, epsilon=m.eps, use_bias=m.affine,
                    use_scale=m.affine, use_fast_variance=False, param_dtype=_dtype(m))


@builder(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm(m, ctx):
    momentum = None if m.momentum is None else 1.0 - m.momentum       # torch 0.1 ⇔ Flax decay 0.9
    return abstract(M.BatchNorm, m.num_features, momentum=momentum, track_running_stats=m.track_running_stats,
                    epsilon=m.eps, use_bias=m.affine, use_scale=m.affine, use_running_average=not m.training,
                    param_dtype=_dtype(m))


_DROPOUT_BROADCAST = {nn.Dropout: (), nn.Dropout1d: (1,), nn.Dropout2d: (1, 2), nn.Dropout3d: (1, 2, 3)}


@builder(*_DROPOUT_BROADCAST)
def dropout(m, ctx):
    dims = _DROPOUT_BROADCAST[next(t for t in type(m).__mro__ if t in _DROPOUT_BROADCAST)]
    return nnx.Dropout(m.p, broadcast_dims=dims, deterministic=not m.training, rngs=ctx.rngs)


@builder(nn.MultiheadAttention)
def multihead_attention(m, ctx):
    if m.bias_k is not None or m.add_zero_attn:
        raise ctx.unsupported(m, "add_bias_kv / add_zero_attn have no nnx.MultiHeadAttention equivalent")
    if m.kdim != m.vdim:
        raise ctx.unsupported(m, f"kdim={m.kdim} != vdim={m.vdim} (nnx.MultiHeadAttention has one in_kv_features)")
    mha = abstract(nnx.MultiHeadAttention, m.num_heads, m.embed_dim, m.embed_dim, m.embed_dim,
                   in_kv_features=m.kdim, dropout_rate=m.dropout, broadcast_dropout=False,
                   use_bias=m.in_proj_bias is not None, decode=False, deterministic=not m.training,
                   param_dtype=_dtype(m))
    if m.dropout > 0:
        mha.rngs = ctx.rngs.dropout.fork()
    return mha


@builder(nn.PReLU)
def prelu(m, ctx):
    module = nnx.eval_shape(lambda: M.PReLU(param_dtype=_dtype(m)))
    module.channels_last = ctx.channels_last
    return module


@builder(nn.Flatten)
def flatten(m, ctx):
    return M.Flatten(m.start_dim, m.end_dim, channels_last=ctx.channels_last)


@builder(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
def max_pool(m, ctx):
    if m.return_indices:
        raise ctx.unsupported(m, "return_indices=True")
    return MaxPool(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


@builder(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def avg_pool(m, ctx):
    return AvgPool(m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                   getattr(m, "divisor_override", None))


@builder(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
         nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
def adaptive_pool(m, ctx):
    if getattr(m, "return_indices", False):
        raise ctx.unsupported(m, "return_indices=True")
    return AdaptivePool(m.output_size, "avg" if "Avg" in type(m).__name__ else "max")


# torch activation module → (function, its settings read from the module)
ACTIVATIONS = {
    nn.Identity: (jax.nn.identity, lambda m: {}),
    nn.ReLU: (jax.nn.relu, lambda m: {}),
    nn.ReLU6: (jax.nn.relu6, lambda m: {}),
    nn.LeakyReLU: (jax.nn.leaky_relu, lambda m: {"negative_slope": m.negative_slope}),
    nn.ELU: (jax.nn.elu, lambda m: {"alpha": m.alpha}),
    nn.CELU: (jax.nn.celu, lambda m: {"alpha": m.alpha}),
    nn.SELU: (jax.nn.selu, lambda m: {}),
    nn.GELU: (jax.nn.gelu, lambda m: {"approximate": m.approximate == "tanh"}),   # jax's default is tanh
    nn.SiLU: (jax.nn.silu, lambda m: {}),
    nn.Mish: (M.mish, lambda m: {}),
    nn.Sigmoid: (jax.nn.sigmoid, lambda m: {}),
    nn.LogSigmoid: (jax.nn.log_sigmoid, lambda m: {}),
    nn.Tanh: (jax.numpy.tanh, lambda m: {}),
    nn.Tanhshrink: (M.tanhshrink, lambda m: {}),
    nn.Softsign: (jax.nn.soft_sign, lambda m: {}),
    nn.Softplus: (M.softplus, lambda m: {"beta": m.beta, "threshold": m.threshold}),
    nn.Hardswish: (jax.nn.hard_swish, lambda m: {}),
    nn.Hardsigmoid: (jax.nn.hard_sigmoid, lambda m: {}),
    nn.Hardtanh: (M.hardtanh, lambda m: {"min_val": m.min_val, "max_val": m.max_val}),
    nn.Softshrink: (M.softshrink, lambda m: {"lambd": m.lambd}),
    nn.Hardshrink: (M.hardshrink, lambda m: {"lambd": m.lambd}),
    nn.Threshold: (M.threshold, lambda m: {"threshold": m.threshold, "value": m.value}),
    nn.Softmax: (jax.nn.softmax, lambda m: {"axis": m.dim}),
    nn.LogSoftmax: (jax.nn.log_softmax, lambda m: {"axis": m.dim}),
    nn.Softmin: (M.softmin, lambda m: {"axis": m.dim}),
    nn.GLU: (jax.nn.glu, lambda m: {"axis": m.dim}),
}


@builder(*ACTIVATIONS)
def activation(m, ctx):
    fn, settings = ACTIVATIONS[next(t for t in type(m).__mro__ if t in ACTIVATIONS)]
    kwargs = settings(m)
    if kwargs.get("axis", 0) is None:
        raise ctx.unsupported(m, "dim=None (implicit softmax dim)")
    return M.Activation(fn, channels_last=ctx.channels_last, **kwargs)

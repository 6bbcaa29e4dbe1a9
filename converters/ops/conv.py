"""Convolution with torch's NC... layouts passed as dimension numbers (no transposes)."""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax

from converters.ops.common import aten, dot_precision
from converters.registry import lowering

_SPATIAL = "DHW"
# XLA:CPU's grouped convolution is slow, its weight gradient above all (groups=4: 9x; 32 groups of 8
# channels: 3.4 s against 16 ms as plain convs), so on CPU grouped convs take one of three plain paths:
MAX_SHIFT_TAPS = 64         # depthwise with at most this many kernel taps: a sum of shifted products
                            # (any group count: 8 channels 3x3, 32x8x32x32 fwd+bwd: 5 ms vs 28 split)
DENSE_MAX_FLOPS = 1e8       # tiny ones: one plain conv with a block-diagonal kernel (fewer, larger ops)
SPLIT_GROUPS = 64           # the rest, up to this many groups: one plain conv per group


def _dimension_numbers(nd: int):
    s = _SPATIAL[-nd:] if nd <= 3 else "".join(chr(ord("a") + i) for i in range(nd))
    return lax.ConvDimensionNumbers(*lax.conv_dimension_numbers(
        (1,) * (nd + 2), (1,) * (nd + 2), ("NC" + s, "OI" + s, "NC" + s)))


def _tuple(v, n):
    return tuple(v) * n if len(v) == 1 else tuple(v)


@lowering(aten.convolution.default)
def convolution(x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
    nd = w.ndim - 2
    stride, padding, dilation = _tuple(stride, nd), _tuple(padding, nd), _tuple(dilation, nd)
    dn = _dimension_numbers(nd)
    # low-precision floats accumulate in fp32 and round once, bias included, as torch's kernels do
    acc = jnp.float32 if x.dtype in (jnp.bfloat16, jnp.float16) else None
    with dot_precision(x, w):
        y = _conv(x, w, stride, padding, dilation, transposed, output_padding, groups, dn, nd, acc)
    if bias is not None:
        y = y + bias.reshape((1, -1) + (1,) * nd).astype(y.dtype)
    return y.astype(x.dtype)


def _conv(x, w, stride, padding, dilation, transposed, output_padding, groups, dn, nd, acc):
    if groups > 1 and jax.default_backend() == "cpu":   # GPUs keep the fused grouped kernel
        if not transposed and x.shape[1] == groups and math.prod(w.shape[2:]) <= MAX_SHIFT_TAPS:
            return _depthwise_taps(x, w, stride, padding, dilation, acc)
        if not transposed and groups * _conv_flops(x, w, stride) <= DENSE_MAX_FLOPS:
            return _conv(x, _block_diagonal(w, groups), stride, padding, dilation, False, output_padding, 1, dn,
                         nd, acc)
        if groups <= SPLIT_GROUPS:
            xs, ws = jnp.split(x, groups, axis=1), jnp.split(w, groups, axis=0)
            return jnp.concatenate([_conv(a, b, stride, padding, dilation, transposed, output_padding, 1, dn, nd,
                                          acc) for a, b in zip(xs, ws)], axis=1)
    if not transposed:
        y = lax.conv_general_dilated(x, w, stride, [(p, p) for p in padding], rhs_dilation=dilation,
                                     dimension_numbers=dn, feature_group_count=groups, preferred_element_type=acc)
    else:
        y = _conv_transpose(x, w, stride, padding, dilation, _tuple(output_padding, nd), groups, dn, acc)
    return y


def _conv_flops(x, w, stride) -> float:
    """Forward FLOPs of a (grouped) convolution, output size estimated as input size / stride
    (infinite for symbolic shapes: they take the split path)."""
    if not all(isinstance(d, int) for d in x.shape):
        return math.inf
    return 2.0 * math.prod(w.shape) * x.shape[0] * math.prod(x.shape[2:]) / math.prod(stride)


def _block_diagonal(w_OIk, groups):
    """A grouped kernel (O, I/g, k...) as the dense (O, I, k...) kernel that is zero between groups; its
    gradient flows back to the group blocks only. E.g. a 4-group 16-channel 3x3 conv on 64x16x16x16:
    fwd+bwd 5.6 ms against 10.9 ms as 4 plain convs."""
    o, ig = w_OIk.shape[:2]
    k = w_OIk.shape[2:]
    w_gaik = w_OIk.reshape((groups, o // groups, ig) + k)
    eye = jnp.eye(groups, dtype=w_OIk.dtype).reshape((groups, 1, groups, 1) + (1,) * len(k))
    return (w_gaik[:, :, None] * eye).reshape((o, groups * ig) + k)


def _depthwise_taps(x_NC, w_O1k, stride, padding, dilation, acc):
    """Depthwise conv (one input channel per group, channel multiplier O/C) as a sum over kernel taps
    of strided slices times per-channel weights: elementwise work XLA fuses, 3-4x faster on CPU than
    its grouped-convolution path, forward and backward."""
    dt = acc or x_NC.dtype
    n, c = x_NC.shape[:2]
    out_ch, k = w_O1k.shape[0], w_O1k.shape[2:]
    nd = len(k)
    x = jnp.pad(x_NC.astype(dt), [(0, 0), (0, 0)] + [(p, p) for p in padding])
    if out_ch != c:                           # output channel o reads input channel o // multiplier
        x = jnp.repeat(x, out_ch // c, axis=1)
    out_sp = [(size - d * (kk - 1) - 1) // s + 1 for size, kk, s, d in zip(x.shape[2:], k, stride, dilation)]
    w = w_O1k.astype(dt)
    y = None
    for tap in itertools.product(*(range(kk) for kk in k)):
        start = [t * d for t, d in zip(tap, dilation)]
        stop = [b + (o - 1) * s + 1 for b, o, s in zip(start, out_sp, stride)]
        piece = lax.slice(x, [0, 0] + start, [n, out_ch] + stop, [1, 1] + list(stride))
        term = piece * w[(slice(None), 0) + tap].reshape((1, out_ch) + (1,) * nd)
        y = term if y is None else y + term
    return y


def _conv_transpose(x, w_IOk, stride, padding, dilation, output_padding, groups, dn, acc):
    """Transposed conv = dilated-input conv with the kernel flipped and (in, out) swapped per group."""
    cin, cout_g = w_IOk.shape[:2]
    k = w_IOk.shape[2:]
    w = w_IOk.reshape((groups, cin // groups, cout_g) + k).swapaxes(1, 2).reshape((groups * cout_g, cin // groups) + k)
    w = jnp.flip(w, axis=tuple(range(2, w.ndim)))
    pads = [(d * (kk - 1) - p, d * (kk - 1) - p + op) for kk, p, d, op in zip(k, padding, dilation, output_padding)]
    return lax.conv_general_dilated(x, w, (1,) * len(k), pads, lhs_dilation=stride, rhs_dilation=dilation,
                                    dimension_numbers=dn, feature_group_count=groups, preferred_element_type=acc)

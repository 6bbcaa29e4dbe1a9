"""Fake quantization (quantization-aware training): torch's CPU kernels' arithmetic, straight-through
gradients.

Each value is quantized as torch does it in float32 (`inv_scale = 1/scale`, round half to even,
clamp to [quant_min, quant_max], back to `(q - zero_point) * scale`), so outputs match torch bit for
bit (within an ulp for floating zero points, where torch multiplies in double); the gradient w.r.t. the
input is the incoming gradient where the value fell inside the range and 0 outside (torch's `mask`);
scales and zero points get none, as in torch's derivatives for these ops.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from converters.ops.common import aten
from converters.registry import lowering


def _fake_quant(x, scale, zero_point, quant_min, quant_max):
    """(fake-quantized x, mask); scale/zero_point broadcast against x. An integer zero point is added
    after rounding, a floating one before (torch's two per-channel kernels)."""
    scale = lax.stop_gradient(jnp.asarray(scale, jnp.float32))
    zp = lax.stop_gradient(jnp.asarray(zero_point))
    xs = lax.stop_gradient(x).astype(jnp.float32) * (jnp.float32(1) / scale)
    float_zp, zp = jnp.issubdtype(zp.dtype, jnp.floating), zp.astype(jnp.float32)
    q = jnp.round(zp + xs) if float_zp else zp + jnp.round(xs)
    mask = (q >= quant_min) & (q <= quant_max)
    fq = ((jnp.clip(q, quant_min, quant_max) - zp) * scale).astype(x.dtype)
    # straight-through: value fq, derivative w.r.t. x the mask (x - x is exactly 0)
    return fq + (x - lax.stop_gradient(x)) * mask.astype(x.dtype), mask


def _channel_shape(x, axis):
    return [-1 if d == axis % x.ndim else 1 for d in range(x.ndim)]


@lowering(aten.fake_quantize_per_tensor_affine_cachemask.default)
def fake_quantize_per_tensor(x, scale, zero_point, quant_min, quant_max):
    return _fake_quant(x, jnp.float32(scale), jnp.int32(zero_point), quant_min, quant_max)


@lowering(aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams.default)
def fake_quantize_per_tensor_qparams(x, scale, zero_point, fake_quant_enabled, quant_min, quant_max):
    """Scale/zero point as 1-element tensors (observer buffers); `fake_quant_enabled` == 0 passes x through."""
    fq, mask = _fake_quant(x, scale.reshape(()), zero_point.reshape(()).astype(jnp.int32), quant_min, quant_max)
    on = fake_quant_enabled.reshape(()) != 0
    return jnp.where(on, fq, x), jnp.where(on, mask, True)


@lowering(aten.fake_quantize_per_channel_affine_cachemask.default)
def fake_quantize_per_channel(x, scale_C, zero_point_C, axis, quant_min, quant_max):
    shape = _channel_shape(x, axis)
    return _fake_quant(x, scale_C.reshape(shape), zero_point_C.reshape(shape), quant_min, quant_max)


_SMALL_SCALE = 6.1e-5   # fbgemm / quant_utils SMALL_SCALE_THRESHOLD


def _choose_qparams(mn, mx, quant_min: int, quant_max: int, symmetric: bool):
    """torch's ChooseQuantizationParams (fbgemm) elementwise over min/max arrays, in float32 (torch
    computes the scale in double and rounds it to float: equal, or one ulp apart)."""
    n = quant_max - quant_min
    if symmetric:
        sym_qmin, sym_qmax = -(n // 2 + 1), n // 2
        both = (mn < 0) & (mx > 0)
        max_scale = jnp.maximum(jnp.abs(mn / sym_qmin), jnp.abs(mx / sym_qmax))
        mn, mx = jnp.where(both, max_scale * sym_qmin, mn), jnp.where(both, max_scale * sym_qmax, mx)
    mn, mx = jnp.minimum(mn, 0.0), jnp.maximum(mx, 0.0)
    scale = (mx - mn) / n
    scale = jnp.where((scale == 0) | jnp.isinf(1 / scale), jnp.float32(0.1), scale)
    small = scale < _SMALL_SCALE
    amp = _SMALL_SCALE / scale
    mn, mx = (jnp.where(small & (mn != 0) & (mx == 0), -_SMALL_SCALE * n, jnp.where(small & (mn != 0), mn * amp, mn)),
              jnp.where(small & (mn == 0), _SMALL_SCALE * n, jnp.where(small & (mx != 0), mx * amp, mx)))
    scale = jnp.where(small, jnp.float32(_SMALL_SCALE), scale)
    from_min, from_max = quant_min - mn / scale, quant_max - mx / scale
    err_min, err_max = abs(quant_min) - jnp.abs(mn / scale), abs(quant_max) - jnp.abs(mx / scale)
    zp = jnp.where(err_min < err_max, from_min, from_max)
    if symmetric:
        zp = jnp.where((mn < 0) & (mx > 0), jnp.float32((quant_min + quant_max) / 2), zp)
    zp = jnp.where(zp < quant_min, quant_min, jnp.where(zp > quant_max, quant_max, jnp.round(zp)))
    return scale, zp


@lowering(aten._fused_moving_avg_obs_fq_helper_functional.default)
def fused_moving_avg_obs_fake_quant(x, observer_on, fake_quant_on, running_min, running_max, scale, zero_point,
                                    averaging_const, quant_min, quant_max, ch_axis, per_row_fake_quant=False,
                                    symmetric_quant=False):
    """torch.ao's default QAT fake-quantizer (FusedMovingAvgObsFakeQuantize): a moving-average min/max
    observer (when `observer_on`), quantization parameters from it and fake quantization (when
    `fake_quant_on`); returns (output, mask, running_min, running_max, scale, zero_point)."""
    if running_min.size == 0:
        raise ValueError("the observer's running_min is empty: torch sizes per-channel observers on their first "
                         "call; run the prepared model once in torch before converting it")
    xs = lax.stop_gradient(x).astype(jnp.float32)
    if per_row_fake_quant:
        rows = jnp.moveaxis(xs, ch_axis, 0).reshape(xs.shape[ch_axis], -1)
        cur_min, cur_max = jnp.min(rows, axis=1), jnp.max(rows, axis=1)
    else:
        cur_min, cur_max = jnp.min(xs).reshape(running_min.shape), jnp.max(xs).reshape(running_max.shape)
    c = jnp.float32(averaging_const)
    observe = observer_on.reshape(-1)[0] != 0
    new_min = jnp.where(jnp.isinf(running_min), cur_min, running_min + c * (cur_min - running_min))
    new_max = jnp.where(jnp.isinf(running_max), cur_max, running_max + c * (cur_max - running_max))
    run_min, run_max = jnp.where(observe, new_min, running_min), jnp.where(observe, new_max, running_max)

    on = fake_quant_on.reshape(-1)[0] != 0
    new_scale, new_zp = _choose_qparams(run_min.astype(jnp.float32), run_max.astype(jnp.float32),
                                        quant_min, quant_max, symmetric_quant)
    zp_int = new_zp.astype(jnp.int32)
    if per_row_fake_quant:
        shape = _channel_shape(x, ch_axis)
        fq, mask = _fake_quant(x, new_scale.reshape(shape), zp_int.reshape(shape), quant_min, quant_max)
    else:
        fq, mask = _fake_quant(x, new_scale.reshape(()), zp_int.reshape(()), quant_min, quant_max)
    return (jnp.where(on, fq, x), jnp.where(on, mask, True), run_min, run_max,
            jnp.where(on, new_scale.reshape(scale.shape), scale).astype(scale.dtype),
            jnp.where(on, zp_int.reshape(zero_point.shape).astype(zero_point.dtype), zero_point))

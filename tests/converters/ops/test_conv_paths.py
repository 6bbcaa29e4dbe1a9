"""The CPU paths for grouped convolutions (one plain conv per group; tiny ones as one conv with a
block-diagonal kernel; depthwise as a sum over kernel taps), checked forward and backward against torch
for each configuration they take."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.dtypes import jax_dtype
from converters.ops import conv as conv_ops
from tests.conftest import GRAD_TOL, assert_close, full_only, rel_err

# (x shape, w shape, stride, padding, dilation, transposed, output_padding, groups, expected path)
CASES = {
    "split g4 dilated": ((8, 64, 24, 24), (64, 16, 3, 3), (1, 1), (2, 2), (2, 2), False, (0, 0), 4, "split"),
    "split g2 stride 1d": ((3, 256, 700), (128, 128, 5), (2,), (1,), (1,), False, (0,), 2, "split"),
    "split g32 of 8 channels": ((4, 256, 14, 14), (256, 8, 3, 3), (1, 1), (1, 1), (1, 1), False, (0, 0), 32, "split"),
    "dense g4 dilated": ((4, 16, 12, 12), (16, 4, 3, 3), (1, 1), (2, 2), (2, 2), False, (0, 0), 4, "dense"),
    "dense g2 stride 1d": ((3, 8, 20), (6, 4, 5), (2,), (1,), (1,), False, (0,), 2, "dense"),
    "dense g3 multiplier 3d": ((2, 6, 5, 6, 5), (9, 2, 3, 1, 3), (1, 2, 1), (1, 0, 1), (1, 1, 2), False, (0, 0, 0), 3,
                               "dense"),
    "split g4 transposed": ((2, 8, 7, 7), (8, 3, 3, 3), (2, 2), (1, 1), (1, 1), True, (1, 0), 4, "split"),
    "depthwise 3x3": ((4, 32, 10, 10), (32, 1, 3, 3), (1, 1), (1, 1), (1, 1), False, (0, 0), 32, "taps"),
    "depthwise x2 stride dil": ((2, 24, 13, 11), (48, 1, 3, 3), (2, 2), (2, 1), (2, 1), False, (0, 0), 24, "taps"),
    "depthwise g8 (was split)": ((4, 8, 16, 16), (8, 1, 3, 3), (1, 1), (1, 1), (1, 1), False, (0, 0), 8, "taps"),
    "depthwise 7x7": ((2, 20, 14, 14), (20, 1, 7, 7), (1, 1), (3, 3), (1, 1), False, (0, 0), 20, "taps"),
    "depthwise 1d": ((3, 40, 33), (40, 1, 5), (1,), (2,), (1,), False, (0,), 40, "taps"),
    "depthwise 3d": ((2, 18, 6, 6, 6), (18, 1, 3, 3, 3), (1, 2, 1), (1, 1, 1), (1, 1, 1), False, (0, 0, 0), 18, "taps"),
    "g32 of 2 channels": ((2, 64, 8, 8), (64, 2, 3, 3), (1, 1), (1, 1), (1, 1), False, (0, 0), 32, "dense"),
    "g128 of 2 channels": ((2, 256, 16, 16), (256, 2, 3, 3), (1, 1), (1, 1), (1, 1), False, (0, 0), 128, "grouped"),
}


def _torch_conv(x, w, b, cfg):
    _, _, stride, padding, dilation, transposed, out_pad, groups, _ = cfg
    return torch.ops.aten.convolution(x, w, b, list(stride), list(padding), list(dilation), transposed,
                                      list(out_pad), groups)


def _jax_conv(x, w, b, cfg):
    _, _, stride, padding, dilation, transposed, out_pad, groups, _ = cfg
    return conv_ops.convolution(x, w, b, list(stride), list(padding), list(dilation), transposed, list(out_pad),
                                groups)


def _path(cfg) -> str:
    jaxpr = str(jax.make_jaxpr(lambda x, w: _jax_conv(x, w, None, cfg))(
        jnp.zeros(cfg[0], jnp.float32), jnp.zeros(cfg[1], jnp.float32)))
    if "conv_general_dilated" not in jaxpr:
        return "taps"
    groups = cfg[7]
    if f"feature_group_count={groups}" in jaxpr:
        return "grouped"
    return "dense" if jaxpr.count("conv_general_dilated") == 1 else "split"


@pytest.mark.parametrize("name", [pytest.param(n, marks=full_only) if n in ("depthwise 7x7", "depthwise 3d") else n
                                  for n in CASES])
def test_forward_and_grads_match_torch(name):
    cfg = CASES[name]
    assert _path(cfg) == cfg[-1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg[0], generator=gen, requires_grad=True)
    w = torch.randn(cfg[1], generator=gen, requires_grad=True)
    b_len = cfg[1][1] * cfg[7] if cfg[5] else cfg[1][0]
    b = torch.randn(b_len, generator=gen, requires_grad=True)
    y = _torch_conv(x, w, b, cfg)
    cot = torch.randn(y.shape, generator=gen)
    (y * cot).sum().backward()
    xj, wj, bj, cj = (jnp.asarray(t.detach().numpy()) for t in (x, w, b, cot))
    assert_close(_jax_conv(xj, wj, bj, cfg), y.detach(), what=f"{name} forward")
    grads = jax.grad(lambda x, w, b: jnp.sum(_jax_conv(x, w, b, cfg) * cj), argnums=(0, 1, 2))(xj, wj, bj)
    for g, ref, what in zip(grads, (x.grad, w.grad, b.grad), ("input", "weight", "bias")):
        err = rel_err(g, ref)
        assert err <= GRAD_TOL, f"{name} grad {what}: relative error {err:.3g}"


@pytest.mark.parametrize("name", ["split g4 dilated", "depthwise x2 stride dil"])
def test_bf16_accumulates_in_fp32_like_torch(name):
    cfg = CASES[name]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(cfg[0], generator=gen).bfloat16()
    w = torch.randn(cfg[1], generator=gen).bfloat16()
    ref = _torch_conv(x, w, None, cfg)
    got = _jax_conv(jnp.asarray(x.float().numpy()).astype(jnp.bfloat16),
                    jnp.asarray(w.float().numpy()).astype(jnp.bfloat16), None, cfg)
    assert got.dtype == jax_dtype(torch.bfloat16)
    diff = np.abs(np.asarray(got, np.float32) - ref.float().numpy())
    # both round one fp32 accumulation to bf16: at most one bf16 ulp apart (summation order)
    assert float(diff.max()) <= float(np.abs(ref.float().numpy()).max()) * 2 ** -7

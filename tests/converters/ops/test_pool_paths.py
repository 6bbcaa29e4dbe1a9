"""Max pooling's two paths (windows that tile the input as reshaped blocks; any other geometry through
reduce_window, its argmax and a gather), each checked against torch's kernel: values, the returned
indices, and gradients, on inputs with ties, -inf rows and nans where torch's pick is defined."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters.ops import pool as pool_ops

# (input shape, kernel, stride, padding, dilation, ceil_mode, expected path)
CASES = {
    "2x2": ((4, 3, 8, 8), (2, 2), (), (0, 0), (1, 1), False, "tiles"),
    "2x2 odd sizes cropped": ((2, 3, 9, 11), (2, 2), (2, 2), (0, 0), (1, 1), False, "tiles"),
    "2x2 padded ceil": ((2, 3, 9, 11), (2, 2), (2, 2), (1, 1), (1, 1), True, "tiles"),
    "2x3 mixed padding": ((2, 2, 7, 7), (2, 3), (2, 3), (1, 1), (1, 1), True, "tiles"),
    "3x3 stride 3 padded": ((2, 3, 8, 8), (3, 3), (3, 3), (1, 1), (1, 1), True, "tiles"),
    "unbatched": ((3, 8, 8), (2, 2), (2, 2), (0, 0), (1, 1), False, "tiles"),
    "3d 2x2x2": ((2, 3, 6, 8, 4), (2, 2, 2), (), (0, 0, 0), (1, 1, 1), False, "tiles"),
    "3x3 stride 2 (overlapping)": ((2, 3, 9, 11), (3, 3), (2, 2), (1, 1), (1, 1), False, "windows"),
    "dilated": ((2, 3, 9, 11), (2, 2), (2, 2), (0, 0), (2, 2), True, "windows"),
    "stride larger than kernel": ((2, 3, 9, 11), (2, 2), (3, 3), (0, 0), (1, 1), False, "windows"),
}


def _jax_pool(x, cfg):
    _, kernel, stride, padding, dilation, ceil, _ = cfg
    fn = pool_ops.max_pool2d_with_indices if len(kernel) == 2 else pool_ops.max_pool3d_with_indices
    return fn(x, kernel, stride, padding, dilation, ceil)


def _path(cfg) -> str:
    jaxpr = str(jax.make_jaxpr(lambda x: _jax_pool(x, cfg))(jnp.zeros(cfg[0], jnp.float32)))
    return "windows" if "reduce_window" in jaxpr else "tiles"


def _input(shape, dtype):
    g = torch.Generator().manual_seed(0)
    if not dtype.is_floating_point:
        return torch.randint(-4, 4, shape, generator=g, dtype=dtype)      # many ties
    x = (torch.randn(shape, generator=g) * 2).round().to(dtype)           # ties within windows
    flat = x.view(-1)
    flat[:5] = float("-inf")                                               # whole windows of -inf
    flat[20] = flat[21] = flat[23] = float("nan")                          # torch picks the last nan
    return x


OTHER_DTYPES = [(name, dtype) for name in ("2x2 padded ceil", "3x3 stride 2 (overlapping)")
                for dtype in (torch.bfloat16, torch.int32)]


@pytest.mark.parametrize("name,dtype", [(name, torch.float32) for name in CASES] + OTHER_DTYPES)
def test_max_pool_paths_match_torch(name, dtype):
    cfg = CASES[name]
    assert _path(cfg) == cfg[-1]
    x = _input(cfg[0], dtype)
    pool = torch.nn.functional.max_pool2d if len(cfg[1]) == 2 else torch.nn.functional.max_pool3d
    xr = x.clone().requires_grad_(dtype.is_floating_point)
    y, idx = pool(xr, cfg[1], cfg[2] or None, cfg[3], cfg[4], ceil_mode=cfg[5], return_indices=True)
    xj = jnp.asarray(x.float().numpy()).astype(jnp.bfloat16) if dtype == torch.bfloat16 else jnp.asarray(x.numpy())
    yj, ij = jax.jit(lambda a: _jax_pool(a, cfg))(xj)
    np.testing.assert_array_equal(np.asarray(yj, np.float64), y.detach().double().numpy())
    np.testing.assert_array_equal(np.asarray(ij), idx.numpy())
    if dtype.is_floating_point:
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        y.backward(g)
        gj = jax.jit(jax.grad(lambda a: jnp.sum(_jax_pool(a, cfg)[0].astype(jnp.float32)
                                                * jnp.asarray(g.float().numpy()))))(xj)
        np.testing.assert_array_equal(np.asarray(gj, np.float64), xr.grad.double().numpy())

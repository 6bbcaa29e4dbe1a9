"""The matmul floor counts exactly the FLOPs of the dots and convolutions a step runs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from benchmarks.roofline import dot_gflop


def _gflop(fn, *args):
    return dot_gflop(jax.jit(fn).trace(*args).jaxpr)


@pytest.mark.parametrize("m,k,n", [(64, 128, 256), (3, 7, 5)])
def test_matmul_forward_and_gradients(m, k, n):
    x, w = jnp.ones((m, k)), jnp.ones((n, k))
    fwd = 2 * m * k * n / 1e9
    loss = lambda x, w: jnp.sum(x @ w.T)  # noqa: E731
    assert _gflop(loss, x, w) == pytest.approx(fwd)
    assert _gflop(jax.value_and_grad(loss, argnums=(0, 1)), x, w) == pytest.approx(3 * fwd)


def test_batched_dot():
    q, k = jnp.ones((2, 4, 16, 8)), jnp.ones((2, 4, 32, 8))
    assert _gflop(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k), q, k) == pytest.approx(2 * 2 * 4 * 16 * 32 * 8 / 1e9)


@pytest.mark.parametrize("groups", [1, 4])
def test_grouped_convolution_and_its_gradients(groups):
    x, w = jnp.ones((8, 16, 12, 12)), jnp.ones((32, 16 // groups, 3, 3))
    conv = lambda x, w: jnp.sum(lax.conv_general_dilated(x, w, (1, 1), "SAME",  # noqa: E731
                                                         feature_group_count=groups))
    fwd = 2 * 8 * 32 * 12 * 12 * (16 // groups) * 9 / 1e9
    assert _gflop(conv, x, w) == pytest.approx(fwd)
    assert _gflop(jax.value_and_grad(conv, argnums=(0, 1)), x, w) == pytest.approx(3 * fwd)


def test_scan_body_counts_per_iteration():
    w = jnp.ones((16, 16))
    body = lambda c, _: (c @ w, None)  # noqa: E731
    assert _gflop(lambda c: lax.scan(body, c, None, length=5)[0], jnp.ones((4, 16))) == \
        pytest.approx(5 * 2 * 4 * 16 * 16 / 1e9)

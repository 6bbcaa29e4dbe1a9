"""The matmul floor counts exactly the FLOPs of the dots and convolutions a step runs."""
from __future__ import annotations

import jax
import numpy as np
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


@pytest.mark.parametrize("dims", [(((1,), (1,)), ((), ())), (((0,), (0,)), ((), ())),
                                  (((3,), (3,)), ((0, 1), (0, 1))), (((1,), (2,)), ((0,), (1,)))])
def test_einsum_spec_matches_dot_general(dims):
    """The torch side of dot_seconds multiplies exactly what lax.dot_general does."""
    import numpy as np
    import torch
    from benchmarks.roofline import _einsum_spec
    shapes = {(((1,), (1,)), ((), ())): ((6, 5), (4, 5)), (((0,), (0,)), ((), ())): ((5, 6), (5, 4)),
              (((3,), (3,)), ((0, 1), (0, 1))): ((2, 3, 4, 5), (2, 3, 6, 5)),
              (((1,), (2,)), ((0,), (1,))): ((3, 5, 4), (2, 3, 5))}
    ls, rs = shapes[dims]
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(ls).astype(np.float32), rng.standard_normal(rs).astype(np.float32)
    want = np.asarray(lax.dot_general(a, b, dims, precision="highest"))
    got = torch.einsum(_einsum_spec(len(ls), len(rs), dims), torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_dot_shapes_counts_each_dot_of_a_gradient():
    from benchmarks.roofline import dot_shapes
    x, w = jnp.ones((8, 4)), jnp.ones((6, 4))
    jaxpr = jax.jit(jax.grad(lambda x, w: jnp.sum(x @ w.T), argnums=(0, 1))).trace(x, w).jaxpr
    shapes = dot_shapes(jaxpr)
    assert sum(shapes.values()) == 3
    assert sum(2 * np.prod(ls) * np.prod(rs) / np.prod([rs[i] for i in d[0][1]]) * n
               for (ls, rs, d), n in shapes.items()) / 1e9 == pytest.approx(dot_gflop(jaxpr))

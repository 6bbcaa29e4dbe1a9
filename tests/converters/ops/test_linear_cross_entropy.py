"""torch's batch-chunked linear_cross_entropy lowering keeps torch's memory bound: at most one chunk of
logits alive, in the forward pass and in the gradient (values vs torch are in test_nn_zoo.py)."""
import jax
import jax.numpy as jnp
import pytest

from converters.ops.loss import MEAN, _linear_ce

N, F, C = 2048, 64, 8192            # the logits: 64 MiB in fp32


@pytest.mark.parametrize("chunk", [128, 300])
def test_chunked_gradient_holds_one_chunk_of_logits(chunk):
    x, w = jnp.zeros((N, F)), jnp.zeros((C, F))
    t = jnp.zeros((N,), jnp.int32)

    def temp_bytes(c):
        grad = jax.jit(jax.grad(lambda x, w: _linear_ce(x, w, t, None, None, MEAN, -100, 0.0, c), argnums=(0, 1)))
        return grad.lower(x, w).compile().memory_analysis().temp_size_in_bytes

    logits = N * C * 4
    whole, chunked = temp_bytes(0), temp_bytes(chunk)
    assert whole >= logits                       # unchunked: the logits (and their gradient) are materialised
    # one chunk's logits and their gradient, plus input/weight-sized accumulators
    assert chunked <= 2 * chunk * C * 4 + 2 * 4 * (N * F + C * F), (chunked, whole)
    assert chunked < logits / 2

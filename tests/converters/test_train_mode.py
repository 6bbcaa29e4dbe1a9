"""Train-mode semantics: dropout draws from the explicit key; BatchNorm updates its buffers purely."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bridge
from bridge.tree import flatten
from converters.dtypes import to_jax
from tests.conftest import assert_close


class Dropper(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.drop = torch.nn.Dropout(p)

    def forward(self, x):
        return self.drop(x)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_uses_rng_and_rate_matches_p(p):
    x = torch.ones(64, 256)
    jm = bridge.convert(Dropper(p), (x,), train=True)
    assert jm.needs_rng
    f = jax.jit(lambda key: jm.apply(jm.params, to_jax(x), rng=key))
    a, a2, b = f(jax.random.key(0)), f(jax.random.key(0)), f(jax.random.key(1))
    np.testing.assert_array_equal(a, a2)                 # same key, same mask
    assert not np.array_equal(np.asarray(a) == 0, np.asarray(b) == 0)  # other key, other mask
    dropped = float(jnp.mean(a == 0))
    assert abs(dropped - p) < 4 * np.sqrt(p * (1 - p) / x.numel()) + 1e-3, dropped
    kept = np.asarray(a)[np.asarray(a) != 0]
    np.testing.assert_allclose(kept, 1 / (1 - p), rtol=1e-6)  # survivors scaled like torch


def test_dropout_needs_a_key_and_eval_mode_needs_none():
    x = torch.ones(4, 8)
    jm = bridge.convert(Dropper(0.5), (x,), train=True)
    with pytest.raises(bridge.errors.MissingRngError, match="dropout"):
        jm(to_jax(x))
    jm_eval = bridge.convert(Dropper(0.5), (x,), train=False)
    assert not jm_eval.needs_rng
    np.testing.assert_array_equal(jm_eval(to_jax(x)), x.numpy())


class ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8, momentum=0.3)
        self.bn1d = torch.nn.BatchNorm1d(8)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.bn1d(y.mean(dim=(2, 3)))


def test_batchnorm_train_mode_updates_buffers_like_torch():
    torch.manual_seed(0)
    m = ConvBN()
    xs = [torch.randn(4, 3, 8, 8) * 2 + 1 for _ in range(3)]
    jm = bridge.convert(m, (xs[0],), train=True, dynamic="batch")
    assert jm.mutates_buffers and not jm.needs_rng
    step = jax.jit(lambda params, buffers, x: jm.apply(params, x, buffers=buffers, return_buffers=True))
    buffers = jm.buffers
    m.train()
    for x in xs:
        ref = m(x)
        out, buffers = step(jm.params, buffers, to_jax(x))
        assert_close(out, ref, what="train-mode output")
    for name, ref in m.named_buffers():
        got = flatten(buffers)[name]
        if ref.dtype == torch.int64:
            assert int(got) == int(ref) == 3, name          # num_batches_tracked counts steps
        else:
            assert_close(got, ref, what=name)
    # the stored buffers are untouched: apply is pure
    assert int(flatten(jm.buffers)["bn.num_batches_tracked"]) == 0


def test_batchnorm_train_mode_gradients():
    torch.manual_seed(0)
    m = ConvBN().train()
    x = torch.randn(4, 3, 8, 8)
    jm = bridge.convert(m, (x,), train=True)
    w = torch.randn(4, 8)
    (m(x) * w).sum().backward()
    grads = jax.grad(lambda p: jnp.sum(jm.apply(p, to_jax(x)) * to_jax(w)))(jm.params)
    scale = max(float(p.grad.abs().max()) for p in m.parameters())
    for name, p in m.named_parameters():
        # conv.bias feeds a train-mode BatchNorm: its true gradient is 0 and both sides' are rounding noise
        # (whose size depends on how XLA's backend schedules the sums), so it is held to the global scale;
        # every other error is taken against the larger of its own scale and 1e-2 of the global one
        denom = scale if name == "conv.bias" else max(float(p.grad.abs().max()), 1e-2 * scale)
        err = float(np.max(np.abs(np.asarray(flatten(grads)[name]) - p.grad.numpy()))) / denom
        assert err < 1e-4, (name, err)


def test_bf16_graph_keeps_fp32_running_statistics():
    """convert(compute_dtype=bf16) from an fp32 module: the running statistics stay fp32 and are updated in
    fp32, as torch's BatchNorm does with bf16 activations (autocast); rounded to bf16 each step, a running
    variance's steps of ~3e-3 would vanish (bf16's spacing at 1.0 is 7.8e-3)."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)).train()
    x = torch.randn(64, 4)
    x = (x - x.mean(0)) / x.std(0) * 1.03 ** 0.5   # unbiased batch variance 1.03
    jm = bridge.convert(module, (x,), train=True, compute_dtype=torch.bfloat16)
    params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), jm.params)
    step = jax.jit(lambda b: jm.apply(params16, to_jax(x), buffers=b, return_buffers=True)[1])
    buffers, ref = jm.buffers, torch.nn.BatchNorm1d(4).train()
    for _ in range(20):
        buffers = step(buffers)
        ref(x.bfloat16())
    for name in ("running_mean", "running_var"):
        got = buffers["0"][name]
        assert got.dtype == jnp.float32
        assert_close(got, getattr(ref, name), what=name)
    assert float(buffers["0"]["running_var"].min()) > 1.02

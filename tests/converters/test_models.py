"""Model parity with torch eager: forward under jit, gradients vs autograd, shapes, vmap, retrace."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bridge
from converters.dtypes import to_jax
from tests.conftest import GRAD_TOL, assert_close, full_only, rel_err
from tests.models import MODELS

B, S = 2, 8


def _pick(out, key):
    return out if key is None else (out[key] if isinstance(out, dict) else getattr(out, key))


@functools.lru_cache(maxsize=None)
def converted(name: str):
    torch.manual_seed(0)
    case = MODELS[name]()
    case.module.eval()
    args, kwargs = case.inputs(B, S)
    return case, bridge.convert(case.module, args, kwargs, dynamic=case.dynamic)


def _jax_inputs(args, kwargs):
    return tuple(to_jax(a) for a in args), {k: to_jax(v) for k, v in kwargs.items()}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("batch,seq", [(2, 8), (3, 12)])
def test_forward_parity_under_jit(name, batch, seq):
    case, jm = converted(name)
    args, kwargs = case.inputs(batch, seq)
    with torch.no_grad():
        ref = _pick(case.module(*args, **kwargs), case.output_key)
    jargs, jkw = _jax_inputs(args, kwargs)
    got = _pick(jax.jit(jm.apply)(jm.params, *jargs, **jkw), case.output_key)
    assert got.dtype == jnp.float32
    assert_close(got, ref, what=f"{name} ({batch}x{seq})")


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_match_autograd(name):
    case, jm = converted(name)
    args, kwargs = case.inputs(B, S)
    module = case.module
    module.zero_grad()
    out = _pick(module(*args, **kwargs), case.output_key)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    ref = {n: p.grad for n, p in module.named_parameters()}

    jargs, jkw = _jax_inputs(args, kwargs)
    w = to_jax(weights)

    def loss(params):
        return jnp.sum(_pick(jm.apply(params, *jargs, **jkw), case.output_key) * w)

    grads = jax.jit(jax.grad(loss))(jm.params)
    flat = bridge.tree.flatten(grads)
    assert set(flat) == set(ref), "gradient tree must have exactly the named_parameters() names"
    for n, g in flat.items():
        r = ref[n] if ref[n] is not None else torch.zeros(g.shape)
        err = rel_err(g, r) if float(r.abs().max()) > 1e-8 else float(np.abs(np.asarray(g)).max())
        assert err <= GRAD_TOL, f"{name}: grad of {n} off by {err:.3g}"


@pytest.mark.parametrize("name", [pytest.param("gpt2", marks=full_only), "bert", "cnn"])
def test_vmap_over_examples(name):
    case, jm = converted(name)
    args, kwargs = case.inputs(B, S)
    with torch.no_grad():
        ref = _pick(case.module(*args, **kwargs), case.output_key)
    jargs, jkw = _jax_inputs(args, kwargs)

    def one(a, kw):  # each example as a batch of one
        a = tuple(x[None] for x in a)
        kw = {k: v[None] for k, v in kw.items()}
        return _pick(jm.apply(jm.params, *a, **kw), case.output_key)[0]

    got = jax.vmap(one)(jargs, jkw)
    assert_close(got, ref, what=f"{name} vmap")


def test_no_retrace_on_same_shapes():
    case, jm = converted("gpt2")
    traces = []

    def fwd(params, ids):
        traces.append(1)
        return jm.apply(params, input_ids=ids)["logits"]

    f = jax.jit(fwd)
    ids = to_jax(case.inputs(B, S)[1]["input_ids"])
    f(jm.params, ids).block_until_ready()
    f(jm.params, ids + 1).block_until_ready()
    assert len(traces) == 1
    f(jm.params, jnp.concatenate([ids, ids], 0)).block_until_ready()
    assert len(traces) == 2

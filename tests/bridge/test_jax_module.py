"""JaxModule: torch names as the pytree spine, tied weights as one leaf, lifted state, purity."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bridge
from bridge.errors import InputError, StateError
from bridge.tree import flatten, nest
from converters.dtypes import to_jax
from tests.conftest import assert_close
from tests.models import MODELS


class WithState(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6)
        self.out = torch.nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight                      # tied
        self.register_buffer("scale", torch.tensor(3.0), persistent=False)
        self.register_buffer("offset", torch.arange(6, dtype=torch.float32))

    def forward(self, ids):
        h = self.emb(ids) * self.scale + self.offset
        return self.out(h) + torch.tensor([1.0])           # a lifted constant


def test_state_names_match_torch_and_tied_weights_are_one_leaf():
    m = WithState()
    jm = bridge.convert(m, (torch.randint(0, 10, (2, 5)),))
    assert list(flatten(jm.params)) == [n for n, _ in m.named_parameters()] == ["emb.weight"]
    bufs = flatten(jm.buffers)
    assert {"scale", "offset"} <= set(bufs)
    assert any(k not in ("scale", "offset") for k in bufs), "lifted constant lives in buffers"
    assert jm.meta.non_persistent >= {"scale"} and "offset" not in jm.meta.non_persistent
    assert jm.meta.aliases["out.weight"] == "emb.weight"


def test_tied_gradients_add_up_and_training_keeps_them_tied():
    torch.manual_seed(0)
    m = WithState()
    ids = torch.randint(0, 10, (2, 5))
    jm = bridge.convert(m, (ids,))
    m(ids).square().mean().backward()
    grad = jax.grad(lambda p: jnp.mean(jnp.square(jm.apply(p, to_jax(ids)))))(jm.params)
    assert_close(grad["emb"]["weight"], m.emb.weight.grad, what="tied grad")  # both uses summed
    new = jax.tree.map(lambda p, g: p - 0.1 * g, jm.params, grad)
    with torch.no_grad():
        m.emb.weight -= 0.1 * m.emb.weight.grad
    assert_close(jm.apply(new, to_jax(ids)), m(ids).detach(), what="after a tied update")


def test_jax_module_is_a_pytree_and_apply_is_pure():
    case = MODELS["mlp"]()
    x = torch.randn(4, 32)
    jm = bridge.convert(case.module, (x,), dynamic="batch")
    doubled = jax.tree.map(lambda a: a * 2, jm)
    assert isinstance(doubled, bridge.JaxModule) and doubled.program is jm.program
    out = jax.jit(lambda m, x: m(x))(jm, to_jax(x))
    assert_close(out, case.module(x).detach(), what="jit over the module pytree")
    assert_close(jm.replace(params=jm.params)(to_jax(x)), case.module(x).detach(), what="replace")


def test_missing_state_is_named():
    case = MODELS["mlp"]()
    jm = bridge.convert(case.module, (torch.randn(2, 32),))
    params = flatten(jm.params)
    del params["net.0.bias"]
    with pytest.raises(StateError, match="net.0.bias"):
        jm.apply(nest(params), np.zeros((2, 32), np.float32))


def test_nest_and_flatten_are_inverse():
    flat = {"a.b.0.weight": 1, "a.b.0.bias": 2, "c": 3}
    assert nest(flat) == {"a": {"b": {"0": {"weight": 1, "bias": 2}}}, "c": 3}
    assert flatten(nest(flat)) == flat


class Frozen(torch.nn.Module):
    """A requires_grad=False parameter (a fixed sinusoidal table, a frozen layer): torch gives it no gradient."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(5, 4), requires_grad=False)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x + self.table)


def test_frozen_parameters_get_no_gradient():
    m = Frozen()
    x = torch.randn(3, 5, 4)
    jm = bridge.convert(m, (x,))
    assert jm.meta.frozen == {"table"} and "table" in flatten(jm.params)
    m(x).square().sum().backward()
    grad = jax.grad(lambda p: jnp.sum(jnp.square(jm.apply(p, to_jax(x)))))(jm.params)
    assert m.table.grad is None and float(jnp.abs(grad["table"]).max()) == 0.0
    assert_close(grad["lin"]["weight"], m.lin.weight.grad, what="trainable grad")


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, scale: float = 2.0, flag: bool = True, mode: str = "sum"):
        h = self.lin(x) * scale
        return (h.sum(-1) if mode == "sum" else h.amax(-1)) * (1.0 if flag else -1.0)


def test_python_values_given_at_convert_may_be_left_out_of_calls():
    """Flags given to convert (kwargs, or trailing positional values) are the program's: a call may leave
    them out and runs with them, as torch does with the same flags; only tensors are required."""
    torch.manual_seed(0)
    model, x = _Scaled(), torch.randn(3, 4)
    with torch.no_grad():
        want = model(x, 3.0, mode="max", flag=False)
    by_name = bridge.convert(model, (x,), {"scale": 3.0, "flag": False, "mode": "max"})
    assert_close(by_name(x), want)
    assert_close(jax.jit(by_name.apply)(by_name.params, to_jax(x)), want)
    assert_close(by_name(x, flag=False), want)
    positional = bridge.convert(model, (x, 3.0, False), {"mode": "max"})
    assert_close(positional(x), want)
    assert_close(positional(x, 3.0), want)
    with pytest.raises(InputError, match="input 'flag' is True, but the model was captured with False"):
        positional(x, 3.0, True)


@pytest.mark.parametrize("changed", [{"scale": 5.0}, {"flag": False}, {"mode": "max"}, {"scale": float("nan")}])
def test_python_values_are_part_of_the_capture(changed):
    """torch.export bakes Python arguments into the graph: the same values run, another value raises
    instead of being ignored."""
    torch.manual_seed(0)
    model, x = _Scaled(), torch.randn(3, 4)
    kwargs = {"scale": 3.0, "flag": True, "mode": "sum"}
    jm = bridge.convert(model, (x,), kwargs)
    with torch.no_grad():
        assert_close(jm(x, **kwargs), model(x, **kwargs))
    with pytest.raises(InputError, match=f"input '{next(iter(changed))}' is .*, but the model was captured with"):
        jm(x, **{**kwargs, **changed})
    if changed.get("scale") != changed.get("scale"):     # a nan captured is matched by a nan given
        nan = bridge.convert(model, (x,), {**kwargs, **changed})
        assert np.isnan(np.asarray(nan(x, **{**kwargs, **changed}))).all()


class _Consts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x, scale: float = 1.0):
        return {"y": self.lin(x) * scale, "n": 3, "tag": "ok", "none": None}


def test_calling_the_module_compiles_once_per_input_signature(monkeypatch):
    """jm(...) runs apply under jit (one trace per shape and Python values) and accepts torch, numpy and JAX
    inputs; Python values the program returns come back as they are."""
    torch.manual_seed(0)
    model, x = _Consts(), torch.randn(2, 4)
    jm = bridge.convert(model, (x,), {"scale": 2.0})
    traces = []
    run = jm.program.run
    monkeypatch.setattr(jm.program, "run", lambda *a, **k: traces.append(1) or run(*a, **k))
    with torch.no_grad():
        want = model(x, scale=2.0)["y"]
    for given in (x, x.numpy(), to_jax(x)):
        out = jm(given)
        assert_close(out["y"], want)
        assert (out["n"], out["tag"], out["none"]) == (3, "ok", None)
    assert len(traces) == 1
    jm(x, scale=2.0)               # the captured value given explicitly: another signature, same program
    assert len(traces) == 2
    with pytest.raises(InputError, match="input 'scale' is 3.0, but the model was captured with 2.0"):
        jm(x, scale=3.0)

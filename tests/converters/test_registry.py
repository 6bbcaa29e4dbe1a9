"""The op registry: duplicates raise; unsupported ops fail conversion once, listing all of them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import bridge
from bridge.errors import DuplicateLoweringError, UnsupportedOpsError
from converters.registry import lookup, lowering, registered


# ops defined through torch.library.Library with a CPU kernel: opaque to bridge (a torch.library.custom_op
# would be traced through its Python implementation, see tests/converters/ops/test_custom_ops.py)
_LIB = torch.library.Library("bridge_test_lib", "DEF")
for _name, _fn in (("mystery", lambda x: x * 2), ("enigma", lambda x: x + 1)):
    _LIB.define(f"{_name}(Tensor x) -> Tensor")
    _LIB.impl(_name, _fn, "CPU")
    torch.library.register_fake(f"bridge_test_lib::{_name}", lambda x: torch.empty_like(x), lib=_LIB)
mystery, enigma = torch.ops.bridge_test_lib.mystery, torch.ops.bridge_test_lib.enigma


class UsesUnknownOps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        a = mystery(self.lin(x))   # first use
        b = mystery(a)             # second use
        return enigma(b).relu()


def test_unsupported_ops_listed_once_with_counts_and_source_lines():
    with pytest.raises(UnsupportedOpsError) as info:
        bridge.convert(UsesUnknownOps(), (torch.randn(2, 4),))
    err = info.value
    assert set(err.missing) == {"bridge_test_lib.mystery.default", "bridge_test_lib.enigma.default"}
    count, sources = err.missing["bridge_test_lib.mystery.default"]
    assert count == 2 and len(sources) == 2
    assert all("test_registry.py" in s for s in sources)
    msg = str(err)
    assert "mystery(self.lin(x))" in msg and "enigma(b).relu()" in msg and "(used 2x)" in msg
    assert "aten.relu" not in msg and "aten.linear" not in msg  # only the missing ones
    assert "bridge.register_lowering" in msg


def test_duplicate_registration_raises():
    relu = torch.ops.aten.relu.default
    before = lookup(relu)
    with pytest.raises(DuplicateLoweringError, match="aten.relu.default"):
        @lowering(relu)
        def another_relu(x):
            return x
    assert lookup(relu) is before


def test_registry_keys_are_overloads():
    for target in registered():
        assert isinstance(target, torch._ops.OpOverload) or callable(target)


@torch.library.custom_op("bridge_test::imported_later", mutates_args=())
def imported_later(x: torch.Tensor) -> torch.Tensor:
    return x * 3


@imported_later.register_fake
def _(x):
    return torch.empty_like(x)


def test_library_ops_lowered_by_name():
    from converters.registry import lowering_by_name

    @lowering_by_name("bridge_test.imported_later.default")
    def triple(x):
        return x * 3

    with pytest.raises(DuplicateLoweringError, match="imported_later"):
        lowering_by_name("bridge_test.imported_later.default")(triple)
    assert lookup(torch.ops.bridge_test.imported_later.default).fn is triple
    assert torch.ops.bridge_test.imported_later.default not in registered()   # keys stay overloads
    m = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    jm = bridge.convert(_Calls(m, imported_later), (x,))
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(jm(x.numpy())), (m(x) * 3).numpy(), rtol=1e-6)


class _Calls(torch.nn.Module):
    def __init__(self, inner, op):
        super().__init__()
        self.inner, self.op = inner, op

    def forward(self, x):
        return self.op(self.inner(x))


def test_register_lowering_of_an_op_with_a_builtin_lowering_raises_or_overrides(monkeypatch):
    """bridge.register_lowering for an op bridge already lowers: refused naming the op (never a silent
    no-op); override=True replaces the built-in, and conversions use it."""
    import jax.numpy as jnp
    from converters import registry
    relu = torch.ops.aten.relu.default
    before = lookup(relu)
    for op in (relu, "aten::relu", torch.ops.aten.relu):
        with pytest.raises(DuplicateLoweringError, match=r"aten\.relu\.default already has a lowering.*override=True"):
            bridge.register_lowering(op, lambda x: jnp.zeros_like(x))
    assert lookup(relu) is before
    monkeypatch.setattr(registry, "_OVERRIDES", {})

    @bridge.register_lowering(relu, override=True)
    def doubled_relu(x):
        return jnp.maximum(x, 0) * 2

    assert lookup(relu).fn is doubled_relu
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(bridge.convert(m, (x,))(x)), 2 * m(x).numpy(), rtol=1e-6)

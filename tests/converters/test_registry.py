"""The op registry: duplicates raise; unsupported ops fail conversion once, listing all of them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import bridge
from bridge.errors import DuplicateLoweringError, UnsupportedOpsError
from converters.registry import lookup, lowering, registered


@torch.library.custom_op("bridge_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("bridge_test::enigma", mutates_args=())
def enigma(x: torch.Tensor) -> torch.Tensor:
    return x + 1


@enigma.register_fake
def _(x):
    return torch.empty_like(x)


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
    assert set(err.missing) == {"bridge_test.mystery.default", "bridge_test.enigma.default"}
    count, sources = err.missing["bridge_test.mystery.default"]
    assert count == 2 and len(sources) == 2
    assert all("test_registry.py" in s for s in sources)
    msg = str(err)
    assert "mystery(self.lin(x))" in msg and "enigma(b).relu()" in msg and "(used 2x)" in msg
    assert "aten.relu" not in msg and "aten.linear" not in msg  # only the missing ones


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

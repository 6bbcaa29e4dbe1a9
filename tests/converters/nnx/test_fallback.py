"""Modules without a structural rule: an error naming type and path, or the graph path as an NNX module."""
import pytest
import torch
from torch import nn

import bridge
from bridge.errors import UnsupportedModuleError
from converters.nnx import render
from converters.nnx.graph_module import GraphModule
from tests.converters.nnx.helpers import assert_round_trip, check_parity


class Scale(nn.Module):
    """A custom leaf with its own parameter: no rule can know what its forward does."""

    def __init__(self, n):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 2.0, n))
        self.register_buffer("shift", torch.full((n,), 0.25))

    def forward(self, x):
        return torch.tanh(x * self.gain) + self.shift


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.body = nn.Sequential(nn.ReLU(), Scale(6), nn.Linear(6, 2))

    def forward(self, x):
        return self.body(self.inp(x))


def test_unsupported_module_names_type_and_path():
    with pytest.raises(UnsupportedModuleError, match=r"Scale at 'body\.1'") as e:
        bridge.to_flax(Net())
    assert (e.value.module_type, e.value.path) == ("Scale", "body.1")
    with pytest.raises(UnsupportedModuleError, match=r"LSTM at 'rnn'"):
        bridge.to_flax(nn.ModuleDict({"rnn": nn.LSTM(3, 4)}))


def test_unsupported_setting_is_named():
    with pytest.raises(UnsupportedModuleError, match=r"MultiheadAttention at '0'.*add_bias_kv"):
        bridge.to_flax(nn.Sequential(nn.MultiheadAttention(8, 2, add_bias_kv=True)))


def test_overridden_forward_is_not_taken_for_its_base():
    class Doubling(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(UnsupportedModuleError, match="Doubling"):
        bridge.to_flax(Doubling(2, 2))


def test_mirror_without_forward_raises_on_call():
    fm = bridge.to_flax(_Plain())
    assert type(fm).__name__ == "_Plain"
    with pytest.raises(UnsupportedModuleError, match=r"_Plain at '<root>'.*forwards"):
        fm(torch.zeros(1, 3).numpy())


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        return self.a(x)


def test_graph_fallback_wraps_the_submodule():
    model = Net()
    x = torch.randn(4, 3)
    fm = bridge.to_flax(model, fallback="graph", example_inputs=(x,))
    assert isinstance(fm.body.layers[1], GraphModule)
    y = fm.body(fm.inp(x.numpy()))
    check_parity("graph fallback", y, model(x).detach())
    assert_round_trip(model, fm)
    model.load_state_dict(bridge.from_flax(fm), strict=True)


def test_graph_fallback_needs_the_submodule_to_run():
    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(2, 2), Scale(2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(UnsupportedModuleError, match=r"Scale at 'unused'.*never called"):
        bridge.to_flax(Skips(), fallback="graph", example_inputs=(torch.zeros(1, 2),))


def test_docs_render_the_layout_table():
    with open("docs/flax.md") as f:
        assert render() in f.read()

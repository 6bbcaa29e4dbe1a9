"""A submodule converted through the graph path (`bridge.convert`), wrapped as an NNX module.

Used by `to_flax(..., fallback="graph")` for modules without a structural rule. Its variables keep
torch names and torch layouts (`params['0.weight']` is (out, in)), and so do its inputs and outputs
(NCHW stays NCHW): it computes exactly the torch submodule's forward as captured on the example inputs.
"""
from __future__ import annotations

from collections import OrderedDict

from flax import nnx

from bridge.jax_module import JaxModule
from bridge.state import to_state_dict
from bridge.tree import flatten, nest


class _Program:
    """Static holder of the captured program (a JaxModule without its arrays)."""

    def __init__(self, jm: JaxModule):
        self.jm = jm

    def __repr__(self):
        return f"<{len(self.jm.program.nodes)} ops>"


class GraphModule(nnx.Module):
    """`bridge.convert(submodule, example inputs)` as an NNX module: `params` are `nnx.Param`s,
    `buffers` `nnx.BatchStat`s, both keyed by torch name; `__call__` runs the pure `apply`."""

    def __init__(self, jm: JaxModule, torch_type: str, *, rngs: nnx.Rngs):
        self.torch_type = torch_type
        self.program = _Program(jm.replace(params={}, buffers={}))
        self.params = nnx.Dict({k: nnx.Param(v) for k, v in flatten(jm.params).items()})
        self.buffers = nnx.Dict({k: nnx.BatchStat(v) for k, v in flatten(jm.buffers).items()})
        self.rngs = rngs.graph.fork() if jm.needs_rng else nnx.data(None)

    def _jm(self) -> JaxModule:
        return self.program.jm.replace(params=nest({k: v[...] for k, v in self.params.items()}),
                                       buffers=nest({k: v[...] for k, v in self.buffers.items()}))

    def __call__(self, *args, **kwargs):
        jm = self._jm()
        rng = None if self.rngs is None else self.rngs()
        if not jm.mutates_buffers:
            return jm.apply(jm.params, *args, buffers=jm.buffers, rng=rng, **kwargs)
        out, new = jm.apply(jm.params, *args, buffers=jm.buffers, rng=rng, return_buffers=True, **kwargs)
        for name, value in flatten(new).items():
            self.buffers[name][...] = value
        return out

    def state_dict(self, prefix: str = "") -> "OrderedDict":
        """The torch state_dict of the wrapped submodule (torch's keys, order and dtypes), under `prefix`."""
        return OrderedDict((prefix + k, v) for k, v in to_state_dict(self._jm()).items())

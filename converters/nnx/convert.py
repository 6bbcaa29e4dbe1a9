"""`to_flax` / `from_flax`: torch module tree ⇄ NNX module tree, weights through the layout table.

Example:
    >>> fm = bridge.to_flax(torch_model)                  # nnx.Module, same child names as torch
    >>> y = fm(x_nhwc)                                    # channels-last, Flax layouts
    >>> torch_model.load_state_dict(bridge.from_flax(fm))  # bit-exact round trip
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Mapping

import jax
import numpy as np
import torch
from flax import nnx
from torch import nn

from bridge.errors import UnsupportedModuleError
from converters.dtypes import to_jax, to_torch
from converters.nnx import layouts
from converters.nnx.graph_module import GraphModule
from converters.nnx.layers import Context, find_builder
from converters.nnx.modules import Dict, Mirror, NamedSequential

# layers whose activations are feature maps: with any of them in the model, Flatten expects NHWC input
_SPATIAL = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
            nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
            nn.BatchNorm2d, nn.BatchNorm3d)


def to_flax(module: nn.Module, *, forwards: Mapping[type, Callable] | None = None, fallback: str = "error",
            example_inputs: tuple = (), example_kwargs: dict | None = None,
            rngs: nnx.Rngs | None = None) -> nnx.Module:
    """An `nnx.Module` tree mirroring `module`'s, with its weights in Flax layouts.

    Layers with a rule (see `converters.nnx.layouts.TABLE`) become stock NNX layers (or thin
    subclasses where torch semantics differ); Sequential / ModuleList / ModuleDict become
    `nnx.Sequential` / `nnx.List` / `nnx.Dict`. Activations are channels-last (NHWC), sequences
    batch-first. A custom module (user class with children and no own tensors) is mirrored: same
    child names; its `__call__` is `forwards[type](self, *args)`, which you write after torch's forward.

    Args:
      forwards: {torch class: fn(self, *args)} — the NNX forward of custom classes.
      fallback: "error" raises `UnsupportedModuleError` (type and path) for a module without a rule;
        "graph" converts it with `bridge.convert` instead (torch layouts), capturing its inputs by
        running `module(*example_inputs, **example_kwargs)` once (state and RNG restored after).
      rngs: streams for dropout (default `nnx.Rngs(0)`).
    """
    if fallback not in ("error", "graph"):
        raise ValueError(f"fallback must be 'error' or 'graph', got {fallback!r}")
    forwards = dict(forwards or {})
    ctx = Context(rngs or nnx.Rngs(0), channels_last=any(isinstance(m, _SPATIAL) for m in module.modules()))
    unsupported = [(p, m) for p, m in _walk_kinds(module, forwards) if _kind(m, forwards) == "unsupported"]
    captured = {}
    if unsupported and fallback == "graph":
        captured = _capture_inputs(module, dict(unsupported), example_inputs, example_kwargs or {})
    return _build(module, "", ctx, forwards, captured)


def from_flax(module: nnx.Module) -> "OrderedDict[str, torch.Tensor]":
    """A torch state_dict of an NNX tree made by `to_flax` (or of the same layer types): the layout
    table's rules run backwards; a mirrored module's own variables keep their names and layouts."""
    out: OrderedDict = OrderedDict()
    _dump(module, "", out)
    return out


# -- the walk -----------------------------------------------------------------------------------------

def _kind(m: nn.Module, forwards) -> str:
    t = type(m)
    if t in forwards:
        return "mirror"
    if find_builder(t) is not None:
        return "rule"
    for container in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
        if isinstance(m, container) and t.forward is container.forward:
            return container.__name__
    own = next(m.named_parameters(recurse=False), None) or next(m.named_buffers(recurse=False), None)
    if not t.__module__.startswith("torch.") and own is None and next(m.children(), None) is not None:
        return "mirror"
    return "unsupported"


def _walk_kinds(m, forwards, path=""):
    yield path, m
    if _kind(m, forwards) in ("mirror", "Sequential", "ModuleList", "ModuleDict"):
        for name, child in _kids(m):
            yield from _walk_kinds(child, forwards, f"{path}.{name}" if path else name)


def _kids(m: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, child) of every registered name: a module registered twice (`self.b = self.a`,
    `Sequential(layer, layer)`) under each, as torch's forward and state_dict see it (named_children
    lists it once)."""
    return [(n, c) for n, c in m._modules.items() if c is not None]


def _build(m: nn.Module, path: str, ctx: Context, forwards, captured, built=None) -> nnx.Module:
    built = {} if built is None else built   # torch module id → its NNX module: shared stays shared
    if id(m) in built:
        return built[id(m)]
    built[id(m)] = out = _build_new(m, path, ctx, forwards, captured, built)
    return out


def _build_new(m: nn.Module, path: str, ctx: Context, forwards, captured, built) -> nnx.Module:
    kind = _kind(m, forwards)
    child = lambda name, c: _build(c, f"{path}.{name}" if path else name, ctx, forwards, captured,  # noqa: E731
                                   built)
    if kind == "rule":
        ctx.path = path
        flax = find_builder(type(m))(m, ctx)
        _load(flax, m, path)
        return flax
    if kind == "Sequential":
        names = [n for n, _ in _kids(m)]
        kids = [child(n, c) for n, c in _kids(m)]
        if names == [str(i) for i in range(len(names))]:
            return nnx.Sequential(*kids)
        return NamedSequential(dict(zip(names, kids)))
    if kind == "ModuleList":
        return nnx.List([child(n, c) for n, c in _kids(m)])
    if kind == "ModuleDict":
        return Dict({n: child(n, c) for n, c in _kids(m)})
    if kind == "mirror":
        names = [n for n, _ in m.named_parameters(recurse=False)] + [n for n, _ in m.named_buffers(recurse=False)]
        names += [n for n, _ in _kids(m)]
        out = _mirror_class(type(m), forwards.get(type(m)))(type(m).__name__, path, tuple(names))
        persistent = set(m.state_dict(keep_vars=True))
        for name, p in m.named_parameters(recurse=False):
            setattr(out, name, nnx.Param(to_jax(p)))
        for name, b in m.named_buffers(recurse=False):
            setattr(out, name, (nnx.BatchStat if name in persistent else nnx.Variable)(to_jax(b)))
        for name, c in _kids(m):
            setattr(out, name, child(name, c))
        return out
    if path in captured:
        import bridge
        args, kwargs = captured[path]
        return GraphModule(bridge.convert(m, args, kwargs, train=m.training), type(m).__name__, rngs=ctx.rngs)
    raise UnsupportedModuleError(type(m).__name__, path)


_MIRRORS: dict = {}


def _mirror_class(cls: type, forward: Callable | None) -> type:
    """An NNX class named like the torch class, with `forward` as its __call__ (one per pair)."""
    key = (cls, forward)
    if key not in _MIRRORS:
        body = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        if forward is not None:
            body["__call__"] = forward
        _MIRRORS[key] = type(cls.__name__, (Mirror,), body)
    return _MIRRORS[key]


def _get(node, path: str):
    for part in path.split("."):
        node = getattr(node, part, None)
    return node


def _load(flax: nnx.Module, m: nn.Module, path: str) -> None:
    """Fill `flax`'s variables from `m`'s tensors through the table; every tensor must have a rule."""
    state = m.state_dict(keep_vars=True)
    done = set()
    for row in layouts.rows_for_torch(type(m)):
        if row.name not in state:
            continue
        for p, value in zip(row.paths, row.to_flax(to_jax(state[row.name]), flax)):
            var = _get(flax, p)
            if not isinstance(var, nnx.Variable):
                raise UnsupportedModuleError(type(m).__name__, path, f"the NNX module has no variable {p!r}")
            var.set_value(value)
        done.add(row.name)
    if set(state) - done:
        raise UnsupportedModuleError(type(m).__name__, path, f"no layout rule for {sorted(set(state) - done)}")
    empty = [".".join(map(str, p)) for p, v in nnx.iter_graph(flax)
             if isinstance(v, nnx.Variable) and isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if empty:
        raise UnsupportedModuleError(type(m).__name__, path, f"NNX variables {empty} got no torch value")


def _children(node):
    """(name, value) in torch's order where to_flax recorded it (nnx.jit re-sets attributes sorted)."""
    if isinstance(node, nnx.Sequential):        # torch's Sequential children are '0', '1', ... here too
        return enumerate(node.layers)
    if isinstance(node, Dict):
        return ((k, node[k]) for k in node)
    if isinstance(node, Mirror):
        return ((k, getattr(node, k)) for k in node.torch_names)
    return ((k, v) for k, v in vars(node).items() if not k.startswith("_"))


def _dump(node, prefix: str, out: OrderedDict) -> None:
    rows = layouts.rows_for_flax(type(node))
    if rows:
        for row in rows:
            values = [_get(node, p) for p in row.paths]
            if any(v is None for v in values) or (row.when is not None and not row.when(node)):
                continue
            y = row.to_torch([v.get_value() for v in values], node)
            out[prefix + row.name] = to_torch(np.asarray(y), row.dtype)
        return
    if isinstance(node, GraphModule):
        out.update(node.state_dict(prefix))
        return
    for name, v in _children(node):
        if isinstance(v, nnx.Module):
            _dump(v, f"{prefix}{name}.", out)
        elif isinstance(v, (nnx.Param, nnx.BatchStat)):
            out[f"{prefix}{name}"] = to_torch(np.asarray(v.get_value()))


# -- capturing a submodule's inputs for the graph fallback ------------------------------------------

def _capture_inputs(module, targets: dict, args, kwargs) -> dict:
    """{path: (args, kwargs)} of each target's first call while running `module` once."""
    names = {id(m): p for p, m in targets.items()}
    seen, hooks = {}, []

    def hook(mod, a, kw):
        seen.setdefault(names[id(mod)], (tuple(a), dict(kw)))

    for m in targets.values():
        hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    buffers = dict(module.named_buffers())          # a train-mode run would move BatchNorm statistics
    saved = {k: b.clone() for k, b in buffers.items()}
    try:
        with torch.no_grad(), torch.random.fork_rng():
            module(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for k, b in buffers.items():
                b.copy_(saved[k])
    missing = [(p, type(m).__name__) for p, m in targets.items() if p not in seen]
    if missing:
        path, name = missing[0]
        raise UnsupportedModuleError(name, path, "fallback='graph' needs its inputs, but running the model on "
                                     "example_inputs never called it")
    return seen

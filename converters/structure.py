"""Rebuild torch output structures (TreeSpec) as JAX-friendly containers.

tuple/list stay tuple/list, dicts, `ModelOutput`-like classes and dataclasses become dicts, None stays None.

Example:
    >>> spec_structure(ep.call_spec.out_spec, [logits])   # {'logits': Array(...)}
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import torch
import torch.utils._pytree as torch_pytree


def spec_structure(spec, leaves: list) -> Any:
    return _build(spec, iter(leaves))


def children(spec) -> list:
    """A TreeSpec's child specs across torch versions."""
    return list(spec.children()) if hasattr(spec, "children") else list(spec.children_specs)


def _build(spec, it):
    if spec.is_leaf():
        return next(it)
    kids = [_build(c, it) for c in children(spec)]
    typ = spec.type
    if typ is None or typ is type(None):
        return None
    if typ in (tuple, list):
        return typ(kids)
    if isinstance(typ, type) and issubclass(typ, tuple) and hasattr(typ, "_fields"):
        return typ(*kids)
    if isinstance(spec.context, type) and issubclass(spec.context, tuple) and hasattr(spec.context, "_fields"):
        return spec.context(*kids)                          # torch's namedtuple node: the class is the context
    if dataclasses.is_dataclass(typ) and not issubclass(typ, dict):   # register_dataclass: [[set], [None]]
        given = dict(zip(spec.context[0], kids))
        return {f.name: given.get(f.name) for f in dataclasses.fields(typ) if f.init}
    if isinstance(spec.context, (list, tuple)) and len(spec.context) == len(kids):
        return dict(zip(spec.context, kids))
    if spec.context is not None and hasattr(spec.context, "__len__") and len(spec.context) == len(kids):
        return dict(zip(list(spec.context), kids))
    return tuple(kids)


def register_dataclasses(tree: Any) -> None:
    """Register the dataclass types in `tree` (a forward's output) as torch pytree nodes, so torch.export can
    flatten them (`ModelOutput` registers itself; a user's own `@dataclass` output does not)."""
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        if type(tree) not in torch_pytree.SUPPORTED_NODES:
            torch_pytree.register_dataclass(type(tree))
        for f in dataclasses.fields(tree):
            register_dataclasses(getattr(tree, f.name))
    elif isinstance(tree, (list, tuple)):
        for x in tree:
            register_dataclasses(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            register_dataclasses(x)


@contextlib.contextmanager
def registering_outputs(module: torch.nn.Module):
    """Non-strict export runs `module.forward` in Python: its output's dataclass types are registered as the
    forward returns, before torch.export flattens it."""
    own = module.__dict__.get("forward")
    forward = module.forward

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        out = forward(*args, **kwargs)
        register_dataclasses(out)
        return out

    module.forward = wrapped
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own

"""torch pytree structures (TreeSpec) as JAX-friendly containers, both ways.

tuple/list and NamedTuples stay, dicts, `ModelOutput`-like classes and dataclasses become dicts (OrderedDicts
for outputs, which keep their key order through jax.jit), None stays
None, registered objects (KV caches) become dicts of their tensor-holding attributes (converters/caches.py).
`spec_leaves` reads a user's JAX inputs in a spec's leaf order, by key, so dict order does not matter.

Example:
    >>> spec_structure(ep.call_spec.out_spec, [logits])   # {'logits': Array(...)}
    >>> spec_leaves(ep.call_spec.in_spec, ((ids,), {}))   # [ids]
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.utils._pytree as torch_pytree

from bridge.errors import InputError
from converters.caches import (check_state_numbers, fill, is_object_node, object_view, pairs, register_objects,
                               state_numbers)
from converters.dtypes import narrow, to_jax
from converters.packed import packed_inputs


def spec_structure(spec, leaves: list, ordered: bool = False) -> Any:
    """`leaves` in `spec`'s containers; `ordered=True` builds mappings as OrderedDicts (outputs: jax keeps an
    OrderedDict's key order through jit, where it sorts a dict's, and a ModelOutput is an OrderedDict)."""
    return _build(spec, iter(leaves), collections.OrderedDict if ordered else dict)


def children(spec) -> list:
    """A TreeSpec's child specs across torch versions."""
    return list(spec.children()) if hasattr(spec, "children") else list(spec.children_specs)


def _build(spec, it, mapping):
    if spec.is_leaf():
        return next(it)
    kids = [_build(c, it, mapping) for c in children(spec)]
    typ = spec.type
    layout = object_view(spec) if is_object_node(spec) else None
    if layout is not None:
        return fill(layout, kids)
    if typ is None or typ is type(None):
        return None
    if typ in (tuple, list):
        return typ(kids)
    if isinstance(typ, type) and issubclass(typ, tuple) and hasattr(typ, "_fields"):
        return typ(*kids)
    if isinstance(spec.context, type) and issubclass(spec.context, tuple) and hasattr(spec.context, "_fields"):
        return spec.context(*kids)                          # torch's namedtuple node: the class is the context
    names = _dataclass_fields(spec)
    if names is not None:
        given = dict(zip(names, kids))
        return mapping((f.name, given.get(f.name)) for f in dataclasses.fields(typ) if f.init)
    if isinstance(spec.context, (list, tuple)) and len(spec.context) == len(kids):
        return mapping(zip(spec.context, kids))
    if spec.context is not None and hasattr(spec.context, "__len__") and len(spec.context) == len(kids):
        return mapping(zip(list(spec.context), kids))
    return tuple(kids)


def _dataclass_fields(spec) -> list | None:
    """The field names of a dataclass node registered as register_dataclass does (context [set fields, None
    fields]); None for other nodes (a ModelOutput is a dict keyed by its set fields)."""
    if dataclasses.is_dataclass(spec.type) and not issubclass(spec.type, dict):
        return list(spec.context[0])
    return None


def spec_leaves(spec, value: Any, path: str = "inputs") -> list:
    """The leaves of `value` in `spec`'s order, read by key and position (the inverse of spec_structure);
    a mismatch raises ValueError naming the path."""
    if spec.is_leaf():
        return [value]
    typ, kids = spec.type, children(spec)
    if typ is None or typ is type(None):
        if value is not None:
            raise ValueError(f"{path}: expected None, got {type(value).__name__}")
        return []
    if is_object_node(spec):
        layout = object_view(spec)
        if layout is None:   # no JAX face: the object itself, flattened by its own registration
            leaves, got = torch_pytree.tree_flatten(value)
            if got != spec:
                raise ValueError(f"{path}: expected {spec}, got {got}")
            return leaves
        try:
            got = sorted(pairs(layout, value, path), key=lambda p: p[0])
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return [x for (i, v, p) in got for x in spec_leaves(kids[i], v, p)]
    names = _dataclass_fields(spec)
    if names is not None:
        value = value if isinstance(value, Mapping) else {n: getattr(value, n, None) for n in names}
        keys = names
    elif typ is dict or (isinstance(typ, type) and issubclass(typ, Mapping)):   # BatchEncoding, UserDict too
        keys = list(spec.context)
    else:   # tuple, list, NamedTuple
        if not isinstance(value, (list, tuple)) or len(value) != len(kids):
            raise ValueError(f"{path}: expected a {typ.__name__} of {len(kids)}, got {type(value).__name__}"
                             f"{f' of {len(value)}' if isinstance(value, (list, tuple)) else ''}")
        return [x for i, (k, v) in enumerate(zip(kids, value)) for x in spec_leaves(k, v, f"{path}[{i}]")]
    if not isinstance(value, Mapping) or not set(keys) <= set(value) or (typ is dict and set(value) != set(keys)):
        got = sorted(value) if isinstance(value, Mapping) else type(value).__name__
        raise ValueError(f"{path}: expected a dict with keys {keys}, got {got}")
    return [x for k, c in zip(keys, kids) for x in spec_leaves(c, value[k], f"{path}[{k!r}]")]


@contextlib.contextmanager
def patched_forward(module: torch.nn.Module, wrapper):
    """`module.forward` replaced by `wrapper(forward)` while active (an instance attribute, then removed)."""
    own = module.__dict__.get("forward")
    module.forward = wrapper(module.forward)
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def registering_outputs(module: torch.nn.Module):
    """Non-strict export runs `module.forward` in Python: its output's dataclass and cache types are registered
    as the forward returns, before torch.export flattens it, and a cache input whose Python numbers the
    forward changes is refused (see caches.check_state_numbers)."""
    def wrapper(forward):
        @functools.wraps(forward)
        def wrapped(*args, **kwargs):
            named = {**{f"args[{i}]": a for i, a in enumerate(args)}, **kwargs}
            before = state_numbers(named)
            out = forward(*args, **kwargs)
            check_state_numbers(before, state_numbers(named))
            register_objects(out)
            return out
        return wrapped
    return patched_forward(module, wrapper)


def input_leaf(x: Any) -> Any:
    """A torch tensor or numpy array given as an input, as a JAX array (64-bit values int32 cannot hold raise
    InputError); anything else as it is."""
    if isinstance(x, torch.Tensor):
        return to_jax(x, "an input", InputError)
    if isinstance(x, np.ndarray):
        return jnp.asarray(narrow(x, jax.dtypes.canonicalize_dtype(x.dtype), "an input", InputError))
    return x


def as_jax_inputs(tree: Any) -> Any:
    """A torch input structure in its JAX face: tensors become arrays, registered objects (KV caches)
    dicts of their tensors, a PackedSequence a PackedInput (padded batch, lengths), containers stay; what
    `jm.apply` takes, under jit too.

    Example:
        >>> cache = as_jax_inputs(static_cache)    # {'layers': [{'keys': Array, 'values': Array, ...}, ...]}
    """
    tree = packed_inputs(tree)
    register_objects(tree)
    leaves, spec = torch_pytree.tree_flatten(tree)
    return spec_structure(spec, [input_leaf(x) for x in leaves])

"""Stateful containers as inputs and outputs: Hugging Face KV caches and other registered pytree objects.

torch.export flattens only registered pytrees. Capture registers transformers' cache classes
(`DynamicCache`, `StaticCache`, their layers, model-specific `*Cache` classes) as nodes whose children are
the tensors inside them and whose context describes everything else. In JAX an object node is a dict of its
tensor-holding attributes, e.g. a cache is `{'layers': [{'keys': k, 'values': v}, ...]}`: the converted
model returns it and takes it back, so a decode step runs as a pure function.

Example:
    >>> decode = bridge.convert(lm, kwargs={"input_ids": ids, "past_key_values": cache}, dynamic="batch+seq")
    >>> out = decode(input_ids=nxt, past_key_values=out["past_key_values"])   # the cache prefill returned
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Mapping
from typing import Any
from unittest import mock

import torch
import torch.utils._pytree as torch_pytree


class _Leaf:
    """Stands for the i-th child while rebuilding an object node's layout."""

    def __init__(self, i: int):
        self.i = i


def _is_cache_class(cls: type) -> bool:
    cache_utils = sys.modules.get("transformers.cache_utils")
    base = getattr(cache_utils, "Cache", None)
    layer = getattr(cache_utils, "CacheLayerMixin", None)
    return (cls.__name__.endswith("Cache") or (base is not None and issubclass(cls, base))
            or (layer is not None and issubclass(cls, layer)))


def _describe(obj: Any, tensors: list, path: str = "", seen: frozenset = frozenset()) -> tuple:
    """A hashable description of `obj` with its tensors replaced by their index in `tensors`."""
    if id(obj) in seen:   # a back-reference: kept as it is
        return ("C", obj)
    seen = seen | {id(obj)}
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return ("T", len(tensors) - 1)
    if isinstance(obj, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise ValueError(f"cache attribute {path.lstrip('.')} is a Python number that follows the input's size "
                         f"({obj}); a JAX program cannot carry it: convert without dynamic shapes, or use a "
                         "cache that keeps its state in tensors (StaticCache)")
    if isinstance(obj, (list, tuple)):
        return (type(obj), tuple(_describe(x, tensors, f"{path}[{i}]", seen) for i, x in enumerate(obj)))
    if isinstance(obj, dict):
        return (dict, tuple((k, _describe(v, tensors, f"{path}[{k!r}]", seen)) for k, v in obj.items()))
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        n = len(tensors)
        desc = (object, type(obj),
                tuple((k, _describe(v, tensors, f"{path}.{k}", seen)) for k, v in vars(obj).items()))
        if len(tensors) > n or _is_cache_class(type(obj)):   # a layer of a cache: rebuilt around its tensors
            return desc
    return ("C", obj)   # a constant: int, bool, device, dtype, config...


def _build(desc: tuple, leaves: list) -> Any:
    kind = desc[0]
    if kind == "T":
        return leaves[desc[1]]
    if kind == "C":
        return desc[1]
    if kind is dict:
        return {k: _build(v, leaves) for k, v in desc[1]}
    if kind is object:
        obj = desc[1].__new__(desc[1])
        obj.__dict__.update({k: _build(v, leaves) for k, v in desc[2]})
        return obj
    return kind(_build(v, leaves) for v in desc[1])


def _flatten(obj):
    tensors: list = []
    return tensors, _describe(obj, tensors, type(obj).__name__)


def _flatten_with_keys(obj):
    tensors, context = _flatten(obj)
    return [(torch_pytree.SequenceKey(i), t) for i, t in enumerate(tensors)], context


def _unflatten(leaves, context):
    return _build(context, list(leaves))


def register(cls: type) -> None:
    """Register `cls` as a torch pytree node of its tensors (no-op where someone registered it already)."""
    if cls in torch_pytree.SUPPORTED_NODES:
        return
    torch_pytree.register_pytree_node(cls, _flatten, _unflatten, flatten_with_keys_fn=_flatten_with_keys,
                                      serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")


def register_transformers_caches() -> None:
    """Every cache class transformers has loaded (nothing is imported here)."""
    cache_utils = sys.modules.get("transformers.cache_utils")
    base = getattr(cache_utils, "Cache", None)
    if base is None:
        return
    todo = [base]
    while todo:
        cls = todo.pop()
        register(cls)
        todo.extend(cls.__subclasses__())


def is_cache(obj: Any) -> bool:
    return hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.Tensor)) and _is_cache_class(type(obj))


def has_cache(args: tuple, kwargs: dict) -> bool:
    """A cache object among the top-level inputs (a decode step)."""
    return any(is_cache(v) for v in (*args, *kwargs.values()))


def _register_dataclass(cls: type) -> None:
    """A ModelOutput made while torch.export traces (transformers skips registering it then) is registered
    as transformers registers it, which it then finds done; other dataclasses by their fields."""
    generic = sys.modules.get("transformers.utils.generic")
    if generic is not None and issubclass(cls, generic.ModelOutput) and hasattr(
            generic, "_register_model_output_pytree_node"):
        with mock.patch.object(torch.compiler, "is_compiling", lambda: False):   # it skips while tracing
            generic._register_model_output_pytree_node(cls)
        if cls in torch_pytree.SUPPORTED_NODES:
            if _IN_FIELD_ORDER is not None:
                _flatten_in_field_order(cls)
            return
    torch_pytree.register_dataclass(cls)


_IN_FIELD_ORDER: dict | None = None   # while capturing: ModelOutput class -> its node as registered


def _flatten_in_field_order(cls: type) -> None:
    node = torch_pytree.SUPPORTED_NODES[cls]
    rank = {f.name: i for i, f in enumerate(dataclasses.fields(cls))}

    def flatten(obj):
        values, keys = node.flatten_fn(obj)
        order = sorted(range(len(keys)), key=lambda i: rank.get(keys[i], len(rank)))
        return [values[i] for i in order], [keys[i] for i in order]

    def flatten_with_keys(obj):
        values, keys = flatten(obj)
        return [(torch_pytree.MappingKey(k), v) for k, v in zip(keys, values)], keys
    _IN_FIELD_ORDER[cls] = node
    torch_pytree.SUPPORTED_NODES[cls] = node._replace(flatten_fn=flatten, flatten_with_keys_fn=flatten_with_keys)


@contextlib.contextmanager
def model_outputs_in_field_order():
    """ModelOutputs flatten in their field order while capturing. One whose fields were set out of order
    (`out.pooler_output = ...` after `out["hidden_states"] = ...`) flattens in key order, but torch.export
    rebuilds it field by field (dynamo, and each decomposition's retrace): the graph's outputs then came back
    under each other's keys."""
    global _IN_FIELD_ORDER
    generic = sys.modules.get("transformers.utils.generic")
    if generic is None or _IN_FIELD_ORDER is not None:
        yield
        return
    _IN_FIELD_ORDER = {}
    try:
        for cls in list(torch_pytree.SUPPORTED_NODES):
            if isinstance(cls, type) and issubclass(cls, generic.ModelOutput) and dataclasses.is_dataclass(cls):
                _flatten_in_field_order(cls)
        yield
    finally:
        for cls, node in _IN_FIELD_ORDER.items():
            torch_pytree.SUPPORTED_NODES[cls] = node
        _IN_FIELD_ORDER = None


def register_objects(tree: Any) -> None:
    """Register the object types inside `tree` (example inputs, a forward's outputs) as torch pytree nodes:
    caches as nodes of their tensors, a user's own `@dataclass` by its fields (`ModelOutput` registers
    itself), so torch.export can flatten them."""
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        if type(tree) not in torch_pytree.SUPPORTED_NODES:
            _register_dataclass(type(tree))
        for f in dataclasses.fields(tree):
            register_objects(getattr(tree, f.name))
    elif isinstance(tree, (list, tuple)):
        for x in tree:
            register_objects(x)
    elif isinstance(tree, Mapping):
        if not isinstance(tree, dict):
            register_mapping(type(tree))
        for x in tree.values():
            register_objects(x)
    elif is_cache(tree):
        register(type(tree))


def register_mapping(cls: type) -> None:
    """A Mapping that is not a dict (a tokenizer's `BatchEncoding`, a `UserDict`) as a torch pytree node keyed
    like a dict; rebuilt as `cls(dict)` where its constructor takes one, else as a dict."""
    if cls in torch_pytree.SUPPORTED_NODES:
        return

    def unflatten(values, keys):
        data = dict(zip(keys, values))
        try:
            return cls(data)
        except Exception:   # a constructor that wants more: the dict is what forward reads by key
            return data

    torch_pytree.register_pytree_node(
        cls, lambda m: (list(m.values()), list(m.keys())), unflatten,
        flatten_with_keys_fn=lambda m: ([(torch_pytree.MappingKey(k), v) for k, v in m.items()], list(m.keys())),
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")


def state_numbers(tree: Any, path: str = "", inside: bool = False, seen: frozenset = frozenset()) -> dict:
    """Python numbers kept inside the cache objects of `tree`, by attribute path (bools excluded: flags)."""
    out: dict[str, Any] = {}
    if id(tree) in seen:   # a back-reference (a layer pointing at its cache)
        return out
    seen = seen | {id(tree)}
    if isinstance(tree, (list, tuple)):
        for i, x in enumerate(tree):
            out.update(state_numbers(x, f"{path}[{i}]", inside, seen))
    elif isinstance(tree, dict):
        for k, x in tree.items():
            out.update(state_numbers(x, f"{path}[{k!r}]" if path else str(k), inside, seen))
    elif is_cache(tree) or (inside and hasattr(tree, "__dict__") and not isinstance(tree, (type, torch.Tensor))):
        for k, x in vars(tree).items():
            if isinstance(x, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(x, bool):
                out[f"{path}.{k}"] = x
            else:
                out.update(state_numbers(x, f"{path}.{k}", True, seen))
    return out


def check_state_numbers(before: dict, after: dict) -> None:
    """A cache that counts in Python (a sliding window's cumulative length) cannot be a JAX program's state:
    the count would be baked in, and the next call would reuse it."""
    symbolic = (torch.SymInt, torch.SymFloat)   # a size expression now: changed (no comparison, which would guard)
    changed = [k for k in before if k in after and after[k] is not before[k]
               and (isinstance(after[k], symbolic) or after[k] != before[k])]
    if changed:
        k = changed[0]
        raise ValueError(f"cache attribute {k} is a Python number the forward changes ({before[k]} -> {after[k]}); "
                         "a converted program would bake it in: use a cache that keeps its state in tensors "
                         "(`bridge.static_cache(model, batch_size, max_cache_len)`, which holds sliding-window "
                         "layers at full length too), or run without a cache (use_cache=False)")


def is_object_node(spec) -> bool:
    """A registered node that is neither a builtin container, a NamedTuple, a dataclass nor a dict-like output."""
    typ = spec.type
    return (isinstance(typ, type) and typ not in (tuple, list, dict, type(None))
            and not issubclass(typ, (tuple, Mapping)) and typ in torch_pytree.SUPPORTED_NODES
            and not hasattr(typ, "__dataclass_fields__") and not isinstance(spec.context, type))


def _view(obj: Any) -> Any:
    """The JAX face of an object rebuilt around `_Leaf`s: dicts of the attributes holding leaves."""
    if isinstance(obj, _Leaf):
        return obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_view(x) for x in obj) if not hasattr(obj, "_fields") else type(obj)(*map(_view, obj))
    items = obj.items() if isinstance(obj, dict) else vars(obj).items() if hasattr(obj, "__dict__") else None
    if items is None:
        return None
    out = {k: _view(v) for k, v in items}
    return {k: v for k, v in out.items() if _has_leaf(v)}


def _has_leaf(v: Any) -> bool:
    if isinstance(v, _Leaf):
        return True
    if isinstance(v, (list, tuple)):
        return any(_has_leaf(x) for x in v)
    return isinstance(v, dict) and any(_has_leaf(x) for x in v.values())


def object_view(spec) -> Any:
    """The layout of an object node: its JAX structure with `_Leaf(i)` where child i goes, or None where its
    unflatten does more than store its children (then the node is not given a JAX face)."""
    node = torch_pytree.SUPPORTED_NODES[spec.type]
    try:
        return _view(node.unflatten_fn([_Leaf(i) for i in range(spec.num_children)], spec.context))
    except Exception:  # a user's own node type computing on its children: no layout to read
        return None


def fill(layout: Any, leaves: list) -> Any:
    """`layout` with each `_Leaf(i)` replaced by leaves[i]."""
    if isinstance(layout, _Leaf):
        return leaves[layout.i]
    if isinstance(layout, dict):
        return {k: fill(v, leaves) for k, v in layout.items()}
    if isinstance(layout, (list, tuple)):
        return type(layout)(fill(v, leaves) for v in layout)
    return layout


def pairs(layout: Any, value: Any, path: str):
    """Yield (child index, value, path) for every leaf of `layout`, read from the user's `value` by key."""
    if isinstance(layout, _Leaf):
        yield layout.i, value, path
    elif isinstance(layout, dict):
        if not isinstance(value, dict) and hasattr(value, "__dict__"):   # the torch object itself (a StaticCache)
            value = {k: v for k, v in vars(value).items() if k in layout}
        if not isinstance(value, dict) or set(value) != set(layout):
            raise KeyError(f"{path}: expected a dict with keys {sorted(layout)}, got "
                           f"{sorted(value) if isinstance(value, dict) else type(value).__name__}")
        for k, v in layout.items():
            yield from pairs(v, value[k], f"{path}[{k!r}]")
    elif isinstance(layout, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(layout):
            raise KeyError(f"{path}: expected a sequence of {len(layout)}, got {type(value).__name__}"
                           f"{f' of {len(value)}' if isinstance(value, (list, tuple)) else ''}")
        for i, (v, x) in enumerate(zip(layout, value)):
            yield from pairs(v, x, f"{path}[{i}]")
    elif value is not None:
        raise KeyError(f"{path}: expected None, got {type(value).__name__}")

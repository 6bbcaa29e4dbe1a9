"""Rebuild torch output structures (TreeSpec) as JAX-friendly containers.

tuple/list stay tuple/list, dicts and `ModelOutput`-like classes become dicts, None stays None.

Example:
    >>> spec_structure(ep.call_spec.out_spec, [logits])   # {'logits': Array(...)}
"""
from __future__ import annotations

from typing import Any


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
    if isinstance(spec.context, (list, tuple)) and len(spec.context) == len(kids):
        return dict(zip(spec.context, kids))
    if spec.context is not None and hasattr(spec.context, "__len__") and len(spec.context) == len(kids):
        return dict(zip(list(spec.context), kids))
    return tuple(kids)

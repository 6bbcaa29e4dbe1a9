"""Nested-dict state keyed by torch names: 'a.b.0.weight' ⇄ {'a': {'b': {'0': {'weight': ...}}}}.

Example:
    >>> nest({"fc.weight": w, "fc.bias": b})
    {'fc': {'weight': w, 'bias': b}}
    >>> flatten(nest(d)) == d
    True
"""
from __future__ import annotations

from typing import Any, Mapping


def nest(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out

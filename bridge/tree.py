"""Nested-dict state keyed by torch names: 'a.b.0.weight' ⇄ {'a': {'b': {'0': {'weight': ...}}}}.

Example:
    >>> nest({"fc.weight": w, "fc.bias": b})
    {'fc': {'weight': w, 'bias': b}}
    >>> flatten(nest(d)) == d
    True
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp


def nest(flat: Mapping[str, Any]) -> dict:
    """Dotted names as nested dicts. A name that is a value and also another's prefix (`w` beside
    `w.absmax`, bitsandbytes' quantization state) has no tree: ValueError naming both."""
    out: dict = {}
    branches: dict[str, str] = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        for i in range(1, len(parents) + 1):
            prefix = ".".join(parents[:i])
            if prefix in flat:
                raise ValueError(f"{prefix!r} names a value and is also a prefix of {name!r}")
            branches.setdefault(prefix, name)
        if name in branches:
            raise ValueError(f"{name!r} names a value and is also a prefix of {branches[name]!r}")
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


def as_torch_grads(grads):
    """jax.grad's gradients in torch's convention: for a real loss, JAX returns the conjugate of
    torch's `.grad` (and of the steepest-descent direction) for complex leaves; real leaves pass.

    Example:
        >>> as_torch_grads(jax.grad(lambda z: jnp.abs(z) ** 2)(jnp.complex64(3 + 4j)))   # torch: 6+8j
        Array(6.+8.j, dtype=complex64)
    """
    return jax.tree.map(lambda g: jnp.conj(g) if jnp.iscomplexobj(g) else g, grads)

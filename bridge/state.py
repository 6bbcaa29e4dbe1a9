"""State dicts and strict key accounting between checkpoints and converted models.

Example:
    >>> jm, report = jm.load_weights("model.safetensors")          # raises KeyMismatchError if unclean
    >>> sd = bridge.to_state_dict(jm); model.load_state_dict(sd)   # same keys, order, dtypes as torch
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bridge.errors import KeyMismatchError
from bridge.tree import flatten, nest
from converters.dtypes import to_torch


@dataclasses.dataclass
class KeyReport:
    """Outcome of matching checkpoint keys against a model's state."""
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)  # key, model, ckpt
    dtype_mismatch: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    loaded: list[str] = dataclasses.field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch or self.dtype_mismatch)

    def __str__(self) -> str:
        lines = []
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for k, want, got in self.shape_mismatch:
            lines.append(f"  shape mismatch: {k}: model {want}, checkpoint {got}")
        for k, want, got in self.dtype_mismatch:
            lines.append(f"  dtype mismatch: {k}: model {want}, checkpoint {got} (pass dtype= to cast)")
        return "\n".join(lines) or f"  all {len(self.loaded)} keys matched"


def match_state(expected: Mapping[str, Any], given: Mapping[str, Any], *, aliases: Mapping[str, str] = (),
                optional: frozenset = frozenset()) -> tuple[dict, KeyReport]:
    """Match flat `given` tensors to `expected` leaves (anything with .shape/.dtype).

    Tied aliases in `given` fill their canonical key; `optional` keys (non-persistent buffers) may be absent.
    """
    aliases = dict(aliases)
    report, out = KeyReport(), {}
    for key, value in given.items():
        canon = aliases.get(key, key)
        if canon not in expected:
            report.unexpected.append(key)
            continue
        if canon in out and canon != key:
            continue  # a tied duplicate of a key already taken
        want = expected[canon]
        if tuple(value.shape) != tuple(want.shape):
            report.shape_mismatch.append((key, tuple(want.shape), tuple(value.shape)))
        elif jnp.dtype(value.dtype) != jnp.dtype(want.dtype):
            report.dtype_mismatch.append((key, str(jnp.dtype(want.dtype)), str(jnp.dtype(value.dtype))))
        else:
            out[canon] = value
            report.loaded.append(key)
    taken = set(out) | {aliases.get(k, k) for k, *_ in report.shape_mismatch + report.dtype_mismatch}
    report.missing = [k for k in expected if k not in taken and k not in optional]
    return out, report


def load_into(jm, source, *, strict: bool = True, dtype=None, shardings=None):
    """(new JaxModule with the weights of `source`, KeyReport). `source`: a path or a params pytree."""
    from bridge.checkpoint import load_weights

    label = str(source) if not isinstance(source, Mapping) else "the given pytree"
    given = flatten(load_weights(source, dtype=dtype, shardings=shardings)
                    if not isinstance(source, Mapping) else source)
    params, buffers = flatten(jm.params), flatten(jm.buffers)
    expected = {**params, **buffers}
    got, report = match_state(expected, given, aliases=jm.meta.aliases, optional=jm.meta.non_persistent)
    if strict and not report.clean:
        raise KeyMismatchError(report, label)
    new_params = {k: got.get(k, v) for k, v in params.items()}
    new_buffers = {k: got.get(k, v) for k, v in buffers.items()}
    return jm.replace(params=nest(new_params), buffers=nest(new_buffers)), report


def to_state_dict(obj) -> "OrderedDict[str, torch.Tensor]":
    """A torch state_dict from a JaxModule (or a params pytree).

    For a JaxModule: keys, order and dtypes are `module.state_dict()`'s; tied keys share one tensor;
    non-persistent buffers are left out, as torch leaves them out.

    Example:
      >>> model.load_state_dict(bridge.to_state_dict(jm))
    """
    from bridge.jax_module import JaxModule

    if not isinstance(obj, JaxModule):
        return OrderedDict((k, _tensor(k, v, None)) for k, v in flatten(obj).items())
    meta = obj.meta
    flat = {**flatten(obj.buffers), **flatten(obj.params)}
    out, made = OrderedDict(), {}
    for key in meta.state_dict_keys:
        canon = meta.aliases.get(key, key)
        if canon not in made:
            made[canon] = _tensor(canon, flat[canon], meta.torch_dtypes.get(canon))
        out[key] = made[canon]
    return out


def _tensor(key: str, x, dtype: torch.dtype | None) -> torch.Tensor:
    if isinstance(x, jax.ShapeDtypeStruct):
        raise KeyMismatchError(KeyReport(missing=[key]), "a model whose weights were never loaded")
    return to_torch(np.asarray(x), dtype)

"""State dicts and strict key accounting between checkpoints and converted models.

Example:
    >>> jm, report = jm.load_weights("model.safetensors")          # raises KeyMismatchError if unclean
    >>> sd = bridge.to_state_dict(jm); model.load_state_dict(sd)   # same keys, order, dtypes as torch
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bridge.errors import KeyMismatchError
from bridge.tree import flatten, nest
from converters.dtypes import jax_dtype, to_torch, torch_dtype


STATE_META = "state_meta.json"   # a trainer run directory's record of the model's StateMeta


@dataclasses.dataclass(frozen=True)
class SavedState:
    """Params and buffers restored without their JaxModule (e.g. from a trainer checkpoint), with the
    model's StateMeta: exports exactly as the JaxModule would (names, order, dtypes, tied keys)."""
    params: dict
    buffers: dict
    meta: object


@dataclasses.dataclass
class KeyReport:
    """Outcome of matching checkpoint keys against a model's state."""
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)  # key, model, ckpt
    dtype_mismatch: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    loaded: list[str] = dataclasses.field(default_factory=list)
    renamed: str | None = None      # how checkpoint keys were mapped (a base model's prefix added/stripped)

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
        lines = lines or [f"  all {len(self.loaded)} keys matched"]
        if self.renamed:
            lines.append(f"  keys mapped: {self.renamed}")
        return "\n".join(lines)


def match_state(expected: Mapping[str, tuple], given: Mapping[str, tuple], *, aliases: Mapping[str, str] = (),
                optional: frozenset = frozenset()) -> tuple[dict[str, str], KeyReport]:
    """Match `given` keys to `expected` ones, both name → (shape, torch dtype), before reading any data.

    Tied aliases in `given` fill their canonical key; `optional` keys (non-persistent buffers) may be
    absent. Returns ({canonical key: given key to read}, report).
    """
    aliases = dict(aliases)
    report, take = KeyReport(), {}
    for key, (shape, dtype) in given.items():
        canon = aliases.get(key, key)
        if canon not in expected:
            report.unexpected.append(key)
            continue
        if canon in take and canon != key:
            continue  # a tied duplicate of a key already taken
        want_shape, want_dtype = expected[canon]
        if tuple(shape) != tuple(want_shape):
            report.shape_mismatch.append((key, tuple(want_shape), tuple(shape)))
        elif dtype != want_dtype:
            report.dtype_mismatch.append((key, str(want_dtype).replace("torch.", ""),
                                          str(dtype).replace("torch.", "")))
        else:
            take[canon] = key
            report.loaded.append(key)
    seen = set(take) | {aliases.get(k, k) for k, *_ in report.shape_mismatch + report.dtype_mismatch}
    report.missing = [k for k in expected if k not in seen and k not in optional]
    return take, report


def _expected(jm) -> dict[str, tuple]:
    """name → (shape, torch dtype) of the module's current state (the recorded torch dtype where it fits)."""
    out = {}
    for k, leaf in {**flatten(jm.params), **flatten(jm.buffers)}.items():
        recorded = jm.meta.torch_dtypes.get(k)
        fits = recorded is not None and jax_dtype(recorded) == jnp.dtype(leaf.dtype)
        out[k] = (tuple(leaf.shape), recorded if fits else torch_dtype(leaf.dtype))
    return out


WRAPPER_PREFIXES = ("module.", "_orig_mod.")   # DistributedDataParallel / DataParallel, torch.compile


def _unwrapped_names(given: Mapping, expected: Mapping) -> dict[str, str]:
    """Checkpoint key → model key: the prefixes that wrapping a module adds to every key of its
    state_dict (DDP's "module.", torch.compile's "_orig_mod.") are dropped when the model has none."""
    names = {k: k for k in given}
    stripped = True
    while stripped and names:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(v.startswith(prefix) for v in names.values()) and not any(k.startswith(prefix) for k in expected):
                names = {k: v[len(prefix):] for k, v in names.items()}
                stripped = True
    return names


def _base_model_names(names: dict[str, str], known: set[str]) -> tuple[dict[str, str], str | None]:
    """Checkpoint key → model key between a base model and the same model with a head (Hugging Face's
    `BertModel` ↔ `BertForSequenceClassification`: "embeddings.…" ↔ "bert.embeddings.…"): the one leading
    module name that, added to or stripped from the keys that match nothing, matches the most of them.
    Returns (names, a note for the report or None)."""
    unmatched = [k for k, v in names.items() if v not in known]
    if not unmatched:
        return names, None
    heads = lambda keys: {k.split(".", 1)[0] + "." for k in keys if "." in k}  # noqa: E731
    model_heads, ckpt_heads = heads(known), heads(names.values())
    candidates = [(lambda v, p=p: p + v, f'added "{p}"') for p in sorted(model_heads - ckpt_heads)]
    candidates += [(lambda v, p=p: v[len(p):] if v.startswith(p) else v, f'stripped "{p}"')
                   for p in sorted(ckpt_heads - model_heads)]
    taken = {v for v in names.values() if v in known}
    best, best_n = None, 0
    for rename, note in candidates:
        hits = {names[k]: rename(names[k]) for k in unmatched if rename(names[k]) in known}
        if len(hits) > best_n and not set(hits.values()) & taken:
            best, best_n = (hits, note), len(hits)
    if best is None:
        return names, None
    hits, note = best
    return {k: hits.get(v, v) for k, v in names.items()}, f"{note} to {len(hits)} checkpoint keys (base model ↔ head)"


def load_into(jm, source, *, strict: bool = True, dtype=None, shardings=None):
    """(new JaxModule with the weights of `source`, KeyReport). `source`: a path, a torch state_dict
    (or a training checkpoint dict holding one) or a params pytree of JAX/numpy arrays.

    Keys are matched before any tensor is read, so a strict failure costs no I/O.
    """
    from bridge.checkpoint import load_sources, open_checkpoint, state_dict_sources

    cast = None if dtype is None else torch_dtype(jnp.dtype(dtype))
    torch_dict = isinstance(source, Mapping) and not all(hasattr(v, "__array__") and not isinstance(v, torch.Tensor)
                                                         for v in flatten(source).values())
    if isinstance(source, Mapping) and not torch_dict:
        given_arrays = flatten(source)
        given = {k: (tuple(v.shape), torch_dtype(v.dtype)) for k, v in given_arrays.items()}
        label = "the given pytree"
    else:
        sources = {s.name: s for s in (state_dict_sources(source) if torch_dict else open_checkpoint(source))}
        given = {k: (s.shape, cast if cast is not None and s.dtype.is_floating_point else s.dtype)
                 for k, s in sources.items()}
        label = "the given state_dict" if torch_dict else str(source)
    expected = _expected(jm)
    names, renamed = _base_model_names(_unwrapped_names(given, expected), set(expected) | set(jm.meta.aliases))
    take, report = match_state(expected, {names[k]: v for k, v in given.items()}, aliases=jm.meta.aliases,
                               optional=jm.meta.non_persistent)
    report.renamed = renamed
    original = {v: k for k, v in names.items()}
    take = {canon: original[key] for canon, key in take.items()}
    if strict and not report.clean:
        raise KeyMismatchError(report, label)
    if isinstance(source, Mapping) and not torch_dict:
        got = {canon: given_arrays[key] for canon, key in take.items()}
    else:
        loaded = load_sources([sources[key] for key in take.values()], dtype=dtype, shardings=shardings)
        got = {canon: loaded[key] for canon, key in take.items()}
    params, buffers = flatten(jm.params), flatten(jm.buffers)
    new_params = {k: got.get(k, v) for k, v in params.items()}
    new_buffers = {k: got.get(k, v) for k, v in buffers.items()}
    return jm.replace(params=nest(new_params), buffers=nest(new_buffers)), report


def gathered(obj):
    """`obj` (JaxModule, SavedState or pytree) with every array that spans processes gathered to host
    numpy; a collective on multi-host runs (every process calls it, leaves in one fixed order)."""
    from jax.experimental import multihost_utils

    def gather(x):
        return multihost_utils.process_allgather(x, tiled=True) \
            if isinstance(x, jax.Array) and not x.is_fully_addressable else x

    meta = getattr(obj, "meta", None)
    if meta is None:
        return jax.tree.map(gather, obj)
    params, buffers = jax.tree.map(gather, obj.params), jax.tree.map(gather, obj.buffers)
    if hasattr(obj, "replace"):   # a JaxModule keeps its program (a .pt2 export writes it)
        return obj.replace(params=params, buffers=buffers)
    return SavedState(params, buffers, meta)


def to_state_dict(obj) -> "OrderedDict[str, torch.Tensor]":
    """A torch state_dict from a JaxModule or SavedState (or a params pytree).

    With a model's meta: keys, order and dtypes are `module.state_dict()`'s; tied keys share one tensor;
    non-persistent buffers are left out, as torch leaves them out.

    Example:
      >>> model.load_state_dict(bridge.to_state_dict(jm))
    """
    if jax.process_count() > 1:   # multi-host: every process calls this and gets the whole state_dict
        obj = gathered(obj)
    meta = getattr(obj, "meta", None)
    if meta is None:
        return OrderedDict((k, _tensor(k, v, None)) for k, v in flatten(obj).items())
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

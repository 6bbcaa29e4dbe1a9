"""State dicts and strict key accounting between checkpoints and converted models.

Example:
    >>> jm, report = jm.load_weights("model.safetensors")          # raises KeyMismatchError if unclean
    >>> sd = bridge.to_state_dict(jm); model.load_state_dict(sd)   # same keys, order, dtypes as torch
"""
from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bridge.errors import CheckpointError, KeyMismatchError
from bridge.tree import flatten, nest
from converters.dtypes import jax_dtype, narrow, to_torch, torch_dtype


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
    ignored: list[str] = dataclasses.field(default_factory=list)   # keys the model's own loader passes over
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
        if self.ignored:
            lines.append(f"  ignored, as the model's from_pretrained ignores them ({len(self.ignored)}): "
                         f"{', '.join(self.ignored)}")
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
    # a name both sides lead with is a candidate too: Lightning's `self.model` around a model whose own
    # first module is `model` ("model.model.…" ↔ "model.…")
    candidates = [(lambda v, p=p: p + v, f'added "{p}"') for p in sorted(model_heads)]
    candidates += [(lambda v, p=p: v[len(p):] if v.startswith(p) else v, f'stripped "{p}"')
                   for p in sorted(ckpt_heads)]
    taken = {v for v in names.values() if v in known}
    best, best_n = None, 0
    for rename, note in candidates:
        hits = {names[k]: rename(names[k]) for k in unmatched if rename(names[k]) in known}
        if len(hits) > best_n and not set(hits.values()) & taken:
            best, best_n = (hits, note), len(hits)
    if best is None:
        return names, None
    hits, note = best
    return ({k: hits.get(v, v) for k, v in names.items()},
            f"{note} to {len(hits)} checkpoint keys (base model ↔ head, or a wrapper's attribute)")


def load_into(jm, source, *, strict: bool = True, dtype=None, shardings=None):
    """(new JaxModule with the weights of `source`, KeyReport). `source`: a path, a torch state_dict
    (or a training checkpoint dict holding one) or a params pytree of JAX/numpy arrays.

    Keys are matched before any tensor is read, so a strict failure costs no I/O.
    """
    from bridge.checkpoint import load_sources, open_checkpoint, state_dict_sources
    from bridge.hf_layout import checkpoint_layout, layout_of, model_sources

    cast = None if dtype is None else torch_dtype(jnp.dtype(dtype))
    torch_dict = isinstance(source, Mapping) and not all(hasattr(v, "__array__") and not isinstance(v, torch.Tensor)
                                                         for v in flatten(source).values())
    if isinstance(source, Mapping) and not torch_dict:
        given_arrays = flatten(source)
        given = {k: (tuple(v.shape), cast if cast is not None and jnp.issubdtype(v.dtype, jnp.floating)
                     else torch_dtype(v.dtype)) for k, v in given_arrays.items()}
        label = "the given pytree"
    else:
        found = state_dict_sources(source) if torch_dict else open_checkpoint(source)
        layout = layout_of(jm.meta) or (None if torch_dict else checkpoint_layout(source))
        sources = {s.name: s for s in model_sources(layout, found)}   # as from_pretrained renames and fuses
        given = {k: (s.shape, cast if cast is not None and s.dtype.is_floating_point else s.dtype)
                 for k, s in sources.items()}
        label = "the given state_dict" if torch_dict else str(source)
    expected = _expected(jm)
    names, renamed = _base_model_names(_unwrapped_names(given, expected), set(expected) | set(jm.meta.aliases))
    skipped = _ignored(jm.meta, {names[k] for k in given}, expected)
    take, report = match_state(expected, {names[k]: v for k, v in given.items() if names[k] not in skipped},
                               aliases=jm.meta.aliases, optional=jm.meta.non_persistent)
    report.renamed = renamed
    missing = _patterns(jm.meta.ignore_missing)
    report.ignored = sorted(skipped) + [k for k in report.missing if missing and missing.search(k)]
    report.missing = [k for k in report.missing if k not in report.ignored]
    original = {v: k for k, v in names.items()}
    take = {canon: original[key] for canon, key in take.items()}
    if strict and not report.clean:
        raise KeyMismatchError(report, label)
    if isinstance(source, Mapping) and not torch_dict:
        got = {canon: _array_leaf(given_arrays[key], key, dtype, shardings) for canon, key in take.items()}
    else:
        loaded = load_sources([sources[key] for key in take.values()], dtype=dtype, shardings=shardings)
        got = {canon: loaded[key] for canon, key in take.items()}
    params, buffers = flatten(jm.params), flatten(jm.buffers)
    new_params = {k: got.get(k, v) for k, v in params.items()}
    new_buffers = {k: got.get(k, v) for k, v in buffers.items()}
    return jm.replace(params=nest(new_params), buffers=nest(new_buffers)), report


def _patterns(patterns) -> re.Pattern | None:
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def _ignored(meta, names: set[str], expected) -> set[str]:
    """Checkpoint keys the model's own loader passes over (patterns searched in the key) that are no key of
    its state_dict (a non-persistent buffer's name is none either, as from_pretrained counts it)."""
    rx = _patterns(meta.ignore_unexpected)
    own = lambda n: meta.aliases.get(n, n) in expected and n not in meta.non_persistent  # noqa: E731
    return {n for n in names if rx and rx.search(n) and not own(n)}


def _array_leaf(x, key: str, dtype, shardings) -> jax.Array:
    """A pytree source's leaf as the model holds it: floats cast to `dtype` where given, numpy's 64-bit
    integers narrowed as a checkpoint's are (a value that does not fit raises), placed per `shardings`."""
    from bridge.checkpoint import _sharding_for

    if not isinstance(x, jax.Array):
        x = np.asarray(x)
        want = jax_dtype(torch_dtype(x.dtype))
        x = narrow(x, dtype if dtype is not None and np.issubdtype(want, np.floating) else want,
                   f"the given pytree: {key!r}", CheckpointError)
    elif dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(dtype)
    sharding = _sharding_for(shardings, key, tuple(x.shape))
    return jax.device_put(x, sharding) if sharding is not None or not isinstance(x, jax.Array) else x


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

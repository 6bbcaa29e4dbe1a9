"""Hugging Face checkpoint layout ↔ in-memory layout, with transformers' own conversion mapping.

transformers 5 keeps some models' parameters under other names and layouts than their checkpoints (ViT's
`encoder.layer.0.attention.attention.query` is `layers.0.attention.q_proj`; Mixtral's per-expert `experts.3.w1`
and `experts.3.w3` are stacked and concatenated into one `experts.gate_up_proj`). `from_pretrained` converts on
load and `save_pretrained` converts back; this module does both for bridge, lazily, with transformers' mapping
objects (`WeightRenaming`, `WeightConverter`) and their operations (`MergeModulelist`, `Concatenate`, `Chunk`...).

Example:
    >>> layout = checkpoint_layout("hf_dir/")                       # or a transformers model / config
    >>> sources = model_sources(layout, open_checkpoint("hf_dir/"))  # model names and shapes, nothing read
    >>> entries = checkpoint_entries(layout, _entries(jm))           # what save_pretrained would write

Integration:
    bridge/state.py, load_into: replace
        `sources = {s.name: s for s in (state_dict_sources(source) if torch_dict else open_checkpoint(source))}`
    by
        `found = state_dict_sources(source) if torch_dict else open_checkpoint(source)`
        `layout = None if torch_dict else checkpoint_layout(source)`   # a transformers model dir with a mapping
        `sources = {s.name: s for s in (model_sources(layout, found) if layout is not None else found)}`
    and, after `report.renamed = renamed`, optionally note it: `if layout is not None: report.renamed = ...
    f"transformers' checkpoint conversion for {type(layout.model).__name__}"` (joined to any prefix note).
    Optional: a `layout=None` argument of load_into / JaxModule.load_weights (used instead of the directory's),
    which bridge/conversion.py, convert, passes as `checkpoint_layout(module)` in
    `jm.load_weights(weights, ...)`, so a bare .safetensors file of such a model loads too.
    bridge/checkpoint.py, load_weights (optional, so its keys are the model's names as well): after
        `sources = open_checkpoint(path)` add
        `layout = checkpoint_layout(path); sources = model_sources(layout, sources) if layout else sources`.
    bridge/exporter.py, _export, in the `if fmt == "hf":` branch (not the PEFT one), before `def fill(tmp)`:
        `layout = None if diffusers else checkpoint_layout(like)`
        `hf_entries = checkpoint_entries(layout, entries) if layout is not None else entries`
    and pass `hf_entries` instead of `entries` to `_write_safetensors(tmp, ..., entries, max_bytes)` in fill.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import threading
import warnings
from copy import deepcopy
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bridge.checkpoint import TensorSource
from bridge.errors import CheckpointError, ExportError
from converters.dtypes import _VIEW_AS, numpy_dtype, to_numpy


class Layout:
    """A transformers model's conversion mapping: what `from_pretrained` applies on load (`load`) and what
    `save_pretrained` reverts on save (`save`), with the model (possibly on the meta device) its ops consult."""

    def __init__(self, model, load: list, save: list):
        self.model, self.load, self.save = model, load, save
        self.state = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}

    def __repr__(self) -> str:
        return f"Layout({type(self.model).__name__}: {len(self.load)} load / {len(self.save)} save transforms)"


def checkpoint_layout(like) -> Layout | None:
    """The checkpoint layout of a transformers model, config or model directory; None where its checkpoints use
    the in-memory names (GPT-2, BERT...), for other modules, and for directories that are no transformers model's.

    Example:
        >>> checkpoint_layout(MixtralForCausalLM(cfg))     # Layout(MixtralForCausalLM: 8 load / 3 save transforms)
        >>> checkpoint_layout("gpt2_dir/")                 # None
    """
    if isinstance(like, (str, os.PathLike)):
        like = _directory_config(Path(like))
    if like is None or "transformers" not in sys.modules:   # no transformers object can be at hand: no import
        return None
    from transformers import PretrainedConfig, PreTrainedModel
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:   # transformers 4 loads checkpoints by their own names
        return None
    if isinstance(like, PretrainedConfig):
        like = _meta_model(like)
    if not isinstance(like, PreTrainedModel):
        return None
    own = get_model_conversion_mapping(like, add_legacy=False)
    if not own:
        return None
    save = getattr(like, "_weight_conversions", None)   # from_pretrained keeps the transforms its checkpoint used
    if save is None:   # as revert_weight_conversion: the default mapping, without prefix changes
        save = [t for t in own if not isinstance(t, PrefixChange)]
    return Layout(like, get_model_conversion_mapping(like), list(save))


def layout_config(model) -> str | None:
    """A transformers model's config as JSON (its class in `architectures`) where its checkpoints use another
    layout: what `layout_of` rebuilds the layout from, kept in the model's StateMeta (and a trainer run's)."""
    if "transformers" not in sys.modules or checkpoint_layout(model) is None:
        return None
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    return json.dumps(config, sort_keys=True, default=str)


@functools.lru_cache(maxsize=8)
def _layout_from_json(text: str) -> Layout | None:
    from transformers import AutoConfig
    config = json.loads(text)
    return checkpoint_layout(AutoConfig.for_model(config.pop("model_type"), **config))


def layout_of(meta) -> Layout | None:
    """The checkpoint layout recorded in a JaxModule's (or trainer run's) StateMeta, if any.

    Example:
        >>> layout_of(bridge.convert(mixtral, kwargs=inputs).meta)   # Layout(MixtralForCausalLM: ...)
    """
    text = getattr(meta, "hf_config", None)
    return _layout_from_json(text) if text else None


def _directory_config(path: Path):
    """The transformers config of a model directory (its config.json read first: no import for other files)."""
    try:
        cfg = json.loads((path / "config.json").read_text())
        if not isinstance(cfg, dict) or "model_type" not in cfg or "_diffusers_version" in cfg:
            return None
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError):   # no config.json or transformers, an unknown model type
        return None


def _meta_model(config):
    """The model class config.json names (else AutoModel's), built on the meta device: no memory, no init."""
    import transformers
    cls = next((getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)), None)
    with torch.device("meta"):
        try:
            return cls(config) if cls is not None else transformers.AutoModel.from_config(config)
        except Exception:   # custom code, a class that cannot be built from this config: no layout to apply
            return None


def _split(transforms):
    from transformers.core_model_loading import WeightConverter, WeightRenaming
    transforms = deepcopy(transforms)   # matching records state (`_was_used`, GroupWeightRename's guard)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters, {p: c for c in converters for p in c.source_patterns}


class _Group:
    """One transform over several tensors (e.g. every expert's w1 and w3 → gate_up_proj): runs on meta tensors
    for names and shapes, and on real ones when one of its outputs is first read; only the last result is kept."""

    def __init__(self, layout: Layout, transform, first: str, inputs: list, rename: Callable[[str], str]):
        self.layout, self.transform, self.first, self.inputs, self.rename = layout, transform, first, inputs, rename
        self.lock, self.cached, self.views = threading.Lock(), {}, set()   # views: outputs sharing an input's memory

    def run(self, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        t = deepcopy(self.transform)
        for (pattern, key, _), tensor in zip(self.inputs, tensors):
            t.add_tensor(self.first, key, pattern, tensor)
        out = t.convert(self.first, model=self.layout.model, config=self.layout.model.config)
        out = {self.rename(k): v[0] if isinstance(v, list) else v for k, v in out.items()}
        memory = {x.untyped_storage().data_ptr() for x in tensors if x.device.type != "meta"}
        self.views = {k for k, v in out.items() if memory and v.untyped_storage().data_ptr() in memory}
        return out

    def shapes(self) -> dict[str, torch.Tensor]:
        return self.run([torch.empty(shape, dtype=dtype, device="meta") for *_, (shape, dtype, _) in self.inputs])

    def result(self, name: str, keep: bool) -> torch.Tensor:
        """Output `name`; `keep`: hold the outputs for the next read (a loader may read slices), else hand each
        output over once (an exporter produces each once, so a group's memory goes with its last output)."""
        with self.lock:
            if name not in self.cached:
                self.cached = self.run([_as_torch(read(), dtype) for _, _, (_, dtype, read) in self.inputs])
            return self.cached[name] if keep else self.cached.pop(name)


def _as_torch(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A torch view of a host array (bf16/fp8 through same-width ints): conversions copy, never write."""
    arr = np.asarray(arr)
    with warnings.catch_warnings():   # read-only arrays (a file map, a jax array): nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        if dtype in _VIEW_AS:
            return torch.from_numpy(arr.view(numpy_dtype(_VIEW_AS[dtype]))).view(dtype)
        return torch.from_numpy(arr)


def _plan(layout: Layout, named: dict, reverse: bool):
    """[(name, key or _Group)] in the order of `named` (key → (shape, dtype, read)): a tensor kept as it is
    (renamed at most) by its key, or a _Group, once, where its first input was. Mirrors transformers'
    convert_and_load_state_dict_in_model (load) and revert_weight_conversion (save), including their natural
    sort of keys, which orders each group's inputs (experts 0, 1, ..., 10)."""
    from transformers.core_model_loading import (apply_converters, apply_renamings, dot_natural_key,
                                                 rename_source_key)
    renamings, converters, by_pattern = _split([t.reverse_transform() for t in layout.save[::-1]] if reverse
                                               else layout.load)
    groups, where = {}, {}
    for key in sorted(named, key=dot_natural_key):
        if reverse:
            target, pattern = apply_converters(key, converters)
            if pattern is None:
                target = apply_renamings(key, renamings)
        else:
            prefix, state = layout.model.base_model_prefix, layout.state
            target, pattern = rename_source_key(key, renamings, converters, prefix, state)
            if target not in state and key in state:
                target, pattern = rename_source_key(key, [], [], prefix, state)
            if pattern is not None and target not in state:   # a converter for tensors the model lacks: as is
                target, pattern = key, None
        if pattern is None:
            where[key] = (target, None)
            continue
        if target not in groups:
            rename = (lambda k: apply_renamings(k, renamings)) if reverse else (lambda k: k)
            groups[target] = _Group(layout, by_pattern[pattern], target, [], rename)
        groups[target].inputs.append((pattern, key, named[key]))
        where[key] = (target, groups[target])
    out, done = [], set()
    for key in named:
        target, group = where[key]
        if group is None:
            out.append((target, key))
        elif id(group) not in done:
            done.add(id(group))
            out.append((target, group))
    return out


def _outputs(group: _Group, error: type[Exception], what: str) -> dict[str, torch.Tensor]:
    try:
        return group.shapes()
    except Exception as e:   # transformers' ops raise whatever torch raises for tensors that do not fit
        keys = [key for _, key, _ in group.inputs]
        raise error(f"{what}: transformers' conversion of {keys[:4]}{' ...' if len(keys) > 4 else ''} to "
                    f"{group.first!r} ({type(group.transform).__name__} {getattr(group.transform, 'operations', '')})"
                    f" fails: {type(e).__name__}: {e}") from None


def model_sources(layout: Layout | None, sources: list[TensorSource]) -> list[TensorSource]:
    """Checkpoint tensors as the model holds them: renamed, and merged/split as from_pretrained does. Nothing is
    read here; reading one converted tensor reads only its inputs (and holds one conversion's result).

    Example:
        >>> [s.name for s in model_sources(checkpoint_layout(mixtral), open_checkpoint("mixtral_dir"))][:2]
        ['lm_head.weight', 'model.embed_tokens.weight']    # ... 'model.layers.0.mlp.experts.gate_up_proj'
    """
    if layout is None:
        return list(sources)
    by_name = {s.name: s for s in sources}
    named = {s.name: (s.shape, s.dtype, lambda s=s: s.read(None, "map")) for s in sources}
    out = []
    for name, item in _plan(layout, named, reverse=False):
        if not isinstance(item, _Group):
            src = by_name[item]
            out.append(src if name == src.name else TensorSource(name, src.dtype, src.shape, src.file, src._read))
            continue
        file = by_name[item.inputs[0][1]].file
        for target, meta in _outputs(item, CheckpointError, str(file)).items():
            out.append(TensorSource(target, meta.dtype, tuple(meta.shape), file, _reader(item, target)))
    return out


def _reader(group: _Group, name: str):
    def read(index, mode):
        tensor = group.result(name, keep=True)
        arr = to_numpy(tensor)
        if index is not None:
            return np.array(arr[index], copy=True)
        return arr.copy() if mode == "copy" and name in group.views else arr   # "copy": never the file's pages
    return read


def checkpoint_entries(layout: Layout | None, entries: list) -> list:
    """Exporter entries (key, torch dtype, shape, producer) under the model's names → as save_pretrained writes
    them (transformers' reverse transforms: fused experts split back per expert...), produced lazily.

    Example:
        >>> [e[0] for e in checkpoint_entries(checkpoint_layout(vit), _entries(jm))][4]
        'vit.encoder.layer.0.attention.attention.query.weight'
    """
    if layout is None:
        return list(entries)
    named = {key: (tuple(shape), dtype, produce) for key, dtype, shape, produce in entries}
    try:
        plan = _plan(layout, named, reverse=True)
    except (NotImplementedError, ValueError) as e:   # an op with no reverse_op: save_pretrained fails as well
        raise ExportError(f"export like a {type(layout.model).__name__}: transformers cannot reverse its "
                          f"checkpoint conversion ({type(e).__name__}: {e}); export without like= keeps the "
                          "in-memory names") from None
    out = []
    for name, item in plan:
        if not isinstance(item, _Group):
            shape, dtype, produce = named[item]
            out.append((name, dtype, shape, produce))
            continue
        for target, meta in _outputs(item, ExportError, "export").items():
            out.append((target, meta.dtype, tuple(meta.shape), _producer(item, target)))
    return out


def _producer(group: _Group, name: str) -> Callable[[], Any]:
    return lambda: to_numpy(group.result(name, keep=False))

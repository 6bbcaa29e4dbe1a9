"""Checkpoint loading: .safetensors (single and sharded with an index), .pt/.pth/.bin (weights only,
never unpickling code) and Hugging Face directories, streamed tensor by tensor.

Example:
    >>> params = bridge.load_weights("hf_dir/")                      # nested dict of jax.Arrays
    >>> params = bridge.load_weights("model.safetensors", shardings=NamedSharding(mesh, P("fsdp")))
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bridge.errors import CheckpointError
from bridge.host_memory import MappedFile, adoptable, populate
from bridge.pt2 import is_program_file, program_state
from bridge.safetensors_io import TensorInfo, read_header, read_slice, read_tensor
from bridge.tree import flatten, nest
from converters.dtypes import jax_dtype, narrow, numpy_dtype, to_numpy

HF_CANDIDATES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",   # transformers' order
                 "pytorch_model.bin.index.json", "model.pt", "model.pth",
                 # diffusers' model directories
                 "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                 "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


@dataclasses.dataclass
class TensorSource:
    """One tensor of a checkpoint, not yet read."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path | str         # the file, or a label for an in-memory state_dict
    _read: Callable[[tuple | None, str], np.ndarray]

    def read(self, index: tuple | None = None, mode: str = "copy") -> np.ndarray:
        """`mode`: "map" (a resident view of the file's pages where JAX can adopt it, else an aligned
        copy), "copy" (fresh aligned memory) or "stream" (reused heap memory, for a caller that drops it)."""
        return self._read(index, mode)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * torch.empty((), dtype=self.dtype).element_size()


def _safetensors_sources(path: Path) -> list[TensorSource]:
    infos, _ = read_header(path)
    mapped = MappedFile(path)

    def reader(info: TensorInfo):
        def read(index, mode):
            if index is not None:
                return read_slice(path, info, index)
            view = mapped.array(info.start, info.end, numpy_dtype(info.dtype), info.shape) if mode == "map" else None
            return view if view is not None else read_tensor(path, info, aligned=mode != "stream")
        return read

    return [TensorSource(i.name, i.dtype, i.shape, path, reader(i)) for i in infos.values()]


def _torch_sources(path: Path) -> list[TensorSource]:
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it pickles a {found.group(1)} object" if found else str(e).splitlines()[0]
        raise CheckpointError(f"{path}: refused to load: it is not a weights-only checkpoint (it would run "
                              f"code or build objects while unpickling; {what}). Save model.state_dict() "
                              "instead, or, if you trust the file, pass the state_dict of "
                              "torch.load(path, weights_only=False) to jm.load_weights") from e
    except Exception as e:  # torch raises RuntimeError/EOFError/ValueError/... for non-checkpoint bytes
        if "TorchScript" in str(e):
            raise CheckpointError(f"{path}: a TorchScript archive (torch.jit.save), which bridge does not open "
                                  "(loading runs its code); if you trust it, pass "
                                  "torch.jit.load(path).state_dict() to jm.load_weights, or the module "
                                  "torch.jit.load(path) to bridge.convert") from e
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
    return state_dict_sources(sd, path)


def state_dict_sources(obj: Mapping, label: str | Path = "the given state_dict") -> list[TensorSource]:
    """The tensors of an in-memory torch state_dict (or training checkpoint dict) as sources."""
    flat = _model_state(label, obj)

    def reader(t: torch.Tensor):
        def read(index, mode):
            arr = to_numpy(t if index is None else t[index])
            if mode == "map" and index is None and adoptable(arr):  # torch.load(mmap=True) maps MAP_PRIVATE
                return populate(arr)
            return arr.copy()
        return read

    for k, t in flat.items():
        if t.layout != torch.strided or not _has_numpy_dtype(t.dtype):
            kind = t.layout if t.layout != torch.strided else t.dtype
            raise CheckpointError(f"{label}: tensor {k!r} is {kind}, which JAX has no array for (save it dense, "
                                  "dequantized or in a supported dtype)")
    return [TensorSource(k, t.dtype, tuple(t.shape), label, reader(t)) for k, t in flat.items()]


def _has_numpy_dtype(dtype: torch.dtype) -> bool:
    try:
        return numpy_dtype(dtype) is not None
    except TypeError:   # quantized (qint8), complex32
        return False


# where training checkpoints keep the model's weights beside optimizer state, epoch, config...
WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")


def _model_state(path: Path | str, obj) -> dict[str, torch.Tensor]:
    """The flat state_dict in a torch.load result: the object itself, or the entry of a training
    checkpoint that holds it ({"model": ..., "optimizer": ..., "epoch": 3}, Lightning's "state_dict")."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state_dict of tensors")
    flat = flatten(obj)
    bad = [k for k, v in flat.items() if not isinstance(v, torch.Tensor)]
    if not bad and not _wrapped(obj):
        return flat
    for key in WRAPPERS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in flatten(inner).values()):
            return flatten(inner)
    raise CheckpointError(f"{path}: entries {bad[:5]} are not tensors, and none of its top-level entries "
                          f"{list(obj)[:8]} named {'/'.join(WRAPPERS)} is a state_dict")


def _wrapped(obj: Mapping) -> bool:
    """Only state_dicts under wrapper names ({"model": sd}, {"state_dict": sd, "ema": sd}): a torch state_dict
    is flat with dotted names, where a nested tree of tensors (also read) has none."""
    return all(isinstance(v, Mapping) for v in obj.values()) and any(
        isinstance(obj.get(k), Mapping) and obj[k] and all(isinstance(v, torch.Tensor) for v in obj[k].values())
        and any("." in n for n in obj[k]) for k in WRAPPERS)


def _index_sources(path: Path) -> list[TensorSource]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid checkpoint index (needs a 'weight_map'): {e}") from e
    if not isinstance(weight_map, Mapping):
        raise CheckpointError(f"{path}: 'weight_map' is a {type(weight_map).__name__}, not tensor name -> file")
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or fname.endswith(".index.json"):
            raise CheckpointError(f"{path}: tensor {name!r} is assigned to {fname!r}, not a shard file name")
        by_file.setdefault(fname, []).append(name)
    sources = []
    for fname, names in by_file.items():
        shard = path.parent / fname
        if not shard.is_file():
            raise CheckpointError(f"{path}: index names shard {fname!r} (for {names[0]!r} and {len(names) - 1} "
                                  "more), which does not exist")
        found = {s.name: s for s in _file_sources(shard)}
        missing = [n for n in names if n not in found]
        if missing:
            raise CheckpointError(f"{path}: shard {fname!r} lacks tensors the index assigns to it: {missing[:5]}")
        sources += [found[n] for n in names]
    return sources


def _sniff(path: Path) -> str | None:
    """"torch" (torch.save's zip or legacy pickle), "safetensors" (u64 header length, then '{') or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return None
    # the safetensors layout first: its header length's low byte can be 0x80 or "P" (1 file in 32)
    if len(head) == 9 and head[8:9] == b"{" and 8 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return "torch"
    return None


def _file_sources(path: Path) -> list[TensorSource]:
    """By content first (a safetensors file named .bin loads), then by suffix (which names the problem)."""
    name = path.name
    if name.endswith(".index.json"):
        return _index_sources(path)
    kind = _sniff(path)
    if kind is None:
        kind = "torch" if name.endswith(TORCH_SUFFIXES) else "safetensors"
    if name.endswith(".pt2") or (kind == "torch" and is_program_file(path)):   # torch.export.save
        return state_dict_sources(program_state(path), path)
    return _torch_sources(path) if kind == "torch" else _safetensors_sources(path)


def open_checkpoint(path: str | Path) -> list[TensorSource]:
    """Every tensor of a checkpoint file, index or Hugging Face directory, unread."""
    path = Path(path)
    if path.is_dir():
        for cand in HF_CANDIDATES:
            if (path / cand).is_file():
                return _file_sources(path / cand)
        singles = sorted(path.glob("*.safetensors"))
        if len(singles) == 1:
            return _file_sources(singles[0])
        raise CheckpointError(f"{path}: no checkpoint found in this directory (looked for "
                              f"{', '.join(HF_CANDIDATES)}{' or a single *.safetensors' if not singles else ''})")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    return _file_sources(path)


def _sharding_for(shardings, name: str, shape) -> Any:
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return shardings
    if callable(shardings):
        return shardings(name, shape)
    flat = flatten(shardings) if any(isinstance(v, Mapping) for v in shardings.values()) else shardings
    return flat.get(name)


def host_array(src: TensorSource, dtype=None, index: tuple | None = None, mode: str = "copy") -> np.ndarray:
    """Read (a slice of) a tensor as numpy in the dtype JAX will hold it in."""
    arr = src.read(index, mode)
    want = jax_dtype(src.dtype)
    if dtype is not None and jnp.issubdtype(want, jnp.floating):
        want = jnp.dtype(dtype)
    return narrow(arr, want, f"{src.file}: {src.name!r}", CheckpointError)


def iter_weights(path: str | Path, *, dtype=None) -> Iterator[tuple[str, np.ndarray, torch.dtype]]:
    """Stream (name, host array, original torch dtype), one tensor in memory at a time."""
    for src in open_checkpoint(path):
        yield src.name, host_array(src, dtype, mode="stream"), src.dtype


def load_weights(path: str | Path, *, dtype=None, shardings=None, mmap: bool = True) -> dict:
    """Load a checkpoint into a nested dict of jax.Arrays keyed by the torch names.

    Args:
      path: .safetensors, *.index.json, .pt/.pth/.bin, or a Hugging Face model directory.
      dtype: cast floating tensors to this dtype (integer and bool tensors keep theirs).
      shardings: one `jax.sharding.Sharding`, a (nested or flat) dict name → Sharding, or a callable
        (name, shape) → Sharding | None. Each device then reads only its own slice.
      mmap: on CPU, adopt tensors that sit 64-byte aligned in the file (every tensor of a file bridge
        wrote, and torch.save's) as views of a private copy-on-write map of it: no second copy of the
        bytes, the page cache is shared. Replacing the file (write elsewhere, then rename, as
        `bridge.export` does) is safe while the arrays live; truncating or rewriting it in place is not:
        pass mmap=False to copy every tensor into fresh memory.

    Example:
      >>> params = load_weights("ckpt/", dtype=jnp.bfloat16)
    """
    from bridge.hf_layout import checkpoint_layout, model_sources
    sources = model_sources(checkpoint_layout(path), open_checkpoint(path))   # a transformers model's names
    try:
        nest(dict.fromkeys(src.name for src in sources))   # before reading anything
    except ValueError as e:
        raise CheckpointError(f"{path}: its names do not form a tree: {e}; `bridge.iter_weights` reads "
                              "it by flat name") from None
    return nest(load_sources(sources, dtype=dtype, shardings=shardings, mmap=mmap))


def load_sources(sources: list[TensorSource], *, dtype=None, shardings=None, mmap: bool = True) -> dict:
    """Read the given tensors into jax.Arrays (flat dict), one at a time, sharded where asked."""
    out, mode = {}, "map" if mmap else "copy"
    for src in sources:
        sharding = _sharding_for(shardings, src.name, src.shape)
        if sharding is None:
            out[src.name] = jax.device_put(host_array(src, dtype, mode=mode))  # CPU: adopts aligned buffers
        else:
            try:
                out[src.name] = jax.make_array_from_callback(
                    src.shape, sharding, lambda index, src=src: host_array(src, dtype, index))
            except ValueError as e:   # a sharding that does not divide the shape
                raise CheckpointError(f"{src.file}: tensor {src.name!r} of shape {src.shape} cannot take the "
                                      f"sharding asked for: {e}") from None
    return out

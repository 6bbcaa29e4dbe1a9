"""Export back to PyTorch: .safetensors (HF-style shards + index past `max_shard_size`), .pt, or a
Hugging Face model directory. Writes are atomic and stream one tensor at a time.

Example:
    >>> bridge.export(jm, "out/model.safetensors")
    >>> bridge.export(jm, "out/hf_model", like="path/to/original_hf_dir")   # from_pretrained loads it
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch
from jax.experimental import multihost_utils

from bridge.atomic import atomic_path, publish, staging_dir
from bridge.errors import ExportError
from bridge.hf_layout import checkpoint_entries, checkpoint_layout, layout_of
from bridge.pt2 import write_program
from bridge.safetensors_io import CODES, write_file
from bridge.state import gathered as _gathered, to_state_dict
from bridge.tree import flatten
from converters.dtypes import numpy_dtype, to_numpy, to_torch, torch_dtype

WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|msgpack|h5|ckpt|onnx|onnx_data|gguf)$|.*\.index\.json$")
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """'5GB' → 5e9, '500MiB' → 500·2^20, ints pass through."""
    if isinstance(size, int) or str(size).strip().isdigit():   # a byte count, as transformers takes
        return int(size)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]I?B)\s*", str(size).upper())
    if not m:
        raise ExportError(f"max_shard_size {size!r} is not a size like '5GB' or '500MB'")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def cast_dtype(dtype) -> torch.dtype | None:
    """The floating torch dtype an export casts to (`torch.bfloat16`, "bfloat16", jnp.float16), or None."""
    if dtype is None:
        return None
    try:
        out = getattr(torch, dtype) if isinstance(dtype, str) else \
            dtype if isinstance(dtype, torch.dtype) else torch_dtype(dtype)
    except (AttributeError, TypeError):
        out = None
    if not isinstance(out, torch.dtype) or not out.is_floating_point:
        raise ExportError(f"dtype={dtype!r}: exports cast to a floating dtype such as 'bfloat16' or 'float16'")
    return out


def _casts(dtype: torch.dtype, cast: torch.dtype | None) -> bool:
    """Whether `module.to(cast)` would change a tensor of `dtype` (floating point, not complex)."""
    return cast is not None and dtype.is_floating_point and dtype != cast


def _entries(obj, cast: torch.dtype | None = None) -> list[tuple[str, torch.dtype, tuple, Any]]:
    """(key, torch dtype, shape, producer) for each distinct tensor, in state_dict order."""
    meta = getattr(obj, "meta", None)   # a JaxModule or SavedState
    if meta is not None:
        flat = {**flatten(obj.buffers), **flatten(obj.params)}
        keys, seen, out = meta.state_dict_keys, set(), []
        for key in keys:
            canon = meta.aliases.get(key, key)
            if canon in seen:
                continue  # tied: written once, under its first name (as transformers does)
            seen.add(canon)
            out.append(_entry(key, flat[canon], meta.torch_dtypes.get(canon), cast))
        return out
    return [_entry(k, v, None, cast) for k, v in flatten(obj).items()]


def _entry(key, leaf, dtype, cast):
    if isinstance(leaf, torch.Tensor):   # a torch state_dict: its exact bits and dtype
        leaf, dtype = to_numpy(leaf), leaf.dtype
    if not hasattr(leaf, "__array__") or not hasattr(leaf, "shape"):
        raise ExportError(f"cannot export {key!r}: {type(leaf).__name__} is not an array (weights never loaded?)")
    dtype = dtype or torch_dtype(leaf.dtype)
    if _casts(dtype, cast):
        def produce():   # torch's own rounding (Tensor.to), bit for bit
            return to_numpy(to_torch(np.asarray(leaf), dtype).to(cast))
        return key, cast, tuple(leaf.shape), produce

    def produce():  # gathers this one (possibly sharded) array to host
        arr = np.asarray(leaf)
        want = numpy_dtype(dtype)
        return arr if arr.dtype == want else arr.astype(want)

    return key, dtype, tuple(leaf.shape), produce


def _cast_state_dict(sd, cast):
    """`sd` with floating tensors cast as `module.to(cast)` casts them; tied tensors stay shared."""
    made = {}
    for k, t in sd.items():
        if _casts(t.dtype, cast):
            if id(t) not in made:
                made[id(t)] = t.to(cast)
            sd[k] = made[id(t)]
    return sd


def _set_config_dtype(folder: Path, cast: torch.dtype) -> None:
    """config.json records the dtype the weights are stored in (from_pretrained(dtype="auto") reads it)."""
    path = folder / "config.json"
    if cast is None or not path.is_file():
        return
    cfg = json.loads(path.read_text())
    name = str(cast).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]
    cfg.update({k: name for k in keys})
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _nbytes(entry) -> int:
    return int(np.prod(entry[2])) * numpy_dtype(entry[1]).itemsize


def _plan(entries, max_bytes: int) -> list[list]:
    shards, cur, size = [], [], 0
    for e in entries:
        if cur and size + _nbytes(e) > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += _nbytes(e)
    return shards + [cur] if cur or not shards else shards


def _write_safetensors(folder: Path, stem: str, entries, max_bytes: int) -> list[str]:
    """Write one file or shards + index into `folder`; returns the file names written."""
    for key, dtype, *_ in entries:
        if key == "__metadata__":   # the header's own slot: the tensor would be lost
            raise ExportError("cannot write a tensor named '__metadata__' to safetensors, whose header keeps its "
                              "metadata under that name (export to .pt keeps it)")
        if dtype not in CODES:
            raise ExportError(f"cannot write {key!r} to safetensors: the format has no code for {dtype} "
                              "(export to .pt keeps it)")
    shards = _plan(entries, max_bytes)
    if len(shards) == 1:
        write_file(folder / f"{stem}.safetensors", shards[0], metadata={"format": "pt"})
        return [f"{stem}.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        write_file(folder / name, shard, metadata={"format": "pt"})
        names.append(name)
        weight_map.update({e[0]: name for e in shard})
    index = {"metadata": {"total_size": sum(_nbytes(e) for e in entries)}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names + [f"{stem}.safetensors.index.json"]


def _is_diffusers(like) -> bool:
    """A diffusers model (ConfigMixin: `save_config`) or directory (`_diffusers_version` in its config.json)."""
    if like is None or hasattr(like, "save_config"):
        return like is not None
    if isinstance(like, (str, os.PathLike)) and (Path(like) / "config.json").is_file():
        try:
            return "_diffusers_version" in json.loads((Path(like) / "config.json").read_text())
        except (OSError, ValueError):
            return False
    return False


def _copy_like(like, folder: Path) -> None:
    if like is None:
        return
    if hasattr(like, "save_config") and hasattr(like, "config"):           # a diffusers model
        like.save_config(folder)
        return
    if hasattr(like, "save_pretrained") and hasattr(like, "config"):      # a transformers model
        like.config.save_pretrained(folder)
        if getattr(like, "generation_config", None) is not None:
            like.generation_config.save_pretrained(folder)
        return
    if hasattr(like, "save_pretrained") and hasattr(like, "to_dict"):      # a config
        like.save_pretrained(folder)
        return
    src = Path(like)
    if not src.is_dir():
        raise ExportError(f"like={str(like)!r}: not a Hugging Face directory, model or config")
    modules = _sentence_transformers_modules(src)
    for f in src.iterdir():   # sentence-transformers keeps its pooling, dense and normalize modules in folders
        if f.is_file() and not WEIGHT_FILE.match(f.name):
            shutil.copy2(f, folder / f.name)
        elif f.is_dir() and not f.name.startswith("."):   # other folders' weights: the model in other formats
            own = f.name in modules                          # (onnx/, openvino/), stale once it is trained
            shutil.copytree(f, folder / f.name, dirs_exist_ok=True, ignore=lambda _, names, own=own: [
                n for n in names if n.startswith(".") or (WEIGHT_FILE.match(n) and not own)])


def _sentence_transformers_modules(src: Path) -> set[str]:
    """The folders of the modules a sentence-transformers directory chains after the transformer (a Dense
    head's weights are its own: bridge exported only the transformer's)."""
    try:
        return {m["path"] for m in json.loads((src / "modules.json").read_text()) if m.get("path")}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return set()


def _is_peft(like) -> bool:
    return hasattr(like, "peft_config") and hasattr(like, "get_base_model")


def _adapter_entries(like, entries) -> tuple[str, list]:
    """The active adapter's name and entries, keyed as PEFT saves an adapter (`get_peft_model_state_dict`: only
    the adapter's tensors, the adapter name left out), found on meta stand-ins so nothing else is read."""
    from peft.utils import get_peft_model_state_dict
    adapter = like.active_adapter if isinstance(like.active_adapter, str) else like.active_adapter[0]
    stand_ins = {key: torch.empty(shape, dtype=dtype, device="meta") for key, dtype, shape, _ in entries}
    by_id = {id(t): e for t, e in zip(stand_ins.values(), entries)}
    out = []
    for key, t in get_peft_model_state_dict(like, state_dict=stand_ins, adapter_name=adapter).items():
        if id(t) not in by_id:
            raise ExportError(f"PEFT's adapter state names {key!r}, which is none of the model's tensors")
        out.append((key, *by_id[id(t)][1:]))
    if not out:
        raise ExportError(f"like= is a PEFT model whose adapter {adapter!r} has no tensors among the exported ones")
    return adapter, out


def export(obj, path: str | os.PathLike, *, like=None, max_shard_size: int | str = "5GB",
           format: str | None = None, dtype=None) -> Path:
    """Write a JaxModule's (or params pytree's) weights for PyTorch.

    Args:
      path: `*.safetensors` (sharded with an index past max_shard_size), `*.pt`/`*.pth`/`*.bin`, `*.pt2` (the
        converted program with these weights, for torch.export.load; a JaxModule only), or a directory (a
        Hugging Face model directory: weights + files copied from `like`).
      like: a Hugging Face directory, model or config whose config/tokenizer files to copy; a PEFT model (LoRA...):
        the directory is its active adapter as PEFT saves it (adapter_model.safetensors + adapter_config.json,
        for `PeftModel.from_pretrained(base, path)`).
      format: "safetensors", "pt", "pt2" or "hf" to override the choice by suffix.
      dtype: cast floating tensors as `module.to(dtype)` would (e.g. "bfloat16" for serving); integer,
        bool and complex tensors keep theirs; a Hugging Face config.json records the new dtype.
    Returns the path written (for sharded files: the index).

    Multi-host: call it on every process. Arrays sharded across processes are gathered (each process
    then holds the whole model in host memory for the moment), process 0 writes, and every process
    returns once the files are in place.

    Example:
      >>> bridge.export(jm, "out_dir", like="original_hf_dir")
    """
    path = Path(path)
    fmt = format or ("safetensors" if path.suffix == ".safetensors" else
                     "pt" if path.suffix in (".pt", ".pth", ".bin") else "pt2" if path.suffix == ".pt2" else "hf")
    if fmt not in ("safetensors", "pt", "pt2", "hf"):
        raise ExportError(f"format={format!r}: expected 'safetensors', 'pt', 'pt2' or 'hf'")
    max_bytes, cast = parse_size(max_shard_size), cast_dtype(dtype)
    if fmt == "pt2" and (cast is not None or like is not None):
        raise ExportError(f"{path}: a .pt2 program keeps its own dtypes and holds no config; drop dtype= / like=")
    if jax.process_count() == 1:
        return _export(obj, path, fmt, like, max_bytes, cast)
    obj = _gathered(obj)
    written, error = None, None
    if jax.process_index() == 0:
        try:
            written = _export(obj, path, fmt, like, max_bytes, cast)
        except Exception as e:   # the other processes must still hear of it, not wait forever
            error = e
    ok = multihost_utils.process_allgather(np.array(error is None))
    if error is not None:
        raise error
    if not np.all(ok):
        raise ExportError(f"process 0 failed to write {path}; see its log")
    if written is None:          # where process 0 wrote: one safetensors file, or shards and their index
        shards = len(_plan(_entries(obj, cast), max_bytes)) if fmt == "safetensors" else 1
        suffix = ".safetensors" if shards == 1 else ".safetensors.index.json"
        written = path.parent / f"{_stem(path)}{suffix}" if fmt == "safetensors" else path
    return written


def _stem(path: Path) -> str:
    return path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name


def _export(obj, path: Path, fmt: str, like, max_bytes: int, cast: torch.dtype | None) -> Path:
    if fmt == "pt2":
        return write_program(obj, path)
    if fmt == "pt":
        sd = _cast_state_dict(to_state_dict(obj), cast)
        with atomic_path(path) as tmp:
            try:
                torch.save(sd, tmp)
            except RuntimeError as e:   # torch's zip writer reports a failed write (a full disk) so
                raise ExportError(f"cannot write {path}: {e}") from e
        return path
    entries = _entries(obj, cast)
    if fmt == "hf" and _is_peft(like):
        def fill(tmp):
            adapter, adapter_entries = _adapter_entries(like, entries)
            _write_safetensors(tmp, "adapter_model", adapter_entries, max_bytes)
            like.peft_config[adapter].save_pretrained(tmp)
        return _write_dir(path, fill, ("adapter_model",))
    if fmt == "hf":
        diffusers = _is_diffusers(like)
        if not diffusers:   # a transformers model whose checkpoints use other names: as save_pretrained writes
            layout = checkpoint_layout(like) if like is not None else layout_of(getattr(obj, "meta", None))
            entries = checkpoint_entries(layout, entries)

        def fill(tmp):   # diffusers names its weights diffusion_pytorch_model
            _write_safetensors(tmp, "diffusion_pytorch_model" if diffusers else "model", entries, max_bytes)
            _copy_like(like, tmp)
            if not diffusers:   # diffusers' from_pretrained takes the dtype as an argument, not from config.json
                _set_config_dtype(tmp, cast)
        return _write_dir(path, fill, ("diffusion_pytorch_model",) if diffusers else ("model", "pytorch_model"))
    stem = _stem(path)
    with staging_dir(path) as tmp:
        names = _write_safetensors(tmp, stem, entries, max_bytes)
        publish(tmp, names, path.parent)  # shards first, the index (or single file) last
    _remove_stale(path.parent, names, (stem,))
    return path.parent / names[-1]


def _write_dir(path: Path, fill, stems: tuple[str, ...]) -> Path:
    """A model directory: built aside and renamed into place when new. An existing one is written into, as
    save_pretrained does: the user's other files stay, and an earlier export's weight files of `stems` (shards
    this one does not have, a single file it now shards) go, so no loader can pick stale weights; an adapter
    export leaves a base model's weights beside it alone."""
    if not path.exists():
        with atomic_path(path, directory=True) as tmp:
            fill(tmp)
        return path
    if not path.is_dir():
        raise ExportError(f"{path} exists and is not a directory; a Hugging Face export writes a directory")
    with staging_dir(path) as tmp:
        fill(tmp)
        names = sorted((str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()),
                       key=lambda n: (n.endswith(".index.json"), n))   # the index last
        publish(tmp, names, path)
    _remove_stale(path, names, stems)
    return path


def _remove_stale(folder: Path, names: list[str], stems) -> None:
    """Delete `folder`'s weight files of these stems (single, shards, index) that this export did not write."""
    pattern = re.compile(rf"({'|'.join(map(re.escape, stems))})(-\d{{5}}-of-\d{{5}})?\.(safetensors|bin)"
                         rf"(\.index\.json)?")
    for f in folder.iterdir():
        if f.is_file() and pattern.fullmatch(f.name) and f.name not in names:
            f.unlink()

"""The .safetensors format, read and written one tensor at a time.

Streaming reads use plain positioned reads, so streaming a checkpoint costs one tensor of memory; a
slice read (for sharded placement) touches only that slice's rows; a full load maps the file
copy-on-write and adopts 64-byte-aligned tensors without copying (`MappedFile`). Every header is
validated first: size, JSON, dtypes, shapes, offsets in bounds and non-overlapping.
Writing streams tensor bytes after a header computed up front, with the data section and every tensor
whose size allows it on a 64-byte boundary (what zero-copy adoption needs); files are readable by the
`safetensors` library (the tests check it) and by `transformers.from_pretrained`.

Example:
    >>> infos, metadata = read_header("model.safetensors")
    >>> arr = read_tensor("model.safetensors", infos["wte.weight"])
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from bridge.errors import CheckpointError
from bridge.host_memory import ALIGN, aligned_empty
from converters.dtypes import numpy_dtype

MAX_HEADER = 100 * 1024 * 1024
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "C64": torch.complex64,
}
CODES = {v: k for k, v in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int   # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict]:
    """Parse and validate the header; returns ({name: TensorInfo} in file order, metadata)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes, no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n > size - 8:
                raise CheckpointError(f"{path}: header length {n} bytes exceeds "
                                      f"{'the 100 MB limit' if n > MAX_HEADER else f'the file size {size}'}")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    metadata = header.pop("__metadata__", None) or {}
    base, infos = 8 + n, {}
    for name, entry in header.items():
        if isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and entry["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry['dtype']!r}, which bridge does not "
                                  f"read (it reads {', '.join(DTYPES)})")
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            lo, hi = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from e
        expected = math.prod(shape) * numpy_dtype(dtype).itemsize
        if min(shape, default=0) < 0 or hi - lo != expected or lo < 0:
            raise CheckpointError(f"{path}: tensor {name!r} offsets [{lo}, {hi}) do not hold "
                                  f"shape {shape} of {entry['dtype']} ({expected} bytes)")
        if base + hi > size:
            raise CheckpointError(f"{path}: tensor {name!r} ends at byte {base + hi} but the file has {size} "
                                  "bytes (truncated file or offsets out of bounds)")
        infos[name] = TensorInfo(name, dtype, shape, base + lo, base + hi)
    spans = sorted((i.start, i.end, i.name) for i in infos.values() if i.end > i.start)
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise CheckpointError(f"{path}: tensors {an!r} and {bn!r} overlap (bytes {b0}..{min(a1, b1)})")
    return infos, metadata


def read_tensor(path: str | os.PathLike, info: TensorInfo, *, aligned: bool = True) -> np.ndarray:
    """The whole tensor as a fresh numpy array (exact dtype, bf16 included). `aligned`: in fresh
    page-aligned memory, so `jax.device_put` on CPU adopts the buffer instead of copying it; a
    streaming reader that drops each tensor is faster reusing heap memory (aligned=False)."""
    dtype = numpy_dtype(info.dtype)
    out = aligned_empty(info.shape, dtype) if aligned else np.empty(info.shape, dtype)
    with open(path, "rb", buffering=0) as f:
        f.seek(info.start)
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = 0
        while got < info.nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise CheckpointError(f"{path}: truncated while reading tensor {info.name!r}")
            got += n
    return out


def read_slice(path: str | os.PathLike, info: TensorInfo, index: tuple) -> np.ndarray:
    """Only the rows/columns of `index` (a tuple of slices), read through a memory map of this tensor."""
    if not info.shape:
        return read_tensor(path, info)
    mm = np.memmap(path, dtype=numpy_dtype(info.dtype), mode="r", offset=info.start, shape=info.shape)
    try:
        return np.array(mm[index], copy=True)
    finally:
        del mm


def write_file(path: str | os.PathLike, tensors: Iterable[tuple[str, torch.dtype, tuple[int, ...],
                                                              Callable[[], np.ndarray]]],
               metadata: dict[str, str] | None = None) -> int:
    """Stream tensors into a safetensors file: (name, torch dtype, shape, producer of the host array).

    Producers are called one at a time, so only one tensor is held in memory. Returns bytes written.
    """
    entries = list(tensors)
    sizes = [math.prod(shape) * numpy_dtype(dtype).itemsize for _, dtype, shape, _ in entries]
    # header in the given order; bytes laid out with 64-byte multiples first, so each of them starts aligned
    layout = sorted(range(len(entries)), key=lambda i: sizes[i] % ALIGN != 0)
    spans, offset = {}, 0
    for i in layout:
        spans[i], offset = [offset, offset + sizes[i]], offset + sizes[i]
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    for i, (name, dtype, shape, _) in enumerate(entries):
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": spans[i]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)  # the data section starts on a 64-byte boundary
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape, produce in (entries[i] for i in layout):
            arr = np.require(produce(), requirements="C")  # (ascontiguousarray would make 0-d 1-d)
            if arr.shape != tuple(shape) or arr.dtype != numpy_dtype(dtype):
                raise CheckpointError(f"{path}: tensor {name!r} produced {arr.dtype}{arr.shape}, "
                                      f"header says {numpy_dtype(dtype)}{tuple(shape)}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            del arr
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset

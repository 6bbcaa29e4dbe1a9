"""Host memory for loaded tensors: copy-on-write file maps that JAX adopts without copying, and fresh
aligned buffers for everything else.

XLA's CPU client adopts a numpy buffer as a `jax.Array` (no copy) when it is 64-byte aligned. A
checkpoint mapped MAP_PRIVATE is shared with the page cache until written, so a full load costs page
table entries instead of a second copy of every byte in fresh memory (which is what bounds a copying
load: faulting in new anonymous pages is slower than reading cached file pages on many VMs).

Example:
    >>> mf = MappedFile("model.safetensors")
    >>> w = mf.array(start, end, np.float32, (4, 4))   # a resident view of the file's pages, or None
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os
import sys

import numpy as np

ALIGN = 64
_MADV_POPULATE_READ = 22  # Linux >= 5.14: fault the range in read-only, one call


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised array in fresh anonymous pages (page-aligned, no transparent-huge-page stalls)."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes < (1 << 20):
        return np.empty(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), np.uint8).view(dtype).reshape(shape)


def adoptable(arr: np.ndarray) -> bool:
    """True when `jax.device_put(arr)` on CPU takes the buffer as is."""
    return arr.flags.c_contiguous and arr.ctypes.data % ALIGN == 0


def _madvise():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_MADVISE = _madvise() if sys.platform.startswith("linux") else None
_CAN_MAP = hasattr(mmap, "MAP_PRIVATE")  # POSIX; elsewhere every tensor is read into fresh memory


def populate(arr: np.ndarray) -> np.ndarray:
    """Make a mapped array's pages resident now (read faults only: copy-on-write stays shared)."""
    if arr.nbytes == 0:
        return arr
    page = mmap.PAGESIZE
    lo = arr.ctypes.data // page * page
    if _MADVISE is None or _MADVISE(lo, arr.ctypes.data + arr.nbytes - lo, _MADV_POPULATE_READ) != 0:
        flat = arr.reshape(-1).view(np.uint8)
        int(flat[::page].sum())  # older kernels: touch one byte per page (the kernel maps around it)
    return arr


class MappedFile:
    """A whole file mapped private and copy-on-write, opened on first use, shared by its tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path, self._bytes = path, None

    def bytes(self) -> np.ndarray:
        if self._bytes is None:
            with open(self.path, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self._bytes = np.frombuffer(m, np.uint8)
        return self._bytes

    def array(self, start: int, end: int, dtype, shape) -> np.ndarray | None:
        """Bytes [start, end) as a resident view of the map, or None where JAX could not adopt it
        (unaligned: the caller reads a copy instead, leaving these pages unmapped)."""
        if start % ALIGN or not _CAN_MAP:
            return None
        return populate(self.bytes()[start:end].view(dtype).reshape(shape))

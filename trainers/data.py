"""Host data → global sharded batches, prefetched in a background thread.

Any iterable of batches works: dicts or tuples of numpy arrays or torch tensors (a DataLoader too), nested, with
PackedSequences among them.
Each process passes its local rows; `jax.make_array_from_process_local_data` assembles the global batch.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Iterable, Iterator

import jax
import numpy as np
import torch

from bridge.errors import InputError
from converters.dtypes import narrow, to_numpy
from converters.packed import packed_inputs


def to_host(batch) -> Any:
    """torch tensors → numpy (exact dtypes), recursively; int64 narrowed as JAX will hold it (values
    int32 cannot hold raise InputError rather than wrap); a PackedSequence → its PackedInput (padded, lengths)."""
    def leaf(x):
        arr = to_numpy(x) if isinstance(x, torch.Tensor) else np.asarray(x)
        return narrow(arr, jax.dtypes.canonicalize_dtype(arr.dtype), "a batch", InputError)

    def walk(x, top=False):   # a list inside a dict is one array (nested Python lists of ids), as before
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, tuple) and hasattr(x, "_fields"):   # a NamedTuple (PackedInput) keeps its type
            return type(x)(*map(walk, x))
        if top and isinstance(x, (list, tuple)):
            return tuple(walk(v) for v in x)
        return leaf(x)

    return walk(packed_inputs(batch), top=True)


def local_rows(batch, process_index: int, process_count: int):
    """This process's share of a global host batch (used when every process reads the same stream)."""
    def take(x):
        n = x.shape[0] // process_count
        return x[process_index * n:(process_index + 1) * n]
    return jax.tree.map(take, batch)


def place(batch, sharding) -> Any:
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


class Prefetcher:
    """Iterates `place(to_host(b))` for b in batches, `size` ahead, in a daemon thread."""

    _END = object()

    def __init__(self, batches: Iterable, convert, size: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=max(size, 1))
        self._convert = convert
        self._thread = threading.Thread(target=self._run, args=(iter(batches),), daemon=True)
        self._stop = threading.Event()
        self._thread.start()

    def _run(self, it: Iterator):
        try:
            for b in it:
                if self._stop.is_set():
                    return
                self._q.put(self._convert(b))
        except BaseException as e:  # surfaced to the consumer on the next __next__
            self._q.put(e)
            return
        self._q.put(self._END)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._q.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self, timeout: float = 60.0):
        """Stop the thread and wait for it: a daemon thread still inside XLA's C++ (a device_put) when the
        interpreter exits is unwound there, which aborts the process. A source that blocks longer than
        `timeout` is left behind."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                while True:   # room for the one batch it may still be putting
                    self._q.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(0.05)

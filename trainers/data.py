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
    int32 cannot hold raise InputError rather than wrap); a PackedSequence → its PackedInput (padded, lengths).
    An entry JAX cannot hold (strings, Python objects) raises InputError naming it."""
    def leaf(x, path):
        arr = to_numpy(x) if isinstance(x, torch.Tensor) else np.asarray(x)
        if not (jax.dtypes.issubdtype(arr.dtype, np.number) or jax.dtypes.issubdtype(arr.dtype, np.bool_)):
            raise InputError(f"batch{path}: holds {arr.dtype} values (strings or Python objects?), which JAX cannot "
                             "hold; the trainer places every entry of a batch on the devices: drop it from the batch "
                             "or encode it as numbers")
        return narrow(arr, jax.dtypes.canonicalize_dtype(arr.dtype), f"batch{path}", InputError)

    def walk(x, path="", top=False):   # a list inside a dict is one array (nested Python lists of ids), as before
        if isinstance(x, dict):
            return {k: walk(v, f"{path}[{k!r}]") for k, v in x.items()}
        if isinstance(x, tuple) and hasattr(x, "_fields"):   # a NamedTuple (PackedInput) keeps its type
            return type(x)(*(walk(v, f"{path}.{f}") for f, v in zip(x._fields, x)))
        if top and isinstance(x, (list, tuple)):
            return tuple(walk(v, f"{path}[{i}]") for i, v in enumerate(x))
        return leaf(x, path)

    return walk(packed_inputs(batch), top=True)


def row_count(batch) -> int:
    """The rows of a host batch: the leading dim all its entries share. An entry without one (a 0-d step or
    epoch counter) or entries of different row counts raise InputError naming them."""
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not leaves:
        raise InputError("a batch without arrays")
    by_rows: dict[int, list[str]] = {}
    for path, x in leaves:
        name = "batch" + jax.tree_util.keystr(path)
        if np.ndim(x) == 0:
            raise InputError(f"{name}: a 0-d value ({x!r}); every entry of a batch is split by its leading dim "
                             "(the rows) over the data-parallel shards: drop it from the batch or give it per row")
        by_rows.setdefault(x.shape[0], []).append(name)
    if len(by_rows) > 1:
        seen = "; ".join(f"{n} rows: {', '.join(names[:3])}" for n, names in sorted(by_rows.items()))
        raise InputError(f"the entries of a batch have different numbers of rows ({seen}); every entry's "
                         "leading dim must be the batch's rows")
    return next(iter(by_rows))


def local_rows(batch, process_index: int, process_count: int):
    """This process's share of a global host batch (used when every process reads the same stream): contiguous,
    every row to exactly one process. Rows that do not divide over the processes give unequal shares (they
    differ by one), which the Trainer skips on every process with a warning, as one process skips a batch
    whose rows do not divide over the data-parallel shards: no row is dropped silently."""
    def take(x):
        n = x.shape[0]
        return x[n * process_index // process_count:n * (process_index + 1) // process_count]
    return jax.tree.map(take, batch)


def place(batch, sharding, rows: int | None = None) -> Any:
    """Every entry as one global array from this process's rows; `rows`: the global batch's rows (default: this
    process's rows x the processes the sharding splits the rows over)."""
    def one(x):
        shape = None if rows is None else (rows, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)
    return jax.tree.map(one, batch)


class Prefetcher:
    """Iterates `convert(b)` for b in batches, `size` ahead, in a daemon thread."""

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

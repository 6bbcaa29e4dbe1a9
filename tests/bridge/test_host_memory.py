"""Zero-copy loading: aligned file layout, adoption of mapped tensors, and the safety of the mapping."""
from __future__ import annotations

import hashlib
import json
import os
import struct

import jax
import numpy as np
import pytest
import safetensors.torch
import torch

import bridge
import bridge.safetensors_io as sio
from bridge.tree import flatten
from converters.dtypes import numpy_dtype, to_numpy

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")

TENSORS = {  # sizes: 64-byte multiples and odd ones, in an order that puts odd ones first
    "a.bias": torch.randn(3).bfloat16(), "b.weight": torch.randn(64, 16),
    "c.codes": torch.arange(100, dtype=torch.int8),
    "d.weight": torch.randn(32, 48).half(), "e.scale": torch.randn(5, 7), "f.ids": torch.arange(256, dtype=torch.int32),
}


def _write(path, tensors=TENSORS):
    sio.write_file(path, [(k, t.dtype, tuple(t.shape), lambda t=t: to_numpy(t)) for k, t in tensors.items()])


def _mapped_ranges(path):
    real, out = os.path.realpath(path), []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == real:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi))
    return out


def _adopted(arr, ranges):
    p = arr.unsafe_buffer_pointer()
    return any(lo <= p < hi for lo, hi in ranges)


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_written_layout_is_aligned_and_standard(tmp_path):
    _write(tmp_path / "m.safetensors")
    raw = open(tmp_path / "m.safetensors", "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert (8 + n) % 64 == 0
    assert list(header) == list(TENSORS)                                   # header keeps the given order
    for k, t in TENSORS.items():
        lo, hi = header[k]["data_offsets"]
        assert hi - lo == t.numel() * t.element_size()
        if (hi - lo) % 64 == 0:
            assert lo % 64 == 0, k
    ref = safetensors.torch.load_file(tmp_path / "m.safetensors")          # the reference reader agrees
    assert all(torch.equal(ref[k], t) and ref[k].dtype == t.dtype for k, t in TENSORS.items())


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("mmap", [True, False])
def test_aligned_tensors_are_adopted_from_the_file(tmp_path, fmt, mmap):
    path = tmp_path / f"m.{fmt}"
    _write(path) if fmt == "safetensors" else torch.save(TENSORS, path)
    params = flatten(bridge.load_weights(path, mmap=mmap))
    ranges = _mapped_ranges(path)
    # torch.save puts every storage on a 64-byte boundary; our writer every 64-byte-multiple tensor
    starts = {k: i.start for k, i in sio.read_header(path)[0].items()} if fmt == "safetensors" else None
    for k, t in TENSORS.items():
        got = np.asarray(params[k])
        assert got.dtype == numpy_dtype(t.dtype) and got.tobytes() == to_numpy(t).tobytes(), k
        aligned = starts is None or starts[k] % 64 == 0
        assert aligned or (t.numel() * t.element_size()) % 64, k
        assert _adopted(params[k], ranges) == (mmap and aligned), k
    if mmap:
        assert ranges, "the checkpoint should be mapped"


def test_replacing_the_file_leaves_loaded_arrays_alone(tmp_path):
    path = tmp_path / "m.safetensors"
    _write(path)
    params = flatten(bridge.load_weights(path))
    before = {k: np.asarray(v).tobytes() for k, v in params.items()}
    bridge.export({k: np.zeros(t.shape, numpy_dtype(t.dtype)) for k, t in TENSORS.items()}, path)  # temp + rename
    assert {k: np.asarray(v).tobytes() for k, v in params.items()} == before
    reloaded = flatten(bridge.load_weights(path))
    assert all(not np.asarray(v).any() for v in reloaded.values())


def test_writes_to_adopted_arrays_never_reach_the_file(tmp_path):
    path = tmp_path / "m.safetensors"
    _write(path)
    sha = _sha(path)
    params = flatten(bridge.load_weights(path))
    ranges = _mapped_ranges(path)
    assert _adopted(params["b.weight"], ranges)
    step = jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)
    new = step({k: params[k] for k in ("b.weight", "d.weight", "f.ids")})
    np.testing.assert_array_equal(np.asarray(new["b.weight"]), TENSORS["b.weight"].numpy() + 1)
    assert _sha(path) == sha
    again = flatten(bridge.load_weights(path))
    assert np.asarray(again["b.weight"]).tobytes() == TENSORS["b.weight"].numpy().tobytes()

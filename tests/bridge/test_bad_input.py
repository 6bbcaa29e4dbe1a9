"""Bad input: every fault gets a bridge.errors class naming the file and the fault; nothing is left behind."""
from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile

import pytest
import safetensors.torch
import torch

import bridge
from bridge.errors import CheckpointError, ExportError, KeyMismatchError
from tests.models import MODELS


def _st(tmp_path, header: dict | bytes, data: bytes = b"", name="m.safetensors"):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _write(path, data):
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def _good(tmp_path, name="m.safetensors"):
    safetensors.torch.save_file({"a": torch.randn(4, 4), "b": torch.randn(8)}, tmp_path / name)
    return tmp_path / name


CASES = {
    "truncated": (lambda p: (lambda f: _write(f, f.read_bytes()[:-10]))(_good(p)), "truncated"),
    "corrupt header": (lambda p: _st(p, b"{not json"), "corrupt safetensors header"),
    "oversized header": (lambda p: _write(p / "m.safetensors", struct.pack("<Q", 2**40) + b"{}"), "header length"),
    "out of bounds": (lambda p: _st(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
                      "'a' ends at byte"),
    "overlapping": (lambda p: _st(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24),
                    "overlap"),
    "wrong size": (lambda p: _st(p, {"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, b"\0" * 16),
                   "do not hold shape"),
    "text file": (lambda p: _write(p / "model.safetensors", "just some notes\n" * 3), "header length"),
    "text .bin": (lambda p: _write(p / "pytorch_model.bin", "hello"), "not a readable torch checkpoint"),
    "empty dir": (lambda p: (p / "empty").mkdir() or p / "empty", "no checkpoint found"),
    "missing shard": (lambda p: _write(p / "model.safetensors.index.json", json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors"}})), "model-00001-of-00002.safetensors"),
    "no such path": (lambda p: p / "nowhere.safetensors", "no such file"),
    "unknown dtype": (lambda p: _st(p, {"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"),
                      "'a' has dtype 'F4', which bridge does not read"),
    "whole module": (lambda p: torch.save(torch.nn.Linear(2, 2), p / "m.pt") or p / "m.pt",
                     "it pickles a torch.nn.modules.linear.Linear object). Save model.state_dict()"),
    "torchscript": (lambda p: torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), p / "m.pt") or p / "m.pt",
                    "a TorchScript archive (torch.jit.save)"),
    "index map is a list": (lambda p: _write(p / "m.safetensors.index.json", json.dumps({"weight_map": ["a"]})),
                            "'weight_map' is a list"),
    "index names itself": (lambda p: _write(p / "m.safetensors.index.json", json.dumps(
        {"weight_map": {"a": "m.safetensors.index.json"}})), "'a' is assigned to 'm.safetensors.index.json'"),
    "sparse tensor": (lambda p: torch.save({"w": torch.eye(3).to_sparse()}, p / "m.pt") or p / "m.pt",
                      "'w' is torch.sparse_coo"),
    "quantized tensor": (lambda p: torch.save({"w": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)},
                                              p / "m.pt") or p / "m.pt", "'w' is torch.qint8"),
    # bitsandbytes keeps quantization state under the weight's name: no tree of names holds both
    "name is a prefix": (lambda p: safetensors.torch.save_file(
        {"w": torch.ones(2), "w.absmax": torch.ones(1)}, p / "m.safetensors") or p / "m.safetensors",
        "'w' names a value and is also a prefix of 'w.absmax'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoints_raise_named_errors(case, tmp_path):
    make, fault = CASES[case]
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as info:
        bridge.load_weights(path)
    assert str(path) in str(info.value) and fault in str(info.value), str(info.value)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name,legacy", [("evil.pt", False), ("pytorch_model.bin", False), ("old.bin", True)])
def test_pickled_code_is_refused_and_never_run(tmp_path, name, legacy):
    marker = tmp_path / "pwned"
    obj = {"w": torch.zeros(2), "x": Payload(marker)}
    if legacy:
        (tmp_path / name).write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, tmp_path / name)
    with pytest.raises(CheckpointError, match="refused to load") as info:
        bridge.load_weights(tmp_path / name)
    assert name in str(info.value)
    assert not marker.exists(), "the payload ran"


def test_shape_mismatch_with_model_is_named(tmp_path):
    case = MODELS["mlp"]()
    sd = dict(case.module.state_dict())
    sd["net.0.weight"] = torch.zeros(64, 31)
    safetensors.torch.save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(KeyMismatchError, match=r"net\.0\.weight: model \(64, 32\), checkpoint \(64, 31\)"):
        bridge.convert(case.module, (torch.randn(2, 32),), weights=tmp_path / "m.safetensors")


def _readonly_dir(tmp_path):
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        return d
    for cand in ("/sys/kernel", "/sys"):  # root ignores permission bits; sysfs refuses new files even to root
        try:
            fd, name = tempfile.mkstemp(dir=cand)
        except OSError:
            return __import__("pathlib").Path(cand)
        os.close(fd)
        os.unlink(name)
    pytest.skip("no read-only directory available")


@pytest.mark.parametrize("target", ["model.safetensors", "model.pt", "hf_dir"])
@pytest.mark.parametrize("where", ["missing", "read-only"])
def test_export_to_unwritable_places(tmp_path, target, where):
    case = MODELS["mlp"]()
    jm = bridge.convert(case.module, (torch.randn(2, 32),))
    parent = tmp_path / "does" / "not" / "exist" if where == "missing" else _readonly_dir(tmp_path)
    before = set(os.listdir(parent)) if parent.exists() else None
    with pytest.raises(ExportError) as info:
        bridge.export(jm, parent / target)
    assert str(parent) in str(info.value)
    assert (set(os.listdir(parent)) if parent.exists() else None) == before  # nothing left behind


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    case = MODELS["mlp"]()
    jm = bridge.convert(case.module, (torch.randn(2, 32),))
    calls = {"n": 0}
    import bridge.safetensors_io as sio
    real = sio.np.require

    def dying(arr, requirements=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed mid-export")
        return real(arr, requirements=requirements)

    monkeypatch.setattr(sio.np, "require", dying)
    for target in ("out.safetensors", "hf_out"):
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            bridge.export(jm, tmp_path / target, max_shard_size="10KB")
        assert os.listdir(tmp_path) == [], os.listdir(tmp_path)

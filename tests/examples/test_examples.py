"""The scripts in examples/, run in-process through their `main(argv)` with short settings, under the
strict test configuration (8 simulated CPU devices, strict dtype promotion, rank promotion raises).

Each asserts the numbers the script reports: the loss fell, the exported weights reload in PyTorch and
agree with JAX, accuracy is equal in both frameworks, parity within fp32 tolerance.
`BRIDGE_TEST_FULL=1` adds the Llama and tied-GPT-2 variants.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from tests.conftest import full_only

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    """Import examples/<name>.py by path (an unrelated top-level `examples` package may be installed)."""
    spec = importlib.util.spec_from_file_location(f"bridge_examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- (a) Hugging Face causal LM, FSDP, export to a HF directory, reload -----------------------------
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("model", ["gpt2", pytest.param("llama", marks=[pytest.mark.slow, full_only])])
def test_hf_causal_lm_fsdp(tmp_path, model):
    ex = _load("hf_causal_lm_fsdp")
    r = ex.main(["--model", model, "--out", str(tmp_path), "--steps", "10", "--batch", "16", "--seq", "32",
                 "--layers", "2", "--width", "64", "--sample", "8", "--quiet"])
    assert r["devices"] == jax.device_count() and r["steps"] == 10 and len(r["losses"]) == 10
    assert np.all(np.isfinite(r["losses"]))
    assert abs(r["first_loss"] - np.log(256)) < 0.5, r["first_loss"]           # starts near uniform bytes
    assert r["final_loss"] < 0.85 * r["first_loss"], r["losses"]               # and clearly learns
    assert r["logits_rel_err"] <= 1e-5, r["logits_rel_err"]
    assert len(r["sample"]) > 0
    hf_dir = Path(r["hf_dir"])
    assert (hf_dir / "config.json").is_file() and (hf_dir / "model.safetensors").is_file()
    assert transformers.AutoConfig.from_pretrained(hf_dir).model_type == model
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


# -- (b) torch CNN with BatchNorm, trained in JAX, exported to .pt, evaluated in torch --------------
def test_cnn_digits_to_pt(tmp_path):
    ex = _load("cnn_digits_to_pt")
    steps = 60
    r = ex.main(["--out", str(tmp_path), "--steps", str(steps), "--batch", "64", "--quiet"])
    assert r["final_loss"] < 0.5 * r["first_loss"], (r["first_loss"], r["final_loss"])
    assert r["torch_accuracy"] == r["jax_accuracy"] and r["prediction_mismatches"] == 0
    assert r["torch_accuracy"] > 0.8, r["torch_accuracy"]                      # chance is 0.1
    assert r["logits_rel_err"] <= 1e-5, r["logits_rel_err"]
    # BatchNorm state trained in JAX: one running-stat update per step, no longer the init values
    assert r["bn_batches_tracked"] == steps and abs(r["bn_running_var_mean"] - 1.0) > 1e-3

    sd = torch.load(r["pt_path"], weights_only=True)
    fresh = ex.DigitsCNN()
    assert list(sd) == list(fresh.state_dict())
    assert all(sd[k].dtype == v.dtype and sd[k].shape == v.shape for k, v in fresh.state_dict().items())
    assert sd["features.1.num_batches_tracked"].dtype == torch.int64


# -- (c) meta-device build + convert(weights=safetensors) -------------------------------------------
@pytest.mark.parametrize("model", ["minilm", pytest.param("gpt2", marks=[pytest.mark.slow, full_only])])
def test_meta_device_safetensors(tmp_path, model):
    ex = _load("meta_device_safetensors")
    r = ex.main(["--model", model, "--out", str(tmp_path)])
    assert r["params_on_meta"] == r["param_tensors"] > 0 and r["torch_param_bytes"] == 0
    assert r["rel_err"] <= 1e-5, r["rel_err_per_batch"]
    assert len(r["rel_err_per_batch"]) == 2 and r["shapes"][0] != r["shapes"][1]
    if model == "minilm":
        assert 80 < r["weights_mb"] < 95                                       # the real 22.7M-parameter model
    assert r["peak_rss_growth_mb"] >= 0


# -- found while writing cnn_digits_to_pt.py: capture traces row-major copies of odd-strided examples --
def test_numpy_strided_example_input():
    import bridge

    ex = _load("cnn_digits_to_pt")
    images = np.random.default_rng(0).random((4, 8, 8), dtype=np.float32)
    x = torch.from_numpy(images[:, None][[0, 1]])           # strides (64, 1, 8, 1): legal, is_contiguous()
    assert x.is_contiguous() and x.stride() != (64, 64, 8, 1)
    model = ex.DigitsCNN(4).eval()
    jm = bridge.convert(model, (x,), dynamic="batch")
    with torch.no_grad():
        ref = model(x)
    np.testing.assert_allclose(np.asarray(jm(x.numpy())), ref.numpy(), rtol=1e-5, atol=1e-6)

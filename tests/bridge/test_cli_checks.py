"""`bridge convert` / `verify` / `inspect` / `train` / `demo` on inputs a demanding user gives: Hugging Face heads,
nested and non-tensor outputs, integer-only outputs, bf16 models, factory errors, random models, missing --out
parents, relative paths. Tiny factory models (this module's functions, `tests.bridge.test_cli_checks:NAME`)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from bridge import cli
from converters.registry import Lowering, _REGISTRY

HERE = "tests.bridge.test_cli_checks"


def _break_gelu(monkeypatch, scale=1.5):
    """gelu's JAX lowering off by a factor `scale`: a divergence at a known node."""
    op = torch.ops.aten.gelu.default
    ok = _REGISTRY[op]
    monkeypatch.setitem(_REGISTRY, op, Lowering(lambda x, approximate="none": ok.fn(x, approximate) * scale))


class Nested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        return h, {"logits": torch.nn.functional.gelu(self.b(h)), "ids": h.argmax(-1)}, [h.sum()]


def nested():
    torch.manual_seed(0)
    return Nested().eval(), (torch.randn(4, 8),)


class WithValues(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 5)

    def forward(self, x):
        return {"y": self.a(x), "n": 3, "name": "hi"}


def with_values():
    torch.manual_seed(0)
    return WithValues().eval(), (torch.randn(3, 4),)


class ArgMax(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 5)

    def forward(self, x):
        return self.a(x).argmax(-1)


def argmax():
    torch.manual_seed(0)
    return ArgMax().eval(), (torch.randn(3, 4),)


class RootGelu(torch.nn.Module):
    """gelu in the root module's own forward, not in a child."""
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.nn.functional.gelu(self.a(x))


def root_gelu():
    torch.manual_seed(0)
    return RootGelu().eval(), (torch.randn(4, 8),)


def bf16_gelu():
    torch.manual_seed(0)
    return RootGelu().to(torch.bfloat16).eval(), (torch.randn(4, 8, dtype=torch.bfloat16),)


class Noisy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + 0.1 * torch.randn_like(x)


def noisy():
    return Noisy().eval(), (torch.randn(2, 4),)


def raises():
    raise RuntimeError("factory exploded")


def needs_arg(hidden):
    return RootGelu(), (torch.randn(2, 8),)


not_callable = 3


def test_convert_hf_dir_builds_the_architecture_config_json_names(tmp_path, capsys):
    """A BertForSequenceClassification directory converts with its classifier head: the head's weights are
    exported unchanged, from_pretrained misses no key, and the logits are checked against torch."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, num_labels=3)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "src")
    assert cli.main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 0
    src = safetensors.torch.load_file(tmp_path / "src" / "model.safetensors")
    got = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    assert {"classifier.weight", "classifier.bias"} <= set(got) and set(got) == set(src)
    assert all(torch.equal(got[k], src[k]) for k in src)
    _, info = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert report["outputs"]["logits"]["shape"] == [2, 3] and report["outputs"]["logits"]["rel_err"] < 1e-5


def test_every_nested_output_is_compared(tmp_path, monkeypatch, capsys):
    """(h, {"logits", "ids"}, [sum]): every leaf by its path; a divergence only in the nested logits fails."""
    assert cli.main(["convert", f"{HERE}:nested", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert list(report["outputs"]) == ["0", "1.logits", "1.ids", "2.0"]
    assert all(r["rel_err"] < 1e-6 for r in report["outputs"].values()) and report["grad_rel_err"] < 1e-5
    assert report["outputs"]["1.ids"]["dtype"] == "int64" and report["outputs"]["2.0"]["shape"] == []
    capsys.readouterr()
    _break_gelu(monkeypatch)
    assert cli.main(["verify", f"{HERE}:nested"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: output 1.logits: relative error" in out
    assert "DIVERGED first at node gelu (aten.gelu.default) in layer '<root>'" in out   # root's own op, named


def test_python_values_in_the_output_are_compared_not_jitted(tmp_path, capsys):
    assert cli.main(["convert", f"{HERE}:with_values", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert report["outputs"]["y"]["rel_err"] < 1e-6
    assert report["values"] == {"n": {"torch": "3", "jax": "3", "equal": True},
                                "name": {"torch": "'hi'", "jax": "'hi'", "equal": True}}
    assert cli.main(["verify", f"{HERE}:with_values"]) == 0
    from bridge.parity import failures
    report["values"]["n"]["equal"] = False
    assert failures(report) == ["output n: JAX gives 3, torch 3"]


def test_integer_only_output_skips_the_gradient_check(tmp_path, capsys):
    assert cli.main(["convert", f"{HERE}:argmax", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert report["outputs"]["output"] == {"shape": [3], "dtype": "int64", "max_abs_err": 0.0, "rel_err": 0.0}
    assert report["grad_note"] == "gradient check skipped: no floating-point output"
    assert "gradient check skipped" in capsys.readouterr().out


def test_bf16_models_judged_by_a_bf16_tolerance_and_layers_compared(tmp_path, monkeypatch, capsys):
    """A correct bf16 model passes convert and verify by default; a real divergence is named, not a crash."""
    assert cli.main(["convert", f"{HERE}:bf16_gelu", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert 0 < report["outputs"]["output"]["rel_err"] < 2e-2 and report["rtol"] == "0.02"   # bf16 rounding
    assert cli.main(["verify", f"{HERE}:bf16_gelu"]) == 0
    assert "OK: every output within 0.02 of torch" in capsys.readouterr().out
    _break_gelu(monkeypatch)
    assert cli.main(["verify", f"{HERE}:bf16_gelu"]) == 1
    out = capsys.readouterr().out
    assert "DIVERGED first at node gelu (aten.gelu.default) in layer '<root>' (relative error 0.5" in out, out


def test_convert_takes_rtol(tmp_path, monkeypatch, capsys):
    _break_gelu(monkeypatch, 1.001)   # a 1e-3 error: over convert's float32 default, within --rtol 1e-2
    assert cli.main(["convert", f"{HERE}:root_gelu", "--out", str(tmp_path / "a")]) == 1
    assert "FAILED: output output: relative error" in capsys.readouterr().out
    assert cli.main(["convert", f"{HERE}:root_gelu", "--out", str(tmp_path / "b"), "--rtol", "1e-2"]) == 0
    report = json.loads((tmp_path / "b" / "parity.json").read_text())
    assert 5e-4 < report["outputs"]["output"]["rel_err"] < 2e-3 and report["failures"] == []


def test_convert_out_parents_are_created_and_a_file_in_the_way_refused_first(tmp_path, monkeypatch, capsys):
    out = tmp_path / "a" / "b" / "c"
    assert cli.main(["convert", f"{HERE}:root_gelu", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "parity.json").is_file()
    (tmp_path / "file").write_text("x")
    import bridge.models
    monkeypatch.setattr(bridge.models, "resolve_model", lambda *a, **k: pytest.fail("converted before refusing"))
    assert cli.main(["convert", f"{HERE}:root_gelu", "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize("name,says", [
    ("raises", "the factory raised RuntimeError: factory exploded"),
    ("needs_arg", "the factory raised TypeError"),
    ("not_callable", "not_callable = 3 is not callable"),
])
def test_factory_errors_are_bad_input_naming_the_factory(name, says, capsys):
    assert cli.main(["verify", f"{HERE}:{name}"]) == 2
    err = capsys.readouterr().err
    assert f"'{HERE}:{name}'" in err and says in err and "unexpected" not in err
    with pytest.raises(Exception) as info:   # --debug: the traceback, down to the factory's own error
        cli.main(["--debug", "verify", f"{HERE}:{name}"])
    if name == "raises":
        assert isinstance(info.value.__cause__, RuntimeError)


def test_a_model_drawing_random_numbers_runs_with_seed(capsys):
    assert cli.main(["verify", f"{HERE}:noisy"]) == 2
    assert "pass --seed N" in capsys.readouterr().err
    assert cli.main(["verify", f"{HERE}:noisy", "--seed", "0"]) == 1   # streams differ: honest, not "OK"
    out = capsys.readouterr().out
    assert "JAX runs with jax.random.key(0)" in out
    assert "DIVERGED first at node randn_like (aten.randn_like.default)" in out
    assert "this node draws random numbers" in out


def test_inspect_a_file_that_is_no_checkpoint(tmp_path, capsys):
    f = tmp_path / "train.py"
    f.write_text("import torch\n" * 50)
    assert cli.main(["inspect", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"{f}: not a checkpoint" in err and "header length" not in err


def test_demo_takes_its_options_from_the_bridge_command_line(monkeypatch):
    import bridge.demo
    seen = []
    monkeypatch.setattr(bridge.demo, "run", lambda args: seen.append(vars(args)) or 0)
    assert cli.main(["demo", "--steps", "3", "--out", "x"]) == 0
    assert seen[0]["steps"] == 3 and seen[0]["out"] == "x" and seen[0]["batch_pairs"] == 16


def test_train_refuses_export_ema_without_ema_decay_before_training(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[model]
hf_config = {{ model_type = "gpt2", n_layer = 1, n_embd = 32, n_head = 2, vocab_size = 256, n_positions = 64 }}
[data]
text = "tests/data/corpus.txt"
seq_len = 16
batch_size = 4
[train]
steps = 2
progress = false
plot = false
run_dir = "{tmp_path / 'run'}"
[export]
to = "{tmp_path / 'hf'}"
ema = true
""")
    assert cli.main(["train", str(cfg)]) == 2
    assert "[export] ema = true needs [train] ema_decay" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_parity_report_python_api_on_nested_outputs():
    """bridge.parity_report: the same tree walk, real numbers against torch."""
    import bridge
    module, (x,) = nested()
    jm = bridge.convert(module, (x,))
    report = bridge.parity_report(module, jm, (x,))
    with torch.no_grad():
        h = module.a(x)
    got = jm(x)
    np.testing.assert_allclose(np.asarray(got[0]), h.numpy(), rtol=1e-6, atol=1e-6)
    assert set(report["outputs"]) == {"0", "1.logits", "1.ids", "2.0"} and not report["missing"]
    assert report["grad_output"] == "0" and report["grad_rel_err"] < 1e-5

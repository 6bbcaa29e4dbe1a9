"""torch → bridge → torch is bit-exact: every tensor, dtype and key, through every export format."""
from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest
import safetensors.torch
import torch
import transformers

import bridge
from tests.conftest import full_only
from tests.models import MODELS

FORMATS = ["state_dict", "model.safetensors", "sharded.safetensors", "model.pt", "hf_dir"]


@functools.lru_cache(maxsize=None)
def _converted(name: str, dtype: torch.dtype):
    torch.manual_seed(0)
    case = MODELS[name]()
    module = case.module.eval().to(dtype)
    if name == "cnn":  # give integer buffers a non-trivial value
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.num_batches_tracked.fill_(12345)
    args, kwargs = case.inputs(2, 8)
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    return module, bridge.convert(module, args, kwargs)


def _reload(jm, module, fmt, tmp_path):
    if fmt == "state_dict":
        return bridge.to_state_dict(jm)
    if fmt == "model.safetensors":
        return safetensors.torch.load_file(bridge.export(jm, tmp_path / fmt))
    if fmt == "sharded.safetensors":
        index = bridge.export(jm, tmp_path / fmt, max_shard_size="4KB")
        assert index.name == "sharded.safetensors.index.json" and len(list(tmp_path.glob("sharded-*"))) >= 2
        out = {}
        for f in sorted(tmp_path.glob("sharded-*.safetensors")):
            out.update(safetensors.torch.load_file(f))
        return out
    if fmt == "model.pt":
        return torch.load(bridge.export(jm, tmp_path / fmt), weights_only=True)
    if fmt == "hf_dir":
        if not isinstance(module, transformers.PreTrainedModel):
            pytest.skip("Hugging Face directories hold Hugging Face models")
        bridge.export(jm, tmp_path / "hf", like=module)
        return transformers.AutoModel.from_pretrained(tmp_path / "hf", dtype=module.dtype).state_dict() \
            if not hasattr(module, "lm_head") else \
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=module.dtype).state_dict()
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "cnn"])
def test_round_trip_is_bit_exact(name, dtype, fmt, tmp_path):
    module, jm = _converted(name, dtype)
    ref = module.state_dict()
    got = _reload(jm, module, fmt, tmp_path)
    tied = {k for k, v in jm.meta.aliases.items() if v != k}
    keys = set(ref) - (tied if fmt.endswith("safetensors") else set())  # safetensors store tied weights once
    assert keys <= set(got) and set(got) <= set(ref), (set(ref) ^ set(got))
    if fmt == "state_dict":
        assert list(got) == list(ref)                       # same order as torch
    for k in keys:
        assert got[k].dtype == ref[k].dtype, k
        assert torch.equal(got[k], ref[k]), k


def test_to_state_dict_shares_tied_storage_and_drops_non_persistent():
    module, jm = _converted("gpt2", torch.float32)
    sd = bridge.to_state_dict(jm)
    assert sd["lm_head.weight"] is sd["transformer.wte.weight"]
    module.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("x64", [False, True])
def test_int64_buffers_survive_under_both_x64_policies(x64):
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("steps", torch.tensor([2**31 - 5, -7], dtype=torch.int64))
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x) + self.steps[1]

    m = Counter()
    with jax.enable_x64(x64):
        jm = bridge.convert(m, (torch.randn(3, 2),))
        sd = bridge.to_state_dict(jm)
    assert sd["steps"].dtype == torch.int64 and torch.equal(sd["steps"], m.steps)


def test_checkpoint_to_bridge_to_checkpoint(tmp_path):
    tensors = {"a.weight": torch.randn(4, 3).bfloat16(), "a.bias": torch.randn(3).half(),
               "ids": torch.arange(5, dtype=torch.int32), "mask": torch.tensor([True, False]),
               "u8": torch.arange(7, dtype=torch.uint8)}
    safetensors.torch.save_file(tensors, tmp_path / "in.safetensors")
    params = bridge.load_weights(tmp_path / "in.safetensors")
    bridge.export(params, tmp_path / "out.safetensors")
    back = safetensors.torch.load_file(tmp_path / "out.safetensors")
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


@pytest.mark.parametrize("fmt", ["model.safetensors", "model.pt", "hf_dir"])
@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("name", ["gpt2", "cnn"])
def test_export_cast_is_module_to(name, cast, fmt, tmp_path):
    """bridge.export(dtype=...) writes the bytes `module.to(dtype).state_dict()` holds: torch's rounding,
    integer buffers (BatchNorm's counter) untouched, tied weights still tied; an HF config records it."""
    module, jm = _converted(name, torch.float32)
    if fmt == "hf_dir" and name != "gpt2":
        pytest.skip("Hugging Face directories hold Hugging Face models")
    if fmt == "hf_dir" and cast == torch.float8_e4m3fn:
        pytest.skip("transformers does not load a float8 model as its dtype")
    import copy
    want = copy.deepcopy(module).to(cast).state_dict()
    out = bridge.export(jm, tmp_path / fmt, dtype=str(cast).removeprefix("torch."), like=module if fmt == "hf_dir" else None)
    if fmt == "hf_dir":
        back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
        assert back.dtype == cast
        got = back.state_dict()
    else:
        got = safetensors.torch.load_file(out) if fmt.endswith(".safetensors") else torch.load(out, weights_only=True)
        assert sorted(got) == sorted(k for k in want if fmt == "model.pt" or k != "lm_head.weight")
    for k, t in got.items():
        assert t.dtype == want[k].dtype, k
        assert torch.equal(t.view(torch.uint8) if t.dtype.itemsize == 1 else t, want[k].view(torch.uint8)
                           if t.dtype.itemsize == 1 else want[k]), k
    if fmt == "model.pt" and name == "gpt2":
        assert got["lm_head.weight"].data_ptr() == got["transformer.wte.weight"].data_ptr()


@pytest.mark.parametrize("dtype", ["int8", "float64x", torch.complex64])
def test_export_cast_to_a_non_floating_dtype_is_refused(dtype, tmp_path):
    _, jm = _converted("mlp", torch.float32)
    with pytest.raises(bridge.errors.ExportError, match="exports cast to a floating dtype"):
        bridge.export(jm, tmp_path / "m.safetensors", dtype=dtype)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("wrapper", ["compile", "data_parallel", "ddp", "ddp of compiled"])
def test_wrapped_models_convert_as_the_model_inside(wrapper, tmp_path):
    """torch.compile / DataParallel / DDP wrappers: the JAX model and its export carry the bare model's
    keys (a Hugging Face directory or model.load_state_dict needs them) and its outputs."""
    import torch.distributed as dist
    torch.manual_seed(0)
    model = MODELS["mlp"]().module.eval()
    x = torch.randn(3, 32)
    if "ddp" in wrapper:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = {"compile": lambda: torch.compile(model), "data_parallel": lambda: torch.nn.DataParallel(model),
                   "ddp": lambda: torch.nn.parallel.DistributedDataParallel(model),
                   "ddp of compiled": lambda: torch.nn.parallel.DistributedDataParallel(torch.compile(model))}[wrapper]()
        jm = bridge.convert(wrapped, (x,))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert list(bridge.to_state_dict(jm)) == list(model.state_dict())
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(jm(x)), model(x).numpy(), rtol=1e-5, atol=1e-6)
    fresh = MODELS["mlp"]().module
    fresh.load_state_dict(torch.load(bridge.export(jm, tmp_path / "m.pt"), weights_only=True), strict=True)
    for k, t in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], t), k


def test_lora_fine_tune_exports_a_peft_adapter(tmp_path):
    """A PEFT LoRA model converts, trains in JAX (the base model frozen, as PEFT leaves it) and exports, with
    like=the PEFT model, as PEFT saves an adapter: PeftModel.from_pretrained on a fresh base reproduces the
    JAX-trained model, and the adapter's tensors are the trained params bit for bit."""
    peft = pytest.importorskip("peft")
    from trainers import TrainConfig, Trainer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    base_sd = transformers.LlamaForCausalLM(cfg).state_dict()
    base = transformers.LlamaForCausalLM(cfg)
    base.load_state_dict(base_sd)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 64, (8, 12))   # one row per simulated device
    jm = bridge.convert(model, kwargs={"input_ids": ids, "labels": ids}, train=True, dynamic="batch")
    trainer = Trainer(jm, optax.adam(1e-2), config=TrainConfig(steps=3, run_dir=str(tmp_path / "run"),
                                                               progress=False, plot=False))
    state = trainer.fit([{"input_ids": ids.numpy(), "labels": ids.numpy()}] * 3)
    trained = trainer.export_model(state)
    trainer.close()
    bridge.export(trained, tmp_path / "adapter", like=model)

    written = safetensors.torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    params = bridge.to_state_dict(trained)
    assert written and all(".lora_" in k for k in written)
    for key, t in written.items():   # PEFT leaves the adapter name out of its keys
        ours = params[key.replace(".weight", ".default.weight")]
        assert torch.equal(t, ours), key
    fresh = transformers.LlamaForCausalLM(cfg)
    fresh.load_state_dict(base_sd)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = loaded(input_ids=ids).logits
    got = jax.jit(trained.apply)(trained.params, input_ids=ids.numpy(), labels=ids.numpy())["logits"]
    assert np.abs(np.asarray(got) - ref.numpy()).max() <= 1e-5 * np.abs(ref.numpy()).max()
    with torch.no_grad():   # the adapter moved: the untrained model gives other logits
        assert (model.eval()(input_ids=ids).logits - ref).abs().max() > 1e-3


@pytest.mark.parametrize("like,shards", [("model", 3), ("directory", 1), pytest.param("model", 1, marks=full_only),
                                         pytest.param("directory", 3, marks=full_only)])
def test_diffusers_model_exports_a_directory_from_pretrained_loads(like, shards, tmp_path):
    """like= a diffusers model (or its directory): weights as diffusion_pytorch_model*.safetensors (shards and
    index past max_shard_size) beside its config.json; diffusers' from_pretrained and bridge.load_weights read
    the directory back bit for bit, and the JAX-trained weights come back as trained."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                  block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    jm = bridge.convert(model, kwargs={"sample": torch.randn(2, 3, 8, 8), "timestep": torch.tensor([1, 9])})
    params = jax.tree.map(lambda p: p * 1.5, jm.params)   # "trained" weights
    source = model
    if like == "directory":
        model.save_pretrained(tmp_path / "original")
        source = str(tmp_path / "original")
    total = sum(p.numel() * 4 for p in model.parameters())
    bridge.export(jm.replace(params=params), tmp_path / "out", like=source, max_shard_size=total // shards + 1)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "config.json" in names and all(n.startswith("diffusion_pytorch_model") for n in names if n != "config.json")
    assert ("diffusion_pytorch_model.safetensors.index.json" in names) == (shards > 1)
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "out")
    want = {k: v * 1.5 if k in dict(model.named_parameters()) else v for k, v in model.state_dict().items()}
    got = back.state_dict()
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    loaded = bridge.tree.flatten(bridge.load_weights(tmp_path / "out"))
    assert all(np.array_equal(np.asarray(loaded[k]), v.numpy()) for k, v in want.items())

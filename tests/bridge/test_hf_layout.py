"""transformers' checkpoint layout ↔ in-memory layout (bridge.hf_layout): what from_pretrained converts on load and
save_pretrained writes, checked bit for bit against transformers on tiny random models."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.torch import load_file

from bridge.checkpoint import load_sources, open_checkpoint, state_dict_sources
from bridge.errors import CheckpointError
from bridge.exporter import _entries
from bridge.hf_layout import checkpoint_entries, checkpoint_layout, model_sources
from bridge.safetensors_io import write_file
from converters.dtypes import to_torch

MODELS = {
    "vit": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3)),
    # 11 experts: transformers stacks them in natural order (expert 10 after 9, not after 1)
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=11, num_experts_per_tok=2)),
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
        shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2)),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name → (model, its save_pretrained directory), bf16 for Mixtral (the dtype travels as is)."""
    torch.manual_seed(0)
    out = {}
    for name, make in MODELS.items():
        model = make().eval()
        if name == "mixtral":
            model = model.to(torch.bfloat16)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = model, path
    return out


def _torch(arr, dtype) -> torch.Tensor:
    return to_torch(np.asarray(arr), dtype)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("from_dir", [False, True], ids=["like_model", "like_dir"])
def test_checkpoint_to_model_layout_is_from_pretrained(saved, name, from_dir):
    model, path = saved[name]
    layout = checkpoint_layout(path if from_dir else model)
    assert layout is not None
    ckpt = open_checkpoint(path)
    assert {s.name for s in ckpt} - set(model.state_dict())                  # a plain key match fails
    sources = model_sources(layout, ckpt)
    sd = model.state_dict()
    assert sorted(s.name for s in sources) == sorted(sd)
    for src in sources:
        want = sd[src.name]
        assert (src.shape, src.dtype) == (tuple(want.shape), want.dtype), src.name
        assert torch.equal(_torch(src.read(None, "copy"), src.dtype), want), src.name


def test_fused_experts_are_the_stacked_checkpoint_experts(saved):
    model, path = saved["mixtral"]
    ckpt = load_file(path / "model.safetensors")
    assert "model.layers.1.block_sparse_moe.experts.10.w3.weight" in ckpt
    fused = {s.name: s for s in model_sources(checkpoint_layout(path), open_checkpoint(path))}
    src = fused["model.layers.1.mlp.experts.gate_up_proj"]
    assert src.shape == (11, 48, 16)
    got = _torch(src.read(None, "map"), src.dtype)
    for e in (0, 2, 10):   # gate (w1) rows first, then up (w3): MergeModulelist then Concatenate(dim=1)
        assert torch.equal(got[e, :24], ckpt[f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"])
        assert torch.equal(got[e, 24:], ckpt[f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight"])
    part = _torch(src.read((slice(3, 5), slice(None), slice(8, 16)), "copy"), src.dtype)
    assert torch.equal(part, got[3:5, :, 8:16])


def test_nothing_is_read_until_asked_and_only_the_group(saved):
    model, path = saved["qwen2_moe"]
    reads = []

    def counting(src):
        def read(index, mode, inner=src._read):
            reads.append(src.name)
            return inner(index, mode)
        return dataclasses.replace(src, _read=read)

    sources = model_sources(checkpoint_layout(model), [counting(s) for s in open_checkpoint(path)])
    assert reads == []                                            # names and shapes from meta tensors only
    down = next(s for s in sources if s.name == "model.layers.0.mlp.experts.down_proj")
    assert down.shape == (4, 16, 8)
    down.read(None, "map")
    assert sorted(reads) == [f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(4)]
    renamed_only = next(s for s in sources if s.name == "model.layers.0.self_attn.q_proj.weight")
    reads.clear()
    renamed_only.read((slice(0, 2),), "copy")
    assert reads == ["model.layers.0.self_attn.q_proj.weight"]


def test_sharded_load_matches_state_dict(saved):
    model, path = saved["mixtral"]
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    sharding = NamedSharding(mesh, P(None, "x"))   # each device reads half of every fused expert tensor
    got = load_sources(model_sources(checkpoint_layout(path), open_checkpoint(path)),
                       shardings=lambda name, shape: sharding if "experts" in name else None)
    sd = model.state_dict()
    assert set(got) == set(sd)
    arr = got["model.layers.0.mlp.experts.down_proj"]
    assert len(arr.addressable_shards) == 2 and arr.addressable_shards[0].data.shape == (11, 8, 24)
    for k, t in sd.items():
        assert torch.equal(_torch(np.asarray(got[k]), t.dtype).float(), t.float()), k


@pytest.mark.parametrize("name", list(MODELS))
def test_export_entries_are_what_save_pretrained_writes(saved, name):
    model, path = saved[name]
    written = load_file(path / "model.safetensors")
    entries = checkpoint_entries(checkpoint_layout(path), _entries(model.state_dict()))
    assert sorted(e[0] for e in entries) == sorted(written)
    assert len(entries) == len(written)
    for key, dtype, shape, produce in reversed(entries):   # any order: each group's outputs come out once
        want = written[key]
        assert (dtype, shape) == (want.dtype, tuple(want.shape)), key
        assert torch.equal(_torch(produce(), dtype), want), key


def test_export_like_a_from_pretrained_model_and_load_back(saved, tmp_path):
    model, path = saved["mixtral"]
    loaded = transformers.MixtralForCausalLM.from_pretrained(path)   # keeps the transforms its checkpoint used
    entries = checkpoint_entries(checkpoint_layout(loaded), _entries(model.state_dict()))
    write_file(tmp_path / "model.safetensors", entries, metadata={"format": "pt"})
    assert set(load_file(tmp_path / "model.safetensors")) == set(load_file(path / "model.safetensors"))
    model.config.save_pretrained(tmp_path)
    again = transformers.MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for k, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], t), k


def test_models_without_a_mapping_and_other_inputs_are_left_alone(saved, tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64,
                                                                n_positions=8))
    gpt2.save_pretrained(tmp_path / "gpt2")
    assert checkpoint_layout(gpt2) is None and checkpoint_layout(tmp_path / "gpt2") is None
    assert checkpoint_layout(gpt2.config) is None
    model, path = saved["vit"]
    assert checkpoint_layout(path / "model.safetensors") is None          # a file, no config beside it
    assert checkpoint_layout(tmp_path / "nothing") is None
    assert checkpoint_layout(torch.nn.Linear(2, 2)) is None and checkpoint_layout(None) is None
    (tmp_path / "diffusers").mkdir()
    (tmp_path / "diffusers" / "config.json").write_text('{"_diffusers_version": "0.30", "model_type": "vit"}')
    assert checkpoint_layout(tmp_path / "diffusers") is None
    sources = open_checkpoint(tmp_path / "gpt2")
    assert model_sources(None, sources) == sources
    entries = _entries(gpt2.state_dict())
    assert checkpoint_entries(None, entries) == entries


def test_checkpoint_already_in_model_layout_passes_through(saved):
    """A checkpoint with the in-memory names (bridge's export before this layout, `save_original_format=False`)
    is matched by none of the transforms: the same tensors come back, unconverted."""
    model, _ = saved["qwen2_moe"]
    sources = state_dict_sources(model.state_dict())
    again = model_sources(checkpoint_layout(model), sources)
    assert [s.name for s in again] == [s.name for s in sources]
    assert all(a is b for a, b in zip(again, sources))


def test_tensors_that_do_not_convert_are_named(saved):
    model, path = saved["mixtral"]
    ckpt = load_file(path / "model.safetensors")
    extra = "model.layers.7.block_sparse_moe.experts.0.w2.weight"   # a layer the model lacks: left as it is
    ckpt[extra] = torch.zeros(16, 24, dtype=torch.bfloat16)
    names = [s.name for s in model_sources(checkpoint_layout(model), state_dict_sources(ckpt))]
    assert extra in names and "model.layers.1.mlp.experts.down_proj" in names
    ckpt["model.layers.0.block_sparse_moe.experts.4.w1.weight"] = torch.zeros(5, 16, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj.*MergeModulelist"):
        model_sources(checkpoint_layout(model), state_dict_sources(ckpt))


_INPUTS = {"vit": lambda: {"pixel_values": torch.randn(2, 3, 16, 16)},
           "mixtral": lambda: {"input_ids": torch.randint(0, 64, (2, 8))},
           "qwen2_moe": lambda: {"input_ids": torch.randint(0, 64, (2, 8))}}


@pytest.mark.parametrize("name", list(MODELS))
def test_hub_layout_directories_load_convert_and_export_end_to_end(saved, name, tmp_path):
    """What users hold: a directory save_pretrained (the Hub) wrote. convert(weights=) on a meta-device model,
    jm.load_weights and bridge.load_weights read it as from_pretrained does; export writes it back as
    save_pretrained does, also from the record a trainer run keeps (no torch model at hand)."""
    import bridge
    from bridge.jax_module import StateMeta
    from bridge.state import SavedState
    from bridge.tree import flatten

    model, path = saved[name]
    inputs = _INPUTS[name]()
    with bridge.empty_weights():
        empty = type(model)(model.config).to(model.dtype).eval()
    jm = bridge.convert(empty, kwargs=inputs, weights=path)
    sd = model.state_dict()
    got = {**flatten(jm.params), **flatten(jm.buffers)}
    for k, t in sd.items():
        assert torch.equal(_torch(got[k], t.dtype), t), k
    with torch.no_grad():
        want = model(**inputs).logits
    out = jm(**bridge.as_jax_inputs(inputs))["logits"]
    tol = 1e-5 if model.dtype == torch.float32 else 2e-2     # bf16 Mixtral: to bf16's precision
    assert np.abs(np.asarray(out, np.float32) - want.float().numpy()).max() <= tol * want.abs().max().item()
    assert sorted(flatten(bridge.load_weights(path))) == sorted(k for k in sd if k in got)
    run = SavedState(jm.params, jm.buffers, StateMeta.from_json(jm.meta.to_json()))
    for obj, out_dir in ((jm, tmp_path / "jm"), (run, tmp_path / "run")):
        bridge.export(obj, out_dir)
        written, original = load_file(out_dir / "model.safetensors"), load_file(path / "model.safetensors")
        assert sorted(written) == sorted(original)
        assert all(torch.equal(written[k], original[k]) for k in original)

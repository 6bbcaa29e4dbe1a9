"""diffusers architecture zoo: forward and gradient parity with torch, one tiny random model each.

Each row is (name, model factory, inputs factory given the batch, output key). Parameters diffusers
initialises to zero (zero convolutions, output projections) are filled with small random values first, so
every path contributes to the output. Models are converted with `dynamic="batch"` where their inputs allow
(checked at another batch than the example) and compared with torch eager: the jitted forward, and every
parameter's gradient of a weighted sum of the output. The default run covers a UNet with SDXL's
conditioning, a VAE and Flux; `BRIDGE_TEST_FULL=1` runs every row (CogVideoX: its patch embedding fills a
table through `.data` while tracing).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bridge
from converters.dtypes import to_jax
from tests.conftest import FULL, GRAD_TOL, assert_close

diffusers = pytest.importorskip("diffusers")
NOISE_FLOOR = 1e-3   # gradients are compared against max(their scale, this fraction of the largest one)


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    model: Callable[[], torch.nn.Module]
    inputs: Callable[[int], dict]     # batch -> kwargs
    output_key: str = "sample"
    dynamic: str | None = "batch"     # None: Python values in the inputs fix the batch


def R(*shape):
    return torch.randn(*shape)


def steps(b):
    return torch.arange(1, b + 1) * 97


def unet_sdxl():
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=16 + 6 * 8)


def sdxl_inputs(b):
    return {"sample": R(b, 4, 16, 16), "timestep": steps(b), "encoder_hidden_states": R(b, 7, 32),
            "added_cond_kwargs": {"text_embeds": R(b, 16), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * b)}}


def unet2d():
    return diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8)


def vae():
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4, norm_num_groups=8)


def controlnet():
    return diffusers.ControlNetModel(
        in_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32, norm_num_groups=8,
        attention_head_dim=8, conditioning_embedding_out_channels=(8, 16, 32, 32))


def flux():
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))


def flux_inputs(b):
    return {"hidden_states": R(b, 12, 16), "encoder_hidden_states": R(b, 5, 32), "pooled_projections": R(b, 16),
            "timestep": torch.rand(b), "img_ids": R(12, 3), "txt_ids": torch.zeros(5, 3)}


def sd3():
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16)


def cogvideox():   # sample_frames=8 while the input has one latent frame: the table is rebuilt in forward
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=1, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8)


def wan():
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=32, ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)


def ltx():
    return diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=1, qk_norm="rms_norm_across_heads", caption_channels=16)


def ltx_inputs(b):
    mask = torch.ones(b, 6, dtype=torch.bool)
    mask[0, 4:] = False
    return {"hidden_states": R(b, 32, 4), "encoder_hidden_states": R(b, 6, 16), "timestep": steps(b),
            "encoder_attention_mask": mask, "num_frames": 2, "height": 4, "width": 4}


def dit():
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2, sample_size=8, patch_size=2,
        num_embeds_ada_norm=10, norm_num_groups=8)


def svd():
    return diffusers.UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=32,
        num_attention_heads=(8, 16), in_channels=4, out_channels=4, layers_per_block=1, sample_size=16,
        projection_class_embeddings_input_dim=3 * 8, addition_time_embed_dim=8)


ARCHS = [
    Arch("unet2d_condition_sdxl", unet_sdxl, sdxl_inputs),
    Arch("unet2d", unet2d, lambda b: {"sample": R(b, 3, 16, 16), "timestep": steps(b)}),
    Arch("autoencoder_kl", vae, lambda b: {"sample": R(b, 3, 32, 32)}),
    Arch("controlnet", controlnet, lambda b: {"sample": R(b, 4, 16, 16), "timestep": steps(b),
                                              "encoder_hidden_states": R(b, 7, 32),
                                              "controlnet_cond": R(b, 3, 128, 128)}, "mid_block_res_sample"),
    Arch("flux", flux, flux_inputs),
    Arch("sd3", sd3, lambda b: {"hidden_states": R(b, 4, 8, 8), "encoder_hidden_states": R(b, 5, 32),
                                "pooled_projections": R(b, 16), "timestep": steps(b)}),
    Arch("cogvideox", cogvideox, lambda b: {"hidden_states": R(b, 1, 4, 8, 8), "encoder_hidden_states": R(b, 8, 8),
                                            "timestep": steps(b)}),
    Arch("wan", wan, lambda b: {"hidden_states": R(b, 4, 2, 8, 8), "encoder_hidden_states": R(b, 6, 16),
                                "timestep": steps(b)}),
    Arch("ltx_video", ltx, ltx_inputs),
    Arch("dit", dit, lambda b: {"hidden_states": R(b, 4, 8, 8), "timestep": steps(b),
                                "class_labels": torch.arange(b) % 10}),
    Arch("unet_spatio_temporal", svd, lambda b: {"sample": R(b, 2, 4, 16, 16), "timestep": steps(b).float(),
                                                 "encoder_hidden_states": R(b, 1, 32),
                                                 "added_time_ids": R(b, 3)}),
]
BY_NAME = {a.name: a for a in ARCHS}
FAST = ("unet2d_condition_sdxl", "autoencoder_kl", "flux")


def _params():
    return [pytest.param(a.name, marks=() if FULL or a.name in FAST else
                         pytest.mark.skip(reason="BRIDGE_TEST_FULL=1 only")) for a in ARCHS]


@functools.lru_cache(maxsize=None)
def converted(name: str):
    arch = BY_NAME[name]
    torch.manual_seed(0)
    model = arch.model().eval()
    with torch.no_grad():   # zero-initialised layers would hide what runs before them
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model, bridge.convert(model, kwargs=arch.inputs(2), dynamic=arch.dynamic)


def _jax(kwargs):
    return bridge.as_jax_inputs(kwargs)


@pytest.mark.parametrize("name", _params())
def test_forward_parity(name):
    arch = BY_NAME[name]
    model, jm = converted(name)
    kwargs = arch.inputs(3 if arch.dynamic else 2)
    with torch.no_grad():
        ref = model(**kwargs)[arch.output_key]
    got = jax.jit(jm.apply)(jm.params, **_jax(kwargs))[arch.output_key]
    assert_close(got, ref, what=name)


def _torch_grads(model, kwargs, key, weights, dtype=torch.float32) -> dict:
    model = copy.deepcopy(model).to(dtype)
    kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t,
                                               kwargs)
    (model(**kwargs)[key] * weights.to(dtype)).sum().backward()
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).double() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", _params())
def test_gradients_match_autograd(name):
    """Every parameter's gradient within GRAD_TOL of torch's; where float32 rounding alone exceeds that (deep
    UNets), bridge must be at least as close to torch's float64 gradient as torch's float32 one is."""
    arch = BY_NAME[name]
    model, jm = converted(name)
    kwargs = arch.inputs(2)
    with torch.no_grad():
        shape = model(**kwargs)[arch.output_key].shape
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ref = _torch_grads(model, kwargs, arch.output_key, weights)
    jkw, w = _jax(kwargs), to_jax(weights)
    flat = bridge.tree.flatten(jax.jit(jax.grad(lambda p: jnp.sum(jm.apply(p, **jkw)[arch.output_key] * w)))(jm.params))
    assert set(flat) == set(ref)
    exact, floor = None, NOISE_FLOOR * max(float(r.abs().max()) for r in ref.values())

    def error(got, want):   # max |got - want| / max(scale, NOISE_FLOOR of the largest gradient)
        return float((torch.as_tensor(np.asarray(got)).double() - want).abs().max()) / max(
            float(want.abs().max()), floor, 1e-12)
    for n, g in flat.items():
        if error(g, ref[n]) > GRAD_TOL:
            exact = exact or _torch_grads(model, kwargs, arch.output_key, weights, torch.float64)
            ours, torchs = error(g, exact[n]), error(ref[n], exact[n])
            assert ours <= max(GRAD_TOL, torchs), f"{name}: grad of {n} off by {ours:.3g} (torch fp32: {torchs:.3g})"

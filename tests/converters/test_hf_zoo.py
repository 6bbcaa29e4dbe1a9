"""Hugging Face architecture zoo: forward and gradient parity with torch, one tiny random model each.

Each row is (name, model factory, inputs factory, output key), plus the recorded reason where an
architecture cannot be converted for reasons outside bridge (`skip`) or torch's gradients are not the
gradients of its forward (`no_grads`). Models are built from configs (random init, no downloads),
converted with `dynamic="batch"` and checked at another batch size than the example. The default run
covers a diverse subset (FAST: dense and mixture-of-experts decoders, encoder-decoder, vision, speech);
`BRIDGE_TEST_FULL=1` runs every row (~9 minutes on 2 cores).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import pytest
import torch
import transformers as tf

import bridge
from converters.dtypes import to_jax
from tests.conftest import FULL, GRAD_TOL, assert_close, rel_err
from tests.models import _tokens

V, S = 128, 8                    # vocabulary, sequence length
NOISE_FLOOR = 1e-3


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    model: Callable[[], torch.nn.Module]
    inputs: Callable[[int], dict]          # batch -> kwargs
    output_key: str
    skip: str = ""                         # why the architecture cannot be converted (outside bridge)
    no_grads: str = ""                     # why torch's gradients are not the reference
    dynamic: str | None = "batch"          # None: the model's own code fixes the batch (checked at batch 2)


# ---------------------------------------------------------------- inputs

def tokens(mask=True, types=False, decoder=False):
    base = _tokens(V, types=types, mask=mask, low=3)

    def make(b):
        kw = base(b, S)[1]
        if decoder:
            kw["decoder_input_ids"] = torch.randint(3, V, (b, S - 2))
        return kw
    return make


def pixels(size=32, channels=3):
    return lambda b: {"pixel_values": torch.randn(b, channels, size, size)}


def features(mels=16, frames=32):  # Whisper: log-mel features, decoder tokens
    return lambda b: {"input_features": torch.randn(b, mels, frames),
                      "decoder_input_ids": torch.randint(3, V, (b, S - 2))}


def audio(n=800):
    return lambda b: {"input_values": torch.randn(b, n)}


def ctc_labels(b):
    lengths = torch.arange(b) % 4 + 2
    labels = torch.randint(1, 16, (b, 6))
    return {**audio()(b), "labels": torch.where(torch.arange(6)[None] < lengths[:, None], labels, -100)}


def llava_inputs(b):   # 16 image tokens (a 32x32 image in 8x8 patches) inside the prompt
    ids = torch.randint(3, V - 1, (b, 22))
    ids[:, 3:19] = V - 1
    return {"input_ids": ids, "pixel_values": torch.randn(b, 3, 32, 32), "attention_mask": torch.ones_like(ids)}


def _pretraining_labels(kw):   # replaced-token labels on the attended positions (ragged per row)
    kw["attention_mask"][1:, -3:] = 0
    kw["labels"] = torch.randint(0, 2, kw["input_ids"].shape)
    return kw


def clip_inputs(b):
    return {**tokens()(b), "pixel_values": torch.randn(b, 3, 32, 32)}


# ---------------------------------------------------------------- configs

TOK = dict(vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2)
DEC = dict(TOK, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)
ENC = dict(TOK, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=64)
S2S = dict(TOK, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
           decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
           decoder_start_token_id=1)


def build(model_cls: str, config_cls: str, **cfg):
    return lambda: getattr(tf, model_cls)(getattr(tf, config_cls)(**cfg))


def lm(prefix: str, **over):
    return build(f"{prefix}ForCausalLM", f"{prefix}Config", **{**DEC, **over})


def enc(prefix: str, **over):
    return build(f"{prefix}Model", f"{prefix}Config", **{**ENC, **over})


def _flex(model):
    """The model with attn_implementation="flex_attention" (torch's FlexAttention, its masks as block masks)."""
    model.config._attn_implementation = "flex_attention"
    return model


LONGFORMER_SKIP = ("branches in Python on `global_attention_mask.any().item()`: torch.export (strict and "
                   "non-strict) cannot guard on the data-dependent value")

VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
           patch_size=8)
CLIP_TEXT = dict(TOK, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, projection_dim=32)
CLIP_VISION = dict(VIT, projection_dim=32)
AUDIO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, conv_dim=(32, 32),
             conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)

ZOO = [
    # -- decoder-only language models
    Arch("mistral", lm("Mistral", sliding_window=None), tokens(), "logits"),
    Arch("qwen2", lm("Qwen2"), tokens(), "logits"),
    Arch("qwen3", lm("Qwen3", head_dim=16), tokens(), "logits"),
    Arch("gemma", lm("Gemma", head_dim=16), tokens(), "logits"),
    Arch("gemma2", lm("Gemma2", head_dim=16, sliding_window=4), tokens(), "logits"),
    Arch("gemma3_text", build("Gemma3ForCausalLM", "Gemma3TextConfig", **{**DEC, "head_dim": 16, "sliding_window": 4}),
         tokens(), "logits"),
    Arch("phi", lm("Phi", num_key_value_heads=4), tokens(), "logits"),
    Arch("phi3", lm("Phi3"), tokens(), "logits"),
    Arch("gpt_neox", build("GPTNeoXForCausalLM", "GPTNeoXConfig", **{**DEC, "rotary_pct": 0.5}), tokens(),
         "logits"),
    Arch("gptj", build("GPTJForCausalLM", "GPTJConfig", **TOK, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                       rotary_dim=8), tokens(), "logits"),
    Arch("opt", build("OPTForCausalLM", "OPTConfig", **TOK, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64), tokens(),
         "logits"),
    Arch("falcon", build("FalconForCausalLM", "FalconConfig", **TOK, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4), tokens(), "logits"),
    Arch("falcon_alibi", build("FalconForCausalLM", "FalconConfig", **TOK, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, alibi=True, new_decoder_architecture=False), tokens(),
         "logits"),
    Arch("bloom", build("BloomForCausalLM", "BloomConfig", **TOK, hidden_size=64, n_layer=2, n_head=4), tokens(),
         "logits"),
    Arch("mpt", build("MptForCausalLM", "MptConfig", **TOK, d_model=64, n_heads=4, n_layers=2, expansion_ratio=2,
                      max_seq_len=64), tokens(), "logits"),
    Arch("stablelm", lm("StableLm"), tokens(), "logits"),
    Arch("starcoder2", lm("Starcoder2", sliding_window=None), tokens(), "logits"),
    Arch("olmo", lm("Olmo"), tokens(), "logits"),
    Arch("olmo2", lm("Olmo2"), tokens(), "logits"),
    Arch("cohere", lm("Cohere"), tokens(), "logits"),
    Arch("granite", lm("Granite"), tokens(), "logits"),
    Arch("gpt_bigcode", build("GPTBigCodeForCausalLM", "GPTBigCodeConfig", **TOK, n_embd=64, n_layer=2, n_head=4,
                              n_positions=64), tokens(), "logits"),
    Arch("codegen", build("CodeGenForCausalLM", "CodeGenConfig", **TOK, n_embd=64, n_layer=2, n_head=4,
                          n_positions=64, n_ctx=64, rotary_dim=8), tokens(), "logits"),
    Arch("gpt_neo", build("GPTNeoForCausalLM", "GPTNeoConfig", **TOK, hidden_size=64, num_layers=2, num_heads=4,
                          attention_types=[[["global", "local"], 1]], window_size=4, max_position_embeddings=64),
         tokens(), "logits"),
    Arch("smollm3", lm("SmolLM3"), tokens(), "logits"),
    Arch("exaone4", lm("Exaone4", sliding_window=4), tokens(), "logits"),
    Arch("helium", lm("Helium", head_dim=16), tokens(), "logits"),
    Arch("glm", lm("Glm", head_dim=16), tokens(), "logits"),
    Arch("glm4", lm("Glm4", head_dim=16), tokens(), "logits"),
    Arch("nemotron", lm("Nemotron", head_dim=16), tokens(), "logits"),
    Arch("persimmon", lm("Persimmon", num_key_value_heads=4), tokens(), "logits"),
    Arch("arcee", lm("Arcee"), tokens(), "logits"),
    Arch("lfm2", lm("Lfm2", full_attn_idxs=[1]), tokens(), "logits"),
    # -- mixture of experts (grouped expert matmuls), state-space models
    Arch("mixtral", lm("Mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=None), tokens(),
         "logits"),
    Arch("qwen2_moe", lm("Qwen2Moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         shared_expert_intermediate_size=64), tokens(), "logits"),
    Arch("qwen3_moe", lm("Qwen3Moe", head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
         tokens(), "logits"),
    Arch("olmoe", lm("Olmoe", num_experts=4, num_experts_per_tok=2), tokens(), "logits"),
    Arch("phimoe", lm("Phimoe", num_local_experts=4, num_experts_per_tok=2), tokens(), "logits"),
    Arch("granitemoe", lm("GraniteMoe", num_local_experts=4, num_experts_per_tok=2), tokens(), "logits"),
    Arch("deepseek_v3", lm("DeepseekV3", num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1, first_k_dense_replace=1),
         tokens(), "logits"),
    Arch("gpt_oss", lm("GptOss", num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=4),
         tokens(), "logits"),
    Arch("mamba", build("MambaForCausalLM", "MambaConfig", **TOK, hidden_size=32, state_size=8,
                        num_hidden_layers=2, expand=2, conv_kernel=4), tokens(mask=False), "logits"),
    Arch("falcon_mamba", build("FalconMambaForCausalLM", "FalconMambaConfig", **TOK, hidden_size=32, state_size=8,
                               num_hidden_layers=2, expand=2, conv_kernel=4), tokens(mask=False), "logits"),
    # -- encoder-decoder
    Arch("t5", build("T5Model", "T5Config", **TOK, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                     decoder_start_token_id=0), tokens(decoder=True), "last_hidden_state"),
    Arch("mt5", build("MT5Model", "MT5Config", **TOK, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      decoder_start_token_id=0), tokens(decoder=True), "last_hidden_state"),
    Arch("umt5", build("UMT5Model", "UMT5Config", **TOK, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                       decoder_start_token_id=0), tokens(decoder=True), "last_hidden_state"),
    Arch("t5_lm_labels", build("T5ForConditionalGeneration", "T5Config", **TOK, d_model=64, d_kv=16, d_ff=128,
                               num_layers=2, num_heads=4, decoder_start_token_id=0),
         lambda b: {**tokens()(b), "labels": torch.randint(3, V, (b, S - 2))}, "loss"),
    Arch("bart", build("BartModel", "BartConfig", **S2S), tokens(decoder=True), "last_hidden_state"),
    Arch("pegasus", build("PegasusModel", "PegasusConfig", **S2S), tokens(decoder=True), "last_hidden_state"),
    Arch("marian", build("MarianMTModel", "MarianConfig", **S2S), tokens(decoder=True), "logits"),
    Arch("prophetnet", build("ProphetNetModel", "ProphetNetConfig", **TOK, hidden_size=64, encoder_ffn_dim=128,
                             decoder_ffn_dim=128, num_encoder_layers=2, num_decoder_layers=2,
                             num_encoder_attention_heads=4, num_decoder_attention_heads=4, ngram=2,
                             max_position_embeddings=64), tokens(decoder=True), "last_hidden_state"),
    Arch("led", build("LEDModel", "LEDConfig", **{**S2S, "attention_window": 4, "max_encoder_position_embeddings": 64,
                                                  "max_decoder_position_embeddings": 64}),
         tokens(decoder=True), "last_hidden_state", skip=LONGFORMER_SKIP),
    # -- encoders
    Arch("roberta", enc("Roberta"), tokens(), "last_hidden_state"),
    Arch("xlm_roberta", enc("XLMRoberta"), tokens(), "last_hidden_state"),
    Arch("distilbert", build("DistilBertModel", "DistilBertConfig", **TOK, dim=64, hidden_dim=128, n_layers=2,
                             n_heads=4, max_position_embeddings=64), tokens(), "last_hidden_state"),
    Arch("albert", enc("Albert", embedding_size=32), tokens(types=True), "last_hidden_state"),
    Arch("electra", enc("Electra", embedding_size=32), tokens(types=True), "last_hidden_state"),
    Arch("deberta", enc("Deberta", relative_attention=True, pos_att_type=["c2p", "p2c"]), tokens(types=True),
         "last_hidden_state"),
    Arch("deberta_v2", enc("DebertaV2", relative_attention=True, pos_att_type=["c2p", "p2c"],
                           position_buckets=8, max_relative_positions=16), tokens(types=True), "last_hidden_state"),
    Arch("mobilebert", enc("MobileBert", embedding_size=32, intra_bottleneck_size=32, true_hidden_size=32,
                           num_feedforward_networks=2), tokens(types=True), "last_hidden_state"),
    Arch("modernbert", enc("ModernBert", global_attn_every_n_layers=2, local_attention=4), tokens(),
         "last_hidden_state"),
    Arch("roformer", enc("RoFormer", embedding_size=64), tokens(types=True), "last_hidden_state"),
    Arch("convbert", enc("ConvBert", embedding_size=64), tokens(types=True), "last_hidden_state"),
    Arch("megatron_bert", enc("MegatronBert"), tokens(types=True), "last_hidden_state"),
    Arch("ernie", enc("Ernie"), tokens(types=True), "last_hidden_state"),
    Arch("bert_seqcls_labels", build("BertForSequenceClassification", "BertConfig", **ENC, num_labels=3),
         lambda b: {**tokens()(b), "labels": torch.randint(0, 3, (b,))}, "loss"),
    Arch("big_bird", enc("BigBird", attention_type="original_full"), tokens(types=True), "last_hidden_state"),
    Arch("funnel", build("FunnelModel", "FunnelConfig", **TOK, d_model=64, n_head=4, d_head=16, d_inner=128,
                         block_sizes=[1, 1], num_decoder_layers=1), tokens(types=True), "last_hidden_state"),
    Arch("canine", build("CanineModel", "CanineConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, num_hash_buckets=64, local_transformer_stride=4,
                         downsampling_rate=4), tokens(), "last_hidden_state"),
    Arch("longformer", enc("Longformer", attention_window=4), tokens(), "last_hidden_state", skip=LONGFORMER_SKIP),
    Arch("yoso", enc("Yoso", use_expectation=True), tokens(), "last_hidden_state",
         no_grads="YosoCumulation's hand-written backward drops acos' derivative; bridge differentiates the "
                  "forward exactly (and matches torch autograd of that forward)"),
    Arch("nystromformer", enc("Nystromformer", num_landmarks=4, segment_means_seq_len=S), tokens(mask=False),
         "last_hidden_state", skip="HF adds a (B, 1, S, S) mask to (B, H, landmarks, S) scores whenever it is "
                                   "compiled or exported (eager drops the all-ones mask): torch.export fails"),
    # -- vision, vision-language
    Arch("vit", build("ViTModel", "ViTConfig", **VIT), pixels(), "last_hidden_state"),
    Arch("deit", build("DeiTModel", "DeiTConfig", **VIT), pixels(), "last_hidden_state"),
    Arch("dinov2", build("Dinov2Model", "Dinov2Config", **{**VIT, "mlp_ratio": 2}), pixels(), "last_hidden_state"),
    Arch("beit", build("BeitModel", "BeitConfig", **VIT, use_relative_position_bias=True), pixels(),
         "last_hidden_state"),
    Arch("yolos", build("YolosModel", "YolosConfig", **{**VIT, "image_size": [32, 32], "num_detection_tokens": 4}),
         pixels(), "last_hidden_state"),
    Arch("clip_text", build("CLIPTextModel", "CLIPTextConfig", **CLIP_TEXT), tokens(), "last_hidden_state"),
    Arch("clip_vision", build("CLIPVisionModel", "CLIPVisionConfig", **CLIP_VISION), pixels(), "last_hidden_state"),
    Arch("clip", lambda: tf.CLIPModel(tf.CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION,
                                                    projection_dim=32)), clip_inputs, "logits_per_image"),
    Arch("llava", lambda: tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        text_config=tf.LlamaConfig(**DEC), vision_config=tf.CLIPVisionConfig(**VIT), image_token_index=V - 1)),
         llava_inputs, "logits",   # image features scattered into the token embeddings (masked_scatter)
         dynamic=None),            # its vision tower unbinds the batch into a Python list of images
    Arch("siglip_vision", build("SiglipVisionModel", "SiglipVisionConfig", **VIT), pixels(), "last_hidden_state"),
    Arch("convnext", build("ConvNextModel", "ConvNextConfig", hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                           image_size=32), pixels(), "last_hidden_state"),
    Arch("convnextv2", build("ConvNextV2Model", "ConvNextV2Config", hidden_sizes=[16, 32], depths=[1, 1],
                             num_stages=2, image_size=32), pixels(), "last_hidden_state"),
    Arch("resnet", build("ResNetModel", "ResNetConfig", embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                         layer_type="basic"), pixels(), "last_hidden_state"),
    Arch("regnet", build("RegNetModel", "RegNetConfig", embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                         groups_width=8), pixels(), "last_hidden_state"),
    Arch("swin", build("SwinModel", "SwinConfig", image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                       num_heads=[2, 4], window_size=4), pixels(), "last_hidden_state"),
    # -- second sweep
    Arch("segformer", build("SegformerModel", "SegformerConfig", num_encoder_blocks=2, depths=[1, 1],
                            sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
                            num_attention_heads=[1, 2], mlp_ratios=[2, 2]), pixels(), "last_hidden_state"),
    Arch("mobilevit", build("MobileViTModel", "MobileViTConfig", image_size=32, hidden_sizes=[16, 24, 32],
                            neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32]), pixels(), "last_hidden_state"),
    Arch("efficientnet", build("EfficientNetModel", "EfficientNetConfig", image_size=32, width_coefficient=0.25,
                               depth_coefficient=0.25, hidden_dim=320), pixels(), "last_hidden_state"),
    Arch("poolformer", build("PoolFormerModel", "PoolFormerConfig", hidden_sizes=[16, 32], depths=[1, 1],
                             num_encoder_blocks=2, patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1]),
         pixels(), "last_hidden_state"),
    Arch("levit", build("LevitModel", "LevitConfig", image_size=64, hidden_sizes=[16, 32, 48],
                        num_attention_heads=[1, 2, 3], depths=[1, 1, 1], key_dim=[8, 8, 8],
                        down_ops=[["Subsample", 8, 2, 4, 2, 2], ["Subsample", 8, 4, 4, 2, 2]]), pixels(64),
         "last_hidden_state"),
    Arch("mobilenet_v2", build("MobileNetV2Model", "MobileNetV2Config", image_size=32, depth_multiplier=0.25),
         pixels(), "last_hidden_state"),
    # -- audio, speech
    Arch("whisper", build("WhisperModel", "WhisperConfig", **{**S2S, "num_mel_bins": 16,
                                                             "max_source_positions": 16,
                                                             "max_target_positions": 64}),
         features(), "last_hidden_state"),
    Arch("wav2vec2", build("Wav2Vec2Model", "Wav2Vec2Config", hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 2),
                           conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
         audio(), "last_hidden_state"),
    Arch("hubert", build("HubertModel", "HubertConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4), audio(), "last_hidden_state"),
    Arch("wavlm", build("WavLMModel", "WavLMConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_buckets=32,
                        max_bucket_distance=64), audio(), "last_hidden_state"),
    Arch("data2vec_audio", build("Data2VecAudioModel", "Data2VecAudioConfig", hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 2),
                                 conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                                 conv_pos_kernel_size=5),
         audio(), "last_hidden_state"),
    Arch("sew_d", build("SEWDModel", "SEWDConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, squeeze_factor=2),
         audio(1600), "last_hidden_state"),   # DeBERTa's XSoftmax: an autograd.Function with in-place ops
    Arch("wav2vec2_ctc", build("Wav2Vec2ForCTC", "Wav2Vec2Config", hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 2),
                               conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                               vocab_size=16, ctc_loss_reduction="mean", pad_token_id=0),
         ctc_labels, "loss"),   # CTC training loss: labels padded with -100, masked_select, a label-range check
    Arch("ast", build("ASTModel", "ASTConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, num_mel_bins=16, max_length=32, patch_size=8),
         lambda b: {"input_values": torch.randn(b, 32, 16)}, "last_hidden_state"),
    # -- third sweep: hybrids and state-space models, older decoders, more seq2seq / encoders / vision
    Arch("mamba2", build("Mamba2ForCausalLM", "Mamba2Config", vocab_size=V, hidden_size=64, num_hidden_layers=2,
                         num_heads=8, head_dim=16, state_size=16, n_groups=1, expand=2, chunk_size=4),
         tokens(mask=False), "logits"),
    Arch("jamba", lm("Jamba", num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
                     expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_dt_rank=8,
                     use_mamba_kernels=False), tokens(), "logits"),
    Arch("bamba", lm("Bamba", attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16,
                     mamba_n_groups=1, mamba_chunk_size=4), tokens(), "logits"),
    Arch("recurrent_gemma", build("RecurrentGemmaForCausalLM", "RecurrentGemmaConfig",
                                  **{**DEC, "num_hidden_layers": 3, "num_key_value_heads": 1, "lru_width": 64,
                                     "attention_window_size": 4, "conv1d_width": 4,
                                     "block_types": ["recurrent", "attention"]}), tokens(), "logits"),
    Arch("qwen3_next", lm("Qwen3Next", head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
                          linear_key_head_dim=16, linear_value_head_dim=16, num_experts=2, num_experts_per_tok=1,
                          moe_intermediate_size=64, shared_expert_intermediate_size=64,
                          layer_types=["linear_attention", "full_attention"]), tokens(), "logits"),
    Arch("rwkv", build("RwkvForCausalLM", "RwkvConfig", vocab_size=V, hidden_size=64, num_hidden_layers=2,
                       attention_hidden_size=64, intermediate_size=128, context_length=64),
         tokens(mask=False), "logits",
         no_grads="torch's own backward fails: RWKV's eval forward updates its state tensors in place"),
    Arch("xlnet", build("XLNetLMHeadModel", "XLNetConfig", vocab_size=V, d_model=64, n_layer=2, n_head=4,
                        d_inner=128), tokens(), "logits"),
    Arch("ctrl", build("CTRLLMHeadModel", "CTRLConfig", vocab_size=V, n_embd=64, n_layer=2, n_head=4, dff=128,
                       n_positions=64), tokens(), "logits"),
    Arch("biogpt", build("BioGptForCausalLM", "BioGptConfig", **ENC), tokens(), "logits"),
    Arch("xglm", build("XGLMForCausalLM", "XGLMConfig", vocab_size=V, d_model=64, num_layers=2, attention_heads=4,
                       ffn_dim=128, max_position_embeddings=64), tokens(), "logits"),
    Arch("mbart", build("MBartForConditionalGeneration", "MBartConfig", **S2S), tokens(decoder=True), "logits"),
    Arch("m2m100", build("M2M100ForConditionalGeneration", "M2M100Config", **S2S), tokens(decoder=True), "logits"),
    Arch("longt5", build("LongT5Model", "LongT5Config", vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                         num_heads=4, decoder_start_token_id=0), tokens(decoder=True), "last_hidden_state"),
    Arch("speecht5", build("SpeechT5Model", "SpeechT5Config",
                           **{**TOK, "hidden_size": 64, "encoder_layers": 2, "decoder_layers": 2,
                              "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128,
                              "decoder_ffn_dim": 128}),
         lambda b: {"input_values": torch.randn(b, 8, 64), "decoder_input_values": torch.randn(b, 6, 64)},
         "last_hidden_state"),
    Arch("fnet", build("FNetModel", "FNetConfig", vocab_size=V, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, max_position_embeddings=64), tokens(mask=False, types=True),
         "last_hidden_state"),
    Arch("esm", enc("Esm", mask_token_id=3, position_embedding_type="rotary"), tokens(), "last_hidden_state"),
    Arch("luke", enc("Luke", entity_vocab_size=10, entity_emb_size=32), tokens(), "last_hidden_state"),
    Arch("perceiver", build("PerceiverModel", "PerceiverConfig", num_latents=8, d_latents=32, d_model=32,
                            num_blocks=1, num_self_attends_per_block=1, num_self_attention_heads=2,
                            num_cross_attention_heads=2),
         lambda b: {"inputs": torch.randn(b, 8, 32)}, "last_hidden_state"),
    Arch("swinv2", build("Swinv2Model", "Swinv2Config", image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                         num_heads=[2, 2], window_size=4), pixels(), "last_hidden_state"),
    Arch("dpt", build("DPTForDepthEstimation", "DPTConfig",
                      **{**VIT, "num_hidden_layers": 4, "backbone_out_indices": [0, 1, 2, 3],
                         "neck_hidden_sizes": [16, 16, 16, 16], "fusion_hidden_size": 16,
                         "reassemble_factors": [4, 2, 1, 0.5]}), pixels(), "predicted_depth"),
    Arch("sam_vision", build("SamVisionModel", "SamVisionConfig", hidden_size=32, output_channels=16,
                             num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, window_size=2,
                             global_attn_indexes=[1], mlp_dim=64), pixels(), "last_hidden_state"),
    Arch("videomae", build("VideoMAEModel", "VideoMAEConfig", **{**VIT, "num_frames": 4, "tubelet_size": 2}),
         lambda b: {"pixel_values": torch.randn(b, 4, 3, 32, 32)}, "last_hidden_state"),
    Arch("patchtst", build("PatchTSTModel", "PatchTSTConfig", num_input_channels=3, context_length=32,
                           patch_length=8, patch_stride=8, d_model=32, num_attention_heads=4, num_hidden_layers=2,
                           ffn_dim=64), lambda b: {"past_values": torch.randn(b, 32, 3)}, "last_hidden_state"),
    Arch("switch_transformers", build("SwitchTransformersForConditionalGeneration", "SwitchTransformersConfig",
                                      vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                      num_experts=4, decoder_start_token_id=0), tokens(decoder=True), "logits",
         skip="torch.export: the router calls `self.classifier.to(dtype)` inside forward (non-strict: "
              "'Couldn't swap Linear.weight') and loops over the experts the data selects (strict)"),
    # -- fourth sweep: newer decoders and hybrids, reversible layers, per-language adapters, audio, vision, detection
    Arch("deepseek_v2", lm("DeepseekV2", num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32, first_k_dense_replace=1, n_shared_experts=1), tokens(), "logits"),
    Arch("zamba2", lm("Zamba2", mamba_d_state=16, mamba_headdim=16, n_mamba_heads=8, mamba_ngroups=1, chunk_size=4,
                      layers_block_type=["mamba", "hybrid"], hybrid_layer_ids=[1], num_mem_blocks=1,
                      use_mem_rope=False),
         tokens(), "logits"),
    Arch("falcon_h1", lm("FalconH1", mamba_d_state=16, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1,
                         mamba_chunk_size=4, head_dim=16, mamba_d_ssm=128, mamba_expand=2), tokens(), "logits"),
    Arch("minimax", lm("MiniMax", head_dim=16, num_local_experts=2, num_experts_per_tok=1, block_size=4,
                       layer_types=["linear_attention", "full_attention"], sliding_window=None), tokens(), "logits"),
    Arch("t5gemma", lambda: tf.T5GemmaForConditionalGeneration(tf.T5GemmaConfig(
        encoder=tf.T5GemmaModuleConfig(**DEC, head_dim=16, sliding_window=4),
        decoder=tf.T5GemmaModuleConfig(**DEC, head_dim=16, sliding_window=4), vocab_size=V)),
         tokens(decoder=True), "logits"),
    Arch("reformer", build("ReformerModelWithLMHead", "ReformerConfig", vocab_size=V, hidden_size=64,
                           num_attention_heads=2, attention_head_size=32, attn_layers=["local", "local"],
                           axial_pos_embds=False, is_decoder=True, local_attn_chunk_length=4, feed_forward_size=64,
                           max_position_embeddings=64),
         tokens(), "logits",   # reversible layers: an autograd.Function reading the layers' weights
         no_grads="HF's Reformer refuses backward in eval mode (test_autograd_functions checks such Functions)"),
    Arch("xmod", enc("Xmod", languages=["en_XX", "de_DE", "fr_XX"], default_language="en_XX"),
         lambda b: {**tokens()(b), "lang_ids": torch.arange(b) % 3}, "last_hidden_state"),   # h[lang_mask] rows
    Arch("wav2vec2_conformer", build("Wav2Vec2ConformerModel", "Wav2Vec2ConformerConfig", **AUDIO,
                                     conv_depthwise_kernel_size=3, position_embeddings_type="rotary"),
         audio(), "last_hidden_state"),
    Arch("wav2vec2_bert", build("Wav2Vec2BertModel", "Wav2Vec2BertConfig", hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=128, feature_projection_input_dim=16,
                                conv_depthwise_kernel_size=3, position_embeddings_type="rotary"),
         lambda b: {"input_features": torch.randn(b, 20, 16)}, "last_hidden_state"),
    Arch("moonshine", build("MoonshineModel", "MoonshineConfig", vocab_size=V, hidden_size=64, intermediate_size=128,
                            encoder_num_hidden_layers=2, decoder_num_hidden_layers=2, encoder_num_attention_heads=4,
                            decoder_num_attention_heads=4),
         lambda b: {"input_values": torch.randn(b, 1600), "decoder_input_ids": torch.randint(3, V, (b, 6))},
         "last_hidden_state"),
    Arch("dinov3_vit", build("DINOv3ViTModel", "DINOv3ViTConfig", hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                             num_register_tokens=2), pixels(), "last_hidden_state"),
    Arch("upernet", lambda: tf.UperNetForSemanticSegmentation(tf.UperNetConfig(
        backbone_config=tf.ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                                          out_features=["stage1", "stage2", "stage3", "stage4"]),
        hidden_size=16, auxiliary_in_channels=48, auxiliary_channels=16, num_labels=3)), pixels(64), "logits"),
    Arch("detr", lambda: tf.DetrForObjectDetection(tf.DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, num_queries=5,
        backbone_config=tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                        out_features=["stage2"]),
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32)), pixels(64), "logits"),
    Arch("siglip", lambda: tf.SiglipModel(tf.SiglipConfig(text_config=dict(CLIP_TEXT), vision_config=dict(VIT))),
         clip_inputs, "logits_per_image"),
    Arch("blip", lambda: tf.BlipModel(tf.BlipConfig(text_config=dict(ENC), vision_config=dict(VIT), projection_dim=32)),
         clip_inputs, "logits_per_image"),
    Arch("time_series_transformer", build("TimeSeriesTransformerModel", "TimeSeriesTransformerConfig",
                                          prediction_length=4, context_length=8, lags_sequence=[1, 2], d_model=16,
                                          encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                          decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                          num_time_features=1),
         lambda b: {"past_values": torch.randn(b, 10), "past_time_features": torch.randn(b, 10, 1),
                    "past_observed_mask": torch.ones(b, 10), "future_values": torch.randn(b, 4),
                    "future_time_features": torch.randn(b, 4, 1)}, "last_hidden_state"),
    Arch("electra_pretraining", build("ElectraForPreTraining", "ElectraConfig", **{**ENC, "embedding_size": 32}),
         lambda b: _pretraining_labels(tokens()(b)), "loss"),   # BCE over logits[attention_mask == 1]
    Arch("funnel_pretraining", build("FunnelForPreTraining", "FunnelConfig", vocab_size=V, d_model=32, n_head=4,
                                     d_head=8, d_inner=64, block_sizes=[1, 1], num_decoder_layers=1),
         lambda b: _pretraining_labels(tokens()(b)), "loss"),
    Arch("jetmoe", build("JetMoeForCausalLM", "JetMoeConfig", vocab_size=V, hidden_size=64, num_hidden_layers=2,
                         num_key_value_heads=2, kv_channels=16, intermediate_size=64, num_local_experts=4,
                         num_experts_per_tok=2), tokens(), "logits"),   # experts: split by counts, cat back
    # fifth sweep: newer decoders, MoE routers, xLSTM, an FFT-free speech CTC model, FlexAttention through HF
    Arch("llama4_text", build("Llama4ForCausalLM", "Llama4TextConfig", **DEC, head_dim=16, intermediate_size_mlp=128,
                              num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
                              attention_chunk_size=8), tokens(), "logits"),
    Arch("hunyuan_moe", lm("HunYuanMoEV1", num_experts=4, moe_topk=2, head_dim=16), tokens(), "logits"),
    Arch("lfm2_moe", lm("Lfm2Moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_dense_layers=1,
                        layer_types=["full_attention", "conv"]), tokens(), "logits"),
    Arch("granitemoeshared", lm("GraniteMoeShared", num_local_experts=4, num_experts_per_tok=2,
                                shared_intermediate_size=64), tokens(), "logits"),
    Arch("minimax_m2", lm("MiniMaxM2", num_local_experts=4, num_experts_per_tok=2, head_dim=16), tokens(), "logits"),
    Arch("vaultgemma", lm("VaultGemma", head_dim=16), tokens(), "logits"),
    Arch("flex_olmo", lm("FlexOlmo", num_experts=4, num_experts_per_tok=2), tokens(), "logits"),
    Arch("nanochat", lm("NanoChat"), tokens(), "logits"),
    Arch("modernbert_decoder", build("ModernBertDecoderForCausalLM", "ModernBertDecoderConfig", **ENC,
                                     local_attention=8, global_attn_every_n_layers=2), tokens(), "logits"),
    Arch("llama_flex_attention", lambda: _flex(lm("Llama")()), tokens(), "logits",
         no_grads="torch has no CPU backward for FlexAttention (test_flex_attention.py compares the gradients with the "
                  "same model's eager attention)"),
    Arch("xlstm", build("xLSTMForCausalLM", "xLSTMConfig", vocab_size=V, hidden_size=64, embedding_dim=64, num_heads=4,
                        num_blocks=2, qk_dim_factor=1.0, v_dim_factor=1.0, chunk_size=4, pad_token_id=0),
         tokens(mask=False), "logits",
         no_grads="torch's own backward fails: xLSTM's forward updates a tensor autograd saved in place"),
    Arch("parakeet_ctc", build("ParakeetForCTC", "ParakeetCTCConfig", vocab_size=32, encoder_config=dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_mel_bins=16,
        subsampling_conv_channels=16, subsampling_factor=4, conv_kernel_size=5)),
         lambda b: {"input_features": torch.randn(b, 40, 16), "attention_mask": torch.ones(b, 40, dtype=torch.long)},
         "logits"),
    # sixth sweep: a zero-initialised router (every score tied: torch's CPU topk order), differential and
    # dynamic-mask attention, learned activations, BitNet's quantised linears, more encoders, vision and audio
    Arch("afmoe", lm("Afmoe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_dense_layers=1,
                     head_dim=16), tokens(), "logits"),
    Arch("diffllama", lm("DiffLlama"), tokens(), "logits"),
    Arch("doge", lm("Doge"), tokens(), "logits"),
    Arch("ernie4_5_moe", lm("Ernie4_5_Moe", moe_num_experts=4, moe_k=2, moe_intermediate_size=32, head_dim=16),
         tokens(), "logits"),
    Arch("glm4_moe", lm("Glm4Moe", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        first_k_dense_replace=1, head_dim=16), tokens(), "logits"),
    Arch("dots1", lm("Dots1", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                     first_k_dense_replace=1, head_dim=16), tokens(), "logits"),
    Arch("apertus", lm("Apertus", head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
         tokens(), "logits"),
    Arch("bitnet", lm("BitNet", head_dim=16), tokens(), "logits"),
    Arch("cpmant", build("CpmAntForCausalLM", "CpmAntConfig", vocab_size=V, hidden_size=64, num_attention_heads=4,
                         dim_head=16, dim_ff=128, num_hidden_layers=2, prompt_length=4), tokens(), "logits"),
    Arch("pegasus_x", build("PegasusXModel", "PegasusXConfig", **S2S, block_size=4, num_global_tokens=4),
         tokens(decoder=True), "last_hidden_state"),
    Arch("mpnet", enc("MPNet"), tokens(), "last_hidden_state"),
    Arch("squeezebert", enc("SqueezeBert", embedding_size=64, q_groups=2, k_groups=2, v_groups=2,
                            post_attention_groups=2, intermediate_groups=4, output_groups=4), tokens(),
         "last_hidden_state"),
    Arch("cvt", build("CvtModel", "CvtConfig", embed_dim=[16, 32], num_heads=[1, 2], depth=[1, 2],
                      patch_sizes=[7, 3], patch_stride=[4, 2], patch_padding=[2, 1], mlp_ratio=[2.0, 2.0],
                      attention_drop_rate=[0.0, 0.0], drop_rate=[0.0, 0.0], drop_path_rate=[0.0, 0.0],
                      qkv_bias=[True, True], cls_token=[False, True], qkv_projection_method=["dw_bn", "dw_bn"],
                      kernel_qkv=[3, 3], padding_kv=[1, 1], stride_kv=[2, 2], padding_q=[1, 1], stride_q=[1, 1]),
         pixels(), "last_hidden_state"),
    Arch("focalnet", build("FocalNetModel", "FocalNetConfig", image_size=32, patch_size=4, embed_dim=16,
                           depths=[1, 1], focal_levels=[2, 2], focal_windows=[3, 3]), pixels(), "last_hidden_state"),
    Arch("swiftformer", build("SwiftFormerModel", "SwiftFormerConfig", depths=[1, 1, 1, 1],
                              embed_dims=[16, 16, 32, 32]), pixels(), "last_hidden_state"),
    Arch("hiera", build("HieraModel", "HieraConfig", image_size=[64, 64], patch_size=[7, 7], patch_stride=[4, 4],
                        patch_padding=[3, 3], embed_dim=16, depths=[1, 1], num_heads=[1, 2], query_stride=[2, 2],
                        masked_unit_size=[4, 4], num_query_pool=1), pixels(64), "last_hidden_state"),
    Arch("sew", build("SEWModel", "SEWConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, squeeze_factor=2),
         audio(1600), "last_hidden_state"),
    Arch("dac", build("DacModel", "DacConfig", encoder_hidden_size=8, downsampling_ratios=[2, 4],
                      decoder_hidden_size=32, n_codebooks=2, codebook_size=16, codebook_dim=4, hidden_size=16),
         lambda b: {"input_values": torch.randn(b, 1, 256)}, "audio_values"),
    # FSMT tests `padding_mask.any()` to leave out a mask that masks nothing (switched off while capturing); its
    # decoder applies the causal mask only with use_cache=False (with the cache on, a full pass attends ahead)
    Arch("fsmt", build("FSMTModel", "FSMTConfig", **{k: v for k, v in S2S.items() if k != "vocab_size"},
                       langs=["en", "de"], src_vocab_size=V, tgt_vocab_size=V),
         lambda b: {**tokens(decoder=True)(b), "use_cache": False}, "last_hidden_state"),
]
BY_NAME = {a.name: a for a in ZOO}
FAST = ("mistral", "mixtral", "t5", "vit", "whisper")


def _params(grads=False):
    out = []
    for a in ZOO:
        reason = a.skip or (grads and a.no_grads)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if a.name not in FAST:
            marks.append(pytest.mark.skipif(not FULL, reason="set BRIDGE_TEST_FULL=1 for the whole zoo"))
        out.append(pytest.param(a.name, marks=marks))
    return out


@functools.lru_cache(maxsize=None)
def converted(name: str):
    arch = BY_NAME[name]
    torch.manual_seed(0)
    model = arch.model().eval()
    return model, bridge.convert(model, kwargs=arch.inputs(2), dynamic=arch.dynamic)


def _jax(kwargs):
    return {k: to_jax(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


@pytest.mark.parametrize("name", _params())
def test_forward_parity(name):
    arch = BY_NAME[name]
    model, jm = converted(name)
    kwargs = arch.inputs(3 if arch.dynamic else 2)   # another batch size than the example: dynamic="batch"
    with torch.no_grad():
        ref = model(**kwargs)[arch.output_key]
    got = jax.jit(jm.apply)(jm.params, **_jax(kwargs))[arch.output_key]
    assert got.dtype == jnp.float32
    assert_close(got, ref, what=name)


@pytest.mark.parametrize("name", _params(grads=True))
def test_gradients_match_autograd(name):
    arch = BY_NAME[name]
    model, jm = converted(name)
    kwargs = arch.inputs(2)
    model.zero_grad()
    out = model(**kwargs)[arch.output_key]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    jkw, w = _jax(kwargs), to_jax(weights)

    def loss(params):
        return jnp.sum(jm.apply(params, **jkw)[arch.output_key] * w)

    flat = bridge.tree.flatten(jax.jit(jax.grad(loss))(jm.params))
    assert set(flat) == set(ref), "gradient tree must have exactly the named_parameters() names"
    # requires_grad=False parameters (sinusoidal position tables) get no gradient in torch: zero here
    ref = {n: r if r is not None else torch.zeros(flat[n].shape) for n, r in ref.items()}
    # a gradient that is zero in exact arithmetic (a key bias under softmax) is rounding noise on both
    # sides: scales are floored at NOISE_FLOOR of the largest gradient, so GRAD_TOL of the floor is
    # about fp32's resolution (1e-7) of that gradient
    floor = NOISE_FLOOR * max(float(r.abs().max()) for r in ref.values())
    for n, g in flat.items():
        scale = max(float(ref[n].abs().max()), 1e-12)
        err = rel_err(g, ref[n]) * scale / max(scale, floor)   # max |g - ref| / max(scale, floor)
        assert err <= GRAD_TOL, f"{name}: grad of {n} off by {err:.3g}"


@pytest.mark.parametrize("name", ["t5", "whisper"])
def test_export_loads_back_in_transformers(name, tmp_path):
    model, jm = converted(name)
    bridge.export(jm, tmp_path / "hf", like=model)
    back = type(model).from_pretrained(tmp_path / "hf")
    ref, got = model.state_dict(), back.state_dict()
    assert list(got) == list(ref)
    for k, t in ref.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    kwargs = BY_NAME[name].inputs(2)
    with torch.no_grad():
        assert rel_err(back.eval()(**kwargs)[BY_NAME[name].output_key],
                       model(**kwargs)[BY_NAME[name].output_key]) == 0.0

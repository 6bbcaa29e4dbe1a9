"""KV caches through convert: Hugging Face Cache objects as inputs and outputs, decoding in JAX.

References are torch's own: the cache tensors a torch forward leaves, the logits of torch's decode step
with the same cache, and the tokens `model.generate` picks greedily.
"""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

import bridge
from bridge.errors import CaptureError, InputError
from tests.conftest import FULL, assert_close, full_only

V, B, P, N = 64, 2, 5, 4          # vocabulary, batch, prompt length, new tokens
EOS = 2

LMS = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, eos_token_id=EOS, pad_token_id=0)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32, eos_token_id=EOS, pad_token_id=0)),
    "mamba": lambda: tf.MambaForCausalLM(tf.MambaConfig(
        vocab_size=V, hidden_size=32, state_size=8, num_hidden_layers=2, eos_token_id=EOS, pad_token_id=0)),
    "jamba": lambda: tf.JambaForCausalLM(tf.JambaConfig(   # hybrid: Mamba layers and an attention layer
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
        expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_dt_rank=8, use_mamba_kernels=False,
        eos_token_id=EOS, pad_token_id=0)),
}


def _cache_name(model) -> str:
    """The forward's cache argument: `cache` in newer transformers, `past_key_values` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _greedy(logits_BV):
    return jnp.argmax(logits_BV.at[:, EOS].set(-jnp.inf), -1)    # generate(min_new_tokens=N) never picks EOS


def _torch_tokens(model, ids):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                         do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("name", list(LMS) if FULL else ["llama"])
def test_dynamic_cache_decode_matches_torch(name):
    """Prefill returns the cache as {'layers': [{'keys', 'values'}...]} equal to torch's; a decode program taking
    it back (converted once, any cache length) generates torch's greedy tokens with torch's logits."""
    model = LMS[name]().eval()
    key, ids = _cache_name(model), torch.randint(3, V, (B, P))
    prefill = bridge.convert(model, kwargs={"input_ids": ids, "use_cache": True})
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=True)
    out = prefill(input_ids=ids)
    assert_close(out["logits"], ref.logits, what="prefill logits")
    cache_ref = getattr(ref, key, None) or ref[key]
    flat_ref = torch.utils._pytree.tree_leaves(cache_ref)
    flat_got = jax.tree.leaves(out[key])
    assert len(flat_got) == len(flat_ref) > 0
    if name in ("llama", "gpt2"):
        layers = out[key]["layers"]
        assert_close(layers[1]["values"], cache_ref.layers[1].values, what="layer 1 values")
    # decode: one program for every cache length, written with one new token (that size stays static)
    decode = bridge.convert(model, kwargs={"input_ids": ids[:, :1], key: cache_ref}, dynamic="batch+seq")
    step = jax.jit(lambda p, tok, cache: decode.apply(p, input_ids=tok, **{key: cache}))
    cache, nxt, tokens, torch_cache = out[key], _greedy(out["logits"][:, -1]), [], cache_ref
    for _ in range(N):
        tokens.append(np.asarray(nxt))
        out = step(decode.params, nxt[:, None], cache)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor(np.asarray(nxt))[:, None], use_cache=True, **{key: torch_cache})
        torch_cache = getattr(ref, key, None) or ref[key]
        assert_close(out["logits"], ref.logits, what="decode logits")
        cache, nxt = out[key], _greedy(out["logits"][:, -1])
    np.testing.assert_array_equal(np.stack(tokens, 1), _torch_tokens(model, ids))


def test_static_cache_prefill_and_decode_in_one_jitted_program():
    """A StaticCache (fixed shapes, updated in place in torch) becomes state the converted program takes and
    returns: one conversion serves the prompt and every next token, under jit, with generate's tokens."""
    model = LMS["llama"]().eval()
    key, ids = _cache_name(model), torch.randint(3, V, (B, P))
    cfg = model.config
    cache = tf.StaticCache(config=cfg, max_cache_len=16)
    cache.early_initialization(B, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                               torch.float32, torch.device("cpu"))
    jm = bridge.convert(model, kwargs={"input_ids": ids, key: cache, "use_cache": True}, dynamic="batch+seq")
    step = jax.jit(lambda p, tok, c: jm.apply(p, input_ids=tok, **{key: c}))
    state = bridge.as_jax_inputs(cache)
    assert jax.tree.leaves(state) and all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(state))
    out = step(jm.params, jnp.asarray(ids.numpy()), state)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=True, **{key: cache})          # torch fills `cache` in place
    assert_close(out["logits"], ref.logits, what="prefill logits")
    assert_close(out[key]["layers"][0]["keys"], cache.layers[0].keys, what="cache keys after prefill")
    tokens, nxt, state = [], _greedy(out["logits"][:, -1]), out[key]
    for _ in range(N):
        tokens.append(np.asarray(nxt))
        out = step(jm.params, nxt[:, None], state)
        state, nxt = out[key], _greedy(out["logits"][:, -1])
    np.testing.assert_array_equal(np.stack(tokens, 1), _torch_tokens(model, ids))


SLIDING = {   # every layer sliding (window 4), and Gemma 3's sliding and full layers in turn
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, eos_token_id=EOS, pad_token_id=0)),
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        eos_token_id=EOS, pad_token_id=0, bos_token_id=1)),
}


@pytest.mark.parametrize("name", [pytest.param("mistral", marks=full_only), "gemma3"])
def test_sliding_window_models_decode_with_bridge_static_cache(name):
    """transformers' static sliding-window layers count in Python; `bridge.static_cache` holds them at full length
    and the model's mask applies the window: prompt and decode steps (past the window) under one jitted
    program, with the tokens of `generate` (whose sliding-window cache drops old keys)."""
    model = SLIDING[name]().eval()
    key, ids = _cache_name(model), torch.randint(3, V, (B, P))
    with pytest.raises(CaptureError, match=r"layers\[0\]\.\w+ is a Python number .*bridge\.static_cache"):
        bridge.convert(model, kwargs={"input_ids": ids, key: tf.StaticCache(config=model.config, max_cache_len=16),
                                      "use_cache": True})
    with pytest.raises(InputError, match="static_cache: Linear has no Hugging Face config"):
        bridge.static_cache(torch.nn.Linear(2, 2), B, 16)
    with pytest.raises(InputError, match="static_cache: max_cache_len must be a positive int, got 0"):
        bridge.static_cache(model, B, 0)
    cache = bridge.static_cache(model, B, 16)
    jm = bridge.convert(model, kwargs={"input_ids": ids, key: cache, "use_cache": True}, dynamic="batch+seq")
    step = jax.jit(lambda p, tok, c: jm.apply(p, input_ids=tok, **{key: c}))
    out = step(jm.params, jnp.asarray(ids.numpy()), bridge.as_jax_inputs(cache))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    assert_close(out["logits"], ref, what="prefill logits")
    tokens, nxt, state = [], _greedy(out["logits"][:, -1]), out[key]
    for _ in range(N):
        tokens.append(np.asarray(nxt))
        out = step(jm.params, nxt[:, None], state)
        state, nxt = out[key], _greedy(out["logits"][:, -1])
    assert P + N > 4 + 1   # the last steps attend past the window
    np.testing.assert_array_equal(np.stack(tokens, 1), _torch_tokens(model, ids))


def test_cache_errors_name_the_attribute_or_the_path():
    """A cache counting in Python (a sliding window's length) cannot be a JAX program's state: convert names the
    attribute. A cache that does not match the program names the path at fault."""
    model = tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4)).eval()
    key, ids = _cache_name(model), torch.randint(3, V, (B, P))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True)[key]
    with pytest.raises(CaptureError, match=r"cache attribute .*layers\[0\]\.\w+ is a Python number the forward"):
        bridge.convert(model, kwargs={"input_ids": ids[:, :2], key: cache}, dynamic="batch+seq")
    llama = LMS["llama"]().eval()
    key = _cache_name(llama)
    with torch.no_grad():
        cache = llama(input_ids=ids, use_cache=True)[key]
    jm = bridge.convert(llama, kwargs={"input_ids": ids[:, :1], key: cache})
    state = bridge.as_jax_inputs(cache)
    state["layers"][1].pop("values")
    with pytest.raises(InputError, match=r"%s\['layers'\]\[1\]: expected a dict with keys" % key):
        jm(input_ids=ids[:, :1], **{key: state})


@pytest.mark.skipif(not FULL, reason="BRIDGE_TEST_FULL=1 only")
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoder_cache_decode_matches_generate(name):
    """Seq2seq: the encoder runs once, its outputs (a ModelOutput) and an EncoderDecoderCache (self- and
    cross-attention caches) go through a decode program converted once for every cache length."""
    if name == "t5":
        model = tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, eos_token_id=EOS,
            pad_token_id=0, decoder_start_token_id=0))
    else:
        model = tf.BartForConditionalGeneration(tf.BartConfig(
            vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
            eos_token_id=EOS, pad_token_id=0, bos_token_id=1, decoder_start_token_id=EOS, forced_eos_token_id=None))
    model.eval()
    key, ids = _cache_name(model), torch.randint(3, V, (B, 7))
    start = torch.full((B, 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        enc = model.get_encoder()(input_ids=ids)
        first = model(encoder_outputs=enc, decoder_input_ids=start, use_cache=True)
    step0 = bridge.convert(model, kwargs={"encoder_outputs": enc, "decoder_input_ids": start, "use_cache": True})
    enc_j = bridge.as_jax_inputs(enc)
    out = step0(encoder_outputs=enc_j, decoder_input_ids=start)
    assert_close(out["logits"], first.logits, what="first decoder step")
    with torch.no_grad():   # a self-attention cache of length 2, so its length converts as a dynamic size
        example = model(encoder_outputs=enc, decoder_input_ids=start, use_cache=True, **{key: first[key]})[key]
    decode = bridge.convert(model, kwargs={"encoder_outputs": enc, "decoder_input_ids": start.repeat(1, 2),
                                           key: example, "use_cache": True}, dynamic="batch+seq")
    step = jax.jit(lambda p, tok, cache: decode.apply(p, encoder_outputs=enc_j, decoder_input_ids=tok,
                                                      **{key: cache}))
    tokens, cache, nxt = [], out[key], _greedy(out["logits"][:, -1])
    for _ in range(N):
        tokens.append(np.asarray(nxt))
        out = step(decode.params, nxt[:, None], cache)
        cache, nxt = out[key], _greedy(out["logits"][:, -1])
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N + 1, min_new_tokens=N + 1,
                          do_sample=False, num_beams=1)
    np.testing.assert_array_equal(np.stack(tokens, 1), want[:, 1:N + 1].numpy())

"""FlexAttention (`torch.nn.attention.flex_attention`) converts: score_mod / mask_mod subgraphs, captured
parameters and inputs, GQA, fully masked rows, logsumexp, bf16, Hugging Face's flex attention path.

Forward is compared with torch's flex_attention (eager, no grad: torch has no CPU backward for it); gradients
with the same attention written in plain torch ops (the mods called on broadcast index tensors)."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

import bridge
from bridge.tree import flatten
from converters.dtypes import to_jax
from tests.conftest import GRAD_TOL, assert_close, full_only, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")   # torch's eager
SLOW = [pytest.mark.slow, full_only]
E, H = 8, 4


def causal(b, h, q, k):
    return q >= k


class Attention(torch.nn.Module):
    """One attention layer whose scores go through `mods` (a key of MODS); flex=False: plain torch ops."""

    def __init__(self, mods, kv_heads=H, lse=False):
        super().__init__()
        self.mods, self.kv_heads, self.lse, self.flex = mods, kv_heads, lse, True
        self.q = torch.nn.Linear(H * E, H * E)
        self.kv = torch.nn.Linear(H * E, 2 * kv_heads * E)
        self.o = torch.nn.Linear(H * E, H * E)
        self.bias = torch.nn.Parameter(torch.randn(H) * 0.1)
        self.register_buffer("slopes", 2.0 ** -torch.arange(1, H + 1, dtype=torch.float32))

    def forward(self, x, doc):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, H, E).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, self.kv_heads, E).permute(2, 0, 3, 1, 4)
        score_mod, mask_mod = MODS[self.mods](self, doc)
        if self.flex:
            mask = None if mask_mod is None else create_block_mask(mask_mod, B, None, T, T, device="cpu")
            y = flex_attention(q, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=self.kv_heads != H,
                               return_aux=AuxRequest(lse=True) if self.lse else None)
            y = (y[0], y[1].lse) if self.lse else y
        else:
            y = _plain_attention(q, k, v, score_mod, mask_mod, self.lse)
        y, lse = y if self.lse else (y, None)
        out = self.o(y.transpose(1, 2).reshape(B, T, H * E))
        return (out, lse) if self.lse else out


def _plain_attention(q, k, v, score_mod, mask_mod, lse):
    B, _, T, _ = q.shape
    k, v = (t.repeat_interleave(H // t.shape[1], 1) for t in (k, v))
    s = q @ k.transpose(-1, -2) * E ** -0.5
    b, h, i, j = torch.arange(B)[:, None, None, None], torch.arange(H)[:, None, None], torch.arange(T)[:, None], \
        torch.arange(T)
    if score_mod is not None:
        s = score_mod(s, b, h, i, j)
    if mask_mod is not None:
        s = s.masked_fill(~mask_mod(b, h, i, j).expand(s.shape), float("-inf"))
    live = (s != float("-inf")).any(-1, keepdim=True)
    p = torch.where(live, torch.where(live, s, 0.0).softmax(-1), 0.0)
    y = p @ v
    return (y, torch.where(live[..., 0], torch.where(live, s, 0.0).logsumexp(-1), float("-inf"))) if lse else y


MODS = {   # name -> (score_mod, mask_mod) built from the module and the `doc` input
    "plain": lambda m, doc: (None, None),
    "relative_bias_causal": lambda m, doc: (lambda s, b, h, q, k: s + m.bias[h] * (q - k), causal),
    "sliding_window": lambda m, doc: (None, lambda b, h, q, k: (q >= k) & (q - k < 4)),
    "documents_alibi": lambda m, doc: (lambda s, b, h, q, k: s - m.slopes[h] * (q - k),
                                       lambda b, h, q, k: (doc[b, q] == doc[b, k]) & (q >= k)),
    "softcap_rows_masked": lambda m, doc: (lambda s, b, h, q, k: 5.0 * torch.tanh(s / 5.0),
                                           lambda b, h, q, k: (k >= 3) & (k <= q)),   # queries 0-2 see no key
}
CASES = [("plain", H, False), ("relative_bias_causal", H, False), ("relative_bias_causal", 2, False),
         ("sliding_window", 1, False), ("documents_alibi", H, True), ("softcap_rows_masked", H, True)]


def _inputs(dtype=torch.float32):
    x = torch.randn(2, 16, H * E, dtype=dtype)
    doc = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7])
    return x, doc


def _jax(*ts):
    return [to_jax(t) for t in ts]


@pytest.mark.parametrize("mods,kv_heads,lse", CASES, ids=[f"{m}-kv{k}{'-lse' if l else ''}" for m, k, l in CASES])
def test_forward_and_gradients(mods, kv_heads, lse):
    module = Attention(mods, kv_heads, lse)
    x, doc = _inputs()
    jm = bridge.convert(module, (x, doc))
    got = jax.jit(jm.apply)(jm.params, *_jax(x, doc))
    with torch.no_grad():
        ref = module(x, doc)
    for g, r in zip(jax.tree.leaves(got), ref if lse else [ref]):
        live = torch.isfinite(r)   # logsumexp of a row with every key masked is -inf in both
        np.testing.assert_array_equal(np.isfinite(np.asarray(g)), live.numpy())
        assert_close(np.asarray(g)[live.numpy()], r[live], what=mods)

    plain = copy.deepcopy(module)
    plain.flex = False
    w = torch.randn(ref[0].shape if lse else ref.shape)
    out = plain(x, doc)
    ((out[0] if lse else out) * w).sum().backward()

    def loss(p):
        y = jm.apply(p, *_jax(x, doc))
        return jnp.sum((y[0] if lse else y) * to_jax(w))

    grads = flatten(jax.jit(jax.grad(loss))(jm.params))
    for n, p in plain.named_parameters():
        if p.grad is None:   # the bias of mods that do not read it
            assert not np.asarray(grads[n]).any(), n
        else:
            assert rel_err(grads[n], p.grad) <= GRAD_TOL, n


def test_bfloat16_and_dynamic_sequence():
    module = Attention("documents_alibi").to(torch.bfloat16)
    x, doc = _inputs(torch.bfloat16)
    T = torch.export.Dim("T", min=2, max=128)   # torch's block mask bounds the length by its block size
    jm = bridge.convert(module, (x, doc), dynamic_shapes=({1: T}, {1: T}))
    for t in (16, 24):
        xt, dt = torch.randn(2, t, H * E, dtype=torch.bfloat16), (torch.arange(t) // 5).expand(2, t)
        with torch.no_grad():
            ref = module(xt, dt)
        got = jax.jit(jm.apply)(jm.params, *_jax(xt, dt))
        assert got.dtype == jnp.bfloat16
        assert_close(np.asarray(got.astype(jnp.float32)), ref.float(), "bfloat16", f"T={t}")


@pytest.mark.parametrize("arch", ["llama", pytest.param("mistral", marks=SLOW)])
def test_hugging_face_flex_attention(arch):
    """attn_implementation="flex_attention" with left padding: forward and gradients as the eager attention's."""
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM}[arch]
    cfg = cls.config_class(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           pad_token_id=0, sliding_window=4 if arch == "mistral" else None)
    cfg._attn_implementation = "flex_attention"
    model = cls(cfg).eval()
    ids, mask = torch.randint(1, 128, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    jm = bridge.convert(model, kwargs={"input_ids": ids, "attention_mask": mask}, dynamic="batch")
    eager_cfg = copy.deepcopy(cfg)
    eager_cfg._attn_implementation = "eager"
    eager = cls(eager_cfg).eval()
    eager.load_state_dict(model.state_dict())
    ref = eager(input_ids=ids, attention_mask=mask).logits
    kept = mask.bool().numpy()   # padded queries attend to nothing in flex, to something in eager
    w = torch.randn(ref.shape) * mask[..., None]
    (ref * w).sum().backward()

    def logits(p):
        return jm.apply(p, input_ids=to_jax(ids), attention_mask=to_jax(mask))["logits"]

    assert_close(np.asarray(jax.jit(logits)(jm.params))[kept], ref.detach().numpy()[kept], what=arch)
    grads = flatten(jax.jit(jax.grad(lambda p: jnp.sum(logits(p) * to_jax(w))))(jm.params))
    for n, p in eager.named_parameters():
        assert rel_err(grads[n], p.grad) <= GRAD_TOL, n

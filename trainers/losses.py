"""Losses written in JAX, `loss_fn(outputs, batch) -> scalar` (fp32).

Example:
    >>> Trainer(jm, opt, loss_fn=token_cross_entropy())          # causal LM on batch["labels"]
"""
from __future__ import annotations

import jax.numpy as jnp
import optax


def _first(outputs, key="logits"):
    if isinstance(outputs, dict):
        return outputs[key] if key in outputs else next(iter(outputs.values()))
    if isinstance(outputs, (tuple, list)):
        return outputs[0]
    return outputs


def model_loss(outputs, batch):
    """The loss the model computes itself (e.g. Hugging Face models given `labels`)."""
    if not isinstance(outputs, dict) or "loss" not in outputs:
        raise KeyError("the model returned no 'loss'; pass labels in the batch or give Trainer a loss_fn")
    return outputs["loss"].astype(jnp.float32)


def token_cross_entropy(labels_key: str = "labels", ignore_index: int = -100, shift: bool = True):
    """Next-token cross-entropy over `batch[labels_key]`, ignoring `ignore_index`, as HF computes it."""

    def loss_fn(outputs, batch):
        logits, labels = _first(outputs).astype(jnp.float32), batch[labels_key]
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        valid = labels != ignore_index
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
        weight = valid.astype(jnp.float32)
        return jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)

    return loss_fn


def classification_cross_entropy(labels_key: str | int = "labels"):
    """Cross-entropy of (B, C) logits against integer labels (batch[labels_key] or batch[1] for tuples)."""

    def loss_fn(outputs, batch):
        logits = _first(outputs).astype(jnp.float32)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[labels_key]))

    return loss_fn


def mse(target_key: str | int = "target"):
    def loss_fn(outputs, batch):
        pred = _first(outputs).astype(jnp.float32)
        return jnp.mean(jnp.square(pred - batch[target_key].astype(jnp.float32)))

    return loss_fn


def mean_pooled(outputs, batch, key: str = "last_hidden_state", mask_key: str = "attention_mask"):
    """Sentence embeddings: the hidden states averaged over unmasked tokens, L2-normalised (fp32)."""
    h = _first(outputs, key).astype(jnp.float32)
    m = batch[mask_key][..., None].astype(jnp.float32)
    e = (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def pair_contrastive(key: str = "last_hidden_state", mask_key: str = "attention_mask"):
    """In-batch loss over sentence pairs: a batch holds 2P sentences, a_1..a_P then b_1..b_P; the cosine
    of (a_i, b_i) is pulled to 1 and of (a_i, b_j), i != j, to 0 (mean squared error, times P)."""

    def loss_fn(outputs, batch):
        a, b = jnp.split(mean_pooled(outputs, batch, key, mask_key), 2)
        target = jnp.eye(a.shape[0], dtype=jnp.float32)
        return jnp.mean(jnp.square(a @ b.T - target)) * a.shape[0]

    return loss_fn

"""Optimizer helpers: AdamW with warmup + cosine decay, global-norm clipping, and a weight-decay
mask that skips biases and normalization weights.

Example:
    >>> opt = adamw(3e-4, total_steps=1000, warmup_steps=100, weight_decay=0.1, clip_norm=1.0)
"""
from __future__ import annotations

import re

import jax
import optax

from bridge.tree import flatten, nest

NO_DECAY = re.compile(r"(bias$|norm|ln_|LayerNorm|layernorm|\.bn\d*\.|embeddings?\.position)", re.I)


def decay_mask(params) -> dict:
    """True where weight decay applies: ≥2-d tensors that are not norms (biases are 1-d). Leaves another
    transform owns (optax.MaskedNode, e.g. frozen parameters) stay as they are."""
    return nest({k: v if isinstance(v, optax.MaskedNode) else (v.ndim >= 2 and not NO_DECAY.search(k))
                 for k, v in flatten(params).items()})


def skip_frozen(optimizer: optax.GradientTransformation, params, frozen) -> optax.GradientTransformation:
    """`optimizer` over the trainable parameters only: the `frozen` names (torch's requires_grad=False)
    get no update, so weight decay cannot move them, and no optimizer state.

    Example:
        >>> opt = skip_frozen(adamw(1e-3, total_steps=100), jm.params, jm.meta.frozen)
    """
    names = flatten(params)
    if not frozen & names.keys():
        return optimizer
    labels = nest({k: "frozen" if k in frozen else "train" for k in names})
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def adamw(lr: float, *, total_steps: int, warmup_steps: int = 0, weight_decay: float = 0.01,
          clip_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          end_lr_ratio: float = 0.0) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0 if warmup_steps else lr, lr, max(warmup_steps, 0), max(total_steps, warmup_steps + 1),
        end_value=lr * end_lr_ratio)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def global_norm(tree) -> jax.Array:
    return optax.global_norm(tree)

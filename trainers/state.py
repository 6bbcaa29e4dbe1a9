"""TrainState: everything a step reads and writes, as one pytree.

Example:
    >>> state = TrainState.create(params, buffers, optimizer, seed=0)   # loss_scale=LossScale.create(...) for fp16
    >>> state = TrainState.create(params, buffers, optimizer, ema=True)  # with a moving average of the params
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array           # int32 scalar: optimizer updates done
    params: Any               # fp32 master weights, nested by torch names
    buffers: Any              # BatchNorm stats, constants
    opt_state: Any
    rng: jax.Array            # raw uint32 key data (checkpoints as a plain array)
    loss_scale: Any = None    # trainers.LossScale for float16 training, else None
    ema: Any = None           # moving average of params (TrainConfig.ema_decay), else None

    @classmethod
    def create(cls, params, buffers, optimizer: optax.GradientTransformation, seed: int = 0,
               loss_scale=None, ema: bool = False) -> "TrainState":
        with jax.numpy_dtype_promotion("standard"):  # optax's internals rely on implicit promotion
            opt_state = optimizer.init(params)
        return cls(step=jnp.zeros((), jnp.int32), params=params, buffers=buffers,
                   opt_state=opt_state, rng=jax.random.key_data(jax.random.key(seed)), loss_scale=loss_scale,
                   ema=jax.tree.map(jnp.copy, params) if ema else None)

    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)

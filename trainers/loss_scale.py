"""Loss scaling for float16 training, with torch.amp.GradScaler's rules.

float16 flushes gradients below 6e-8 to zero (a mean over many tokens or pixels gets there quickly),
so the loss is multiplied by `value` before differentiation and the gradients divided by it after.
Dynamic scaling starts high; a step whose gradients overflow is skipped and halves the scale, and
`growth_interval` finite steps in a row double it — the schedule of torch's GradScaler, so a run ported
from `torch.amp` keeps its scale trajectory. The scale lives in TrainState and is checkpointed.

Example:
    >>> ls = LossScale.create("dynamic")                      # 65536, x2 every 2000 good steps
    >>> grads = ls.unscale(jax.grad(lambda p: ls.scale(loss(p)))(params))
    >>> ls = ls.update(all_finite(grads))
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class LossScale:
    value: jax.Array                 # float32 scalar: the current scale
    good_steps: jax.Array            # int32 scalar: finite steps since the scale last changed
    dynamic: bool = struct.field(pytree_node=False, default=True)
    growth_interval: int = struct.field(pytree_node=False, default=2000)
    growth_factor: float = struct.field(pytree_node=False, default=2.0)
    backoff_factor: float = struct.field(pytree_node=False, default=0.5)

    @classmethod
    def create(cls, mode, *, init: float = 2.0 ** 16, growth_interval: int = 2000) -> "LossScale":
        """`mode`: "dynamic" (from `init`) or a number (a static scale)."""
        if mode == "dynamic":
            value, dynamic = init, True
        elif isinstance(mode, (int, float)) and not isinstance(mode, bool) and mode > 0:
            value, dynamic = float(mode), False
        else:
            raise ValueError(f"loss_scale={mode!r}: use 'dynamic', a positive number, 'auto' or None")
        if growth_interval < 1:
            raise ValueError(f"loss_scale_growth_interval={growth_interval!r} must be >= 1")
        return cls(jnp.asarray(value, jnp.float32), jnp.zeros((), jnp.int32), dynamic, growth_interval)

    def scale(self, loss: jax.Array) -> jax.Array:
        return loss * self.value.astype(loss.dtype)

    def unscale(self, grads):
        """Gradients times 1/scale (computed in float32, as torch does)."""
        inv = 1.0 / self.value
        return jax.tree.map(lambda g: (g * inv.astype(g.real.dtype)).astype(g.dtype), grads)

    def update(self, finite: jax.Array) -> "LossScale":
        """The scale for the next step, given whether this step's gradients were all finite."""
        if not self.dynamic:
            return self
        good = jnp.where(finite, self.good_steps + 1, 0)
        grown = self.value * self.growth_factor
        grow = finite & (good >= self.growth_interval) & jnp.isfinite(grown)
        value = jnp.where(finite, jnp.where(grow, grown, self.value), self.value * self.backoff_factor)
        good = jnp.where(finite & (good >= self.growth_interval), 0, good)
        return self.replace(value=value, good_steps=good)


def all_finite(tree) -> jax.Array:
    """True when every element of every leaf is finite (torch's found_inf, negated)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def from_config(loss_scale, compute_dtype, *, init: float, growth_interval: int) -> LossScale | None:
    """The LossScale a TrainConfig asks for: "auto" is dynamic for float16 compute and off otherwise."""
    if loss_scale == "auto":
        loss_scale = "dynamic" if compute_dtype is not None and jnp.dtype(compute_dtype) == jnp.float16 else None
    if loss_scale is None or loss_scale == "none":
        return None
    return LossScale.create(loss_scale, init=init, growth_interval=growth_interval)

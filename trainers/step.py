"""The pure train and eval steps. Built once per Trainer and jitted with explicit shardings.

`train_step(state, batch) -> (state, metrics)`: forward (optionally in bf16/fp16 from fp32 master
weights, optionally rematerialised), loss scaling when the state holds a LossScale, gradient
accumulation over micro-batches with `lax.scan`, global-norm metric, optimizer update, and NaN/Inf
handling ("stop" reports it, "skip" keeps the old state; dynamic loss scaling always skips an overflow).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from bridge.tree import as_torch_grads
from trainers.loss_scale import all_finite
from trainers.state import TrainState

REMAT_POLICIES = {
    "full": None,                                                  # recompute everything
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs only
}


def default_inputs(jm) -> Callable:
    """Map a batch to the model's exported inputs: dict batches by name, tuple batches by position."""
    prog = jm.program
    spec_children = prog.in_spec.children() if hasattr(prog.in_spec, "children") else prog.in_spec.children_specs
    n_pos = spec_children[0].num_children
    kw_names = [k for k in spec_children[1].context if k not in prog.captured.extra_kwargs]
    pos_names = list(prog.captured.arg_names[:n_pos]) or [name for name, _ in prog.user_inputs[:n_pos]]

    def inputs(batch):
        if isinstance(batch, dict):
            args = tuple(batch[n] for n in pos_names)
            return args, {k: batch[k] for k in kw_names if k in batch}
        return tuple(batch[:n_pos]), {}

    return inputs


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_forward(jm, loss_fn, inputs_fn, *, compute_dtype=None, remat: str | None = None):
    """(params, buffers, batch, key) -> (loss, new_buffers)."""

    def forward(params, buffers, batch, key):
        if compute_dtype is not None:
            params = _cast_floats(params, compute_dtype)
        args, kwargs = inputs_fn(batch)
        out, new_buffers = jm.apply(params, *args, buffers=buffers, rng=key if jm.needs_rng else None,
                                    return_buffers=True, **kwargs)
        return loss_fn(out, batch).astype(jnp.float32), new_buffers

    if remat is not None:
        forward = jax.checkpoint(forward, policy=REMAT_POLICIES[remat])
    return forward


def ema_update(ema, params, step, decay: float):
    """torch's AveragedModel with get_ema_multi_avg_fn(decay), updated after optimizer step `step + 1`: the
    first update copies the params, later ones lerp towards them by 1 - decay (integer leaves copy)."""
    def one(e, p):
        if not jnp.issubdtype(p.dtype, jnp.inexact):
            return p
        return jnp.where(step == 0, p, e + (1 - decay) * (p - e)).astype(e.dtype)
    return jax.tree.map(one, ema, params)


def make_train_step(forward, optimizer: optax.GradientTransformation, *, accum: int = 1, nan_policy: str = "stop",
                    ema_decay: float | None = None):
    def scaled_forward(params, buffers, batch, key, loss_scale):
        """Differentiates loss / accum (times the loss scale): micro-batch gradients then sum to the
        batch's, within float16's range exactly as torch's `scaler.scale(loss / accum).backward()`."""
        loss, new_buffers = forward(params, buffers, batch, key)
        objective = loss if accum == 1 else loss / accum
        return (objective if loss_scale is None else loss_scale.scale(objective)), (loss, new_buffers)

    grad_fn = jax.grad(scaled_forward, has_aux=True)

    def micro_grads(params, buffers, batch, key, loss_scale):
        if accum == 1:
            grads, (loss, buffers) = grad_fn(params, buffers, batch, key, loss_scale)
            return loss, grads, buffers
        micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

        def body(carry, xs):
            loss_sum, grad_sum, bufs = carry
            mb, i = xs
            grads, (loss, bufs) = grad_fn(params, bufs, mb, jax.random.fold_in(key, i), loss_scale)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads), bufs), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss, grads, buffers), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros, buffers),
                                                 (micro, jnp.arange(accum)))
        return loss / accum, grads, buffers

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(state.key(), state.step)
        loss_scale = state.loss_scale
        loss, grads, buffers = micro_grads(state.params, state.buffers, batch, key, loss_scale)
        if loss_scale is not None:
            grads = loss_scale.unscale(grads)
        grads = as_torch_grads(grads)   # complex parameters descend as in torch (optax expects that direction)
        grad_norm = optax.global_norm(grads)
        grads_finite = all_finite(grads)
        with jax.numpy_dtype_promotion("standard"):  # optax's internals rely on implicit promotion
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & grads_finite
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "grads_finite": grads_finite}
        ema = None if state.ema is None else ema_update(state.ema, params, state.step, ema_decay)
        if nan_policy == "skip" or (loss_scale is not None and loss_scale.dynamic):
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            params, opt_state, buffers, ema = (keep(params, state.params), keep(opt_state, state.opt_state),
                                               keep(buffers, state.buffers), keep(ema, state.ema))
        if loss_scale is not None:
            metrics["loss_scale"] = loss_scale.value       # the scale this step ran with
            loss_scale = loss_scale.update(grads_finite)
        new = state.replace(step=state.step + 1, params=params, buffers=buffers, opt_state=opt_state,
                            loss_scale=loss_scale, ema=ema)
        return new, metrics

    return train_step


def make_eval_step(forward):
    def eval_step(state: TrainState, batch):
        loss, _ = forward(state.params, state.buffers, batch, jax.random.fold_in(state.key(), 2**31 - 1))
        return {"loss": loss}

    return eval_step

"""`bridge.convert`: torch.nn.Module → JaxModule.

Example:
    >>> jm = bridge.convert(model, (x,), dynamic="batch")
    >>> jm(x_jax)                         # same function, now in JAX
"""
from __future__ import annotations

import jax
import torch

from bridge.errors import CheckpointError

from bridge.jax_module import JaxModule, StateMeta
from bridge.tree import nest
from converters.capture import capture
from converters.dtypes import jax_dtype, to_jax
from converters.interpreter import Program


def convert(module: torch.nn.Module, args=(), kwargs: dict | None = None, *, dynamic_shapes=None,
            dynamic: str | None = None, train: bool = False, strict: bool | None = None,
            weights=None, weights_dtype=None, shardings=None) -> JaxModule:
    """Capture `module` on example inputs and return the equivalent JAX model.

    Args:
      module: any torch.nn.Module (Hugging Face models get `use_cache=False`).
      args, kwargs: example inputs, as you would call the module.
      dynamic_shapes: torch.export dynamic shape spec; or `dynamic="batch"` / `"batch+seq"`.
      train: capture in train mode (dropout active, BatchNorm updates its buffers).
      strict: torch.export mode; None tries strict and falls back to non-strict.
      weights: a checkpoint path (or params pytree) to load instead of the module's own tensors; the
        module may then be built with `bridge.empty_weights()` (parameters on the meta device).
        Key accounting is strict: missing/unexpected/mismatched keys raise `KeyMismatchError`.
      weights_dtype, shardings: passed to `bridge.load_weights`.

    Example:
      >>> jm = bridge.convert(model, kwargs={"input_ids": ids}, dynamic="batch+seq")
      >>> logits = jax.jit(jm.apply)(jm.params, input_ids=ids_jax)["logits"]
    """
    cap = capture(module, args, kwargs, dynamic_shapes=dynamic_shapes, dynamic=dynamic,
                  train=train, strict=strict)
    program = Program(cap)
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    state_keys = tuple(module.state_dict(keep_vars=True).keys())
    persistent = {cap.aliases.get(k, k) for k in state_keys}
    for name, t in program.lifted.items():  # lifted constants (e.g. torch.tensor(...) in forward)
        buffers.setdefault(name, t)
    meta = StateMeta(
        torch_dtypes={n: t.dtype for n, t in {**buffers, **params}.items()},
        aliases=dict(cap.aliases),
        non_persistent=frozenset(n for n in buffers if n not in persistent),
        state_dict_keys=state_keys,
    )
    on_meta = [n for n, t in {**params, **buffers}.items() if t.is_meta]
    if on_meta and weights is None:
        raise CheckpointError(f"{len(on_meta)} tensors are on the meta device ({', '.join(on_meta[:5])}...); "
                              "pass weights=<checkpoint> to convert")
    lost = [n for n in on_meta if n in meta.non_persistent]
    if lost:
        raise CheckpointError(f"non-persistent buffers {lost} are on the meta device and no checkpoint holds them; "
                              "build the module under bridge.empty_weights() so buffers stay real")
    jm = JaxModule(program, nest({n: _leaf(t) for n, t in params.items()}),
                   nest({n: _leaf(t) for n, t in buffers.items()}), meta)
    if weights is not None:
        jm, _ = jm.load_weights(weights, strict=True, dtype=weights_dtype, shardings=shardings)
    return jm


def _leaf(t: torch.Tensor):
    """A real tensor's value, or only its shape and dtype for a meta tensor (filled from a checkpoint)."""
    if t.is_meta:
        return jax.ShapeDtypeStruct(tuple(t.shape), jax_dtype(t.dtype))
    return to_jax(t)

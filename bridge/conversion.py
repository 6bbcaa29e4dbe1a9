"""`bridge.convert`: torch.nn.Module → JaxModule.

Example:
    >>> jm = bridge.convert(model, (x,), dynamic="batch")
    >>> jm(x_jax)                         # same function, now in JAX
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import jax
import numpy as np
import torch

from bridge.errors import CaptureError, CheckpointError, StateError

from bridge.hf_layout import layout_config
from bridge.jax_module import JaxModule, StateMeta
from bridge.tree import nest
from converters.capture import capture
from converters.dtypes import jax_dtype, to_jax
from converters.interpreter import Program
from converters.programs import exported_state


def convert(module: torch.nn.Module, args=(), kwargs: dict | None = None, *, dynamic_shapes=None,
            dynamic: str | None = None, train: bool = False, strict: bool | None = None,
            weights=None, weights_dtype=None, shardings=None, compute_dtype=None, static=()) -> JaxModule:
    """Capture `module` on example inputs and return the equivalent JAX model.

    Args:
      module: any torch.nn.Module (Hugging Face models get `use_cache=False`); a torch.compile'd or
        (Distributed)DataParallel model is converted as the model it wraps (its keys, unprefixed). Also a
        `torch.export.ExportedProgram` (e.g. `torch.export.load("model.pt2")`): lowered as exported (its
        shapes, mode and baked-in values), its example inputs used where args/kwargs are not given.
      args, kwargs: example inputs, as you would call the module.
      dynamic_shapes: torch.export dynamic shape spec; or `dynamic="batch"` / `"batch+seq"`.
      train: capture in train mode (dropout active, BatchNorm updates its buffers).
      strict: torch.export mode; None tries strict and falls back to non-strict.
      weights: a checkpoint path (or params pytree) to load instead of the module's own tensors; the
        module may then be built with `bridge.empty_weights()` (parameters on the meta device).
        Key accounting is strict: missing/unexpected/mismatched keys raise `KeyMismatchError`.
      weights_dtype, shardings: passed to `bridge.load_weights`.
      compute_dtype: e.g. `torch.bfloat16`: capture the graph as torch runs the module cast to that dtype
        (HF's own fp32 upcasts included) while `jm.params` keep the module's dtypes: `apply` casts them
        on the way in, so fp32 master weights train a bf16 program (mixed precision).
      static: names of tensor kwargs whose values decide shapes (LLaVA-NeXT's `image_sizes`): captured as
        Python lists, so the program is specialized to these values (as jax.jit's static_argnames). Calls may
        leave them out, or pass the same values (a concrete array or list); others raise InputError.

    Example:
      >>> jm = bridge.convert(model, kwargs={"input_ids": ids}, dynamic="batch+seq")
      >>> logits = jax.jit(jm.apply)(jm.params, input_ids=ids_jax)["logits"]
    """
    module = unwrapped(_program_file(module) if isinstance(module, (str, os.PathLike)) else module)
    if not isinstance(module, (torch.nn.Module, torch.export.ExportedProgram)):
        raise CaptureError(f"convert takes a torch.nn.Module, a torch.export.ExportedProgram or a .pt2 path, "
                           f"not {type(module).__name__}")
    captured = module
    kwargs = _static_values(dict(kwargs or {}), static)
    if compute_dtype is not None and isinstance(module, torch.export.ExportedProgram):
        raise CaptureError("compute_dtype needs the torch module: an ExportedProgram's dtypes are fixed; export "
                           "the module cast to that dtype, or convert the module itself")
    if compute_dtype is not None:   # the module and its floating example inputs, as torch would run them
        captured = _cast_copy(module, compute_dtype)
        cast = lambda t: t.to(compute_dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
        args, kwargs = torch.utils._pytree.tree_map(cast, (tuple(args), dict(kwargs or {})))
    cap = capture(captured, args, kwargs, dynamic_shapes=dynamic_shapes, dynamic=dynamic,
                  train=train, strict=strict)
    program = Program(cap)
    params, buffers, state_keys = _state(module)
    persistent = {cap.aliases.get(k, k) for k in state_keys}
    constants = [n for n in program.lifted if n not in buffers]   # e.g. torch.tensor(...) in forward
    for name in constants:
        buffers[name] = program.lifted[name]
    meta = StateMeta(
        torch_dtypes={n: t.dtype for n, t in {**buffers, **params}.items()},
        aliases=dict(cap.aliases),
        non_persistent=frozenset(n for n in buffers if n not in persistent),
        state_dict_keys=state_keys,
        frozen=frozenset(n for n, t in params.items() if not t.requires_grad),
        **_ignored_keys(module), hf_config=layout_config(module),
    )
    on_meta = [n for n, t in {**params, **buffers}.items() if t.is_meta]
    if on_meta and weights is None:
        raise CheckpointError(f"{len(on_meta)} tensors are on the meta device ({', '.join(on_meta[:5])}...); "
                              "pass weights=<checkpoint> to convert")
    lost = [n for n in on_meta if n in meta.non_persistent]
    if lost:
        raise CheckpointError(f"non-persistent buffers {lost} are on the meta device and no checkpoint holds them; "
                              "build the module under bridge.empty_weights() so buffers stay real")
    jm = JaxModule(program, nest({n: _leaf(n, t) for n, t in params.items()}),
                   nest({n: _leaf(n, t, constant=n in constants) for n, t in buffers.items()}), meta)
    if weights is not None:
        jm, _ = jm.load_weights(weights, strict=True, dtype=weights_dtype, shardings=shardings)
    return jm


def _ignored_keys(module) -> dict[str, tuple[str, ...]]:
    """The checkpoint keys a Hugging Face model's from_pretrained passes over: its (and its parts')
    `_keys_to_ignore_on_load_unexpected/missing`, and the per-layer `rotary_emb.inv_freq` and persistent
    `position_ids` buffers of older checkpoints where the model now keeps those buffers elsewhere."""
    if not hasattr(module, "_keys_to_ignore_on_load_unexpected"):
        return {}
    unexpected, missing = set(), set()
    for m in module.modules():
        unexpected |= set(getattr(m, "_keys_to_ignore_on_load_unexpected", None) or ())
        missing |= set(getattr(m, "_keys_to_ignore_on_load_missing", None) or ())
    buffers = [name for name, _ in module.named_buffers()]
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        unexpected.add(r"rotary_emb\.inv_freq")
    if any(b.endswith("position_ids") for b in buffers):
        unexpected.add(r"(^|\.)position_ids$")
    return {"ignore_unexpected": tuple(sorted(unexpected)), "ignore_missing": tuple(sorted(missing))}


def _static_values(kwargs: dict, static) -> dict:
    """kwargs with the tensors named in `static` as Python lists (torch.export bakes Python values in)."""
    for name in [static] if isinstance(static, str) else static:
        if name not in kwargs:
            raise CaptureError(f"static={name!r}: no keyword input of that name among {sorted(kwargs)}")
        value = kwargs[name]
        kwargs[name] = value.tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else value
    return kwargs


def _program_file(path) -> torch.export.ExportedProgram:
    """A .pt2 file (torch.export.save) read as the program to convert; any other path is a usage error."""
    from bridge.pt2 import is_program_file, load_program
    if not os.path.isfile(path):
        raise CaptureError(f"{path}: no such file (convert takes a module, an ExportedProgram or a .pt2 file)")
    if not is_program_file(Path(path)):
        raise CaptureError(f"{path}: not a torch.export program (.pt2); a checkpoint holds weights only: build "
                           "the module and pass the file as convert(module, ..., weights=path)")
    return load_program(path)


def _state(module) -> tuple[dict, dict, tuple]:
    """(parameters, buffers, state_dict keys) by torch name, of a module or an ExportedProgram."""
    if isinstance(module, torch.export.ExportedProgram):
        return exported_state(module)
    return (dict(module.named_parameters()), dict(module.named_buffers()),
            tuple(module.state_dict(keep_vars=True).keys()))


def unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile's OptimizedModule and (Distributed)DataParallel: their state_dicts
    only prefix the model's keys ("_orig_mod.", "module."), which Hugging Face directories, the
    trainer's sharding rules and `model.load_state_dict` on the bare model do not expect."""
    from torch._dynamo.eval_frame import OptimizedModule
    while True:
        if isinstance(module, OptimizedModule):
            module = module._orig_mod
        elif isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            module = module.module
        else:
            return module


def _cast_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `module` whose floating parameters and buffers are cast to `dtype`; every other tensor
    is shared, not copied (only the cast copies take memory; tied weights stay tied)."""
    if not dtype.is_floating_point:
        raise ValueError(f"compute_dtype must be a floating dtype, got {dtype}")
    memo = {}
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in memo:
            continue
        if not t.is_floating_point() or t.dtype == dtype:
            memo[id(t)] = t
            continue
        cast = t.detach().to(dtype)
        memo[id(t)] = torch.nn.Parameter(cast, requires_grad=t.requires_grad) \
            if isinstance(t, torch.nn.Parameter) else cast
    return copy.deepcopy(module, memo)


def _leaf(name: str, t: torch.Tensor, constant: bool = False):
    """A real tensor's value, or only its shape and dtype for a meta tensor (filled from a checkpoint).
    Module state that x32 cannot hold raises; a graph constant (e.g. an int64 max sentinel) saturates."""
    if t.is_meta:
        return jax.ShapeDtypeStruct(tuple(t.shape), jax_dtype(t.dtype))
    return to_jax(t, f"{name!r} of the module", None if constant else StateError)

"""Capture of models that arrive already traced: a `torch.export.ExportedProgram` (in memory or loaded from
a `.pt2` file with `torch.export.load`) and TorchScript modules.

An ExportedProgram is lowered as it is: its shapes (static or the `dynamic_shapes` it was exported with),
its mode (train or eval) and the Python values it baked in are those of its export; its example inputs
stand in where none are given.

Example:
    >>> ep = torch.export.load("model.pt2")
    >>> cap = capture_traced(ep)                  # or bridge.convert(ep)
"""
from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
from torch.export.graph_signature import ExportGraphSignature

from bridge.errors import CaptureError
from converters.capture import Captured, _decomposed, _mode, _row_major, _static_inputs, state_aliases


def capture_traced(program, args: tuple = (), kwargs: dict | None = None, *, dynamic_shapes=None,
                   dynamic: str | None = None, train: bool = False) -> Captured:
    """A Captured for an ExportedProgram or a TorchScript module (see the module docstring)."""
    if isinstance(program, torch.export.ExportedProgram):
        return _capture_exported(program, args, kwargs, dynamic_shapes, dynamic, train)
    return _capture_script(program, args, dict(kwargs or {}), train)


def _capture_exported(ep: torch.export.ExportedProgram, args: tuple, kwargs: dict | None, dynamic_shapes,
                      dynamic: str | None, train: bool) -> Captured:
    if dynamic is not None or dynamic_shapes is not None:
        raise CaptureError("an ExportedProgram's shapes were fixed when it was exported: export it with "
                           "torch.export.export(..., dynamic_shapes=...) instead of passing dynamic= to convert")
    if train:
        raise CaptureError("an ExportedProgram's mode was fixed when it was exported: call model.train() before "
                           "torch.export.export for a train-mode program, and leave convert's train= unset")
    if not args and not kwargs:
        if ep.example_inputs is None:
            raise CaptureError("the ExportedProgram carries no example inputs (it was saved without them); "
                               "pass args/kwargs as you would call the exported module")
        args, kwargs = ep.example_inputs
    kwargs = dict(kwargs or {})
    # decomposition edits the graph (no_grad blocks): on a copy, never on the caller's program; state is shared
    ours = _copied(ep)
    try:
        lowered = _decomposed(ours)
    except Exception as e:  # torch raises many types while decomposing; the op is in the message
        raise CaptureError(f"the ExportedProgram failed to decompose: {type(e).__name__}: {e}") from e
    return Captured(lowered, program_aliases(ep), {}, False, train, *_static_inputs(args, kwargs, {}))


def _copied(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """`ep` with its own copy of the graph (state shared). Copying renames nodes whose names shadow Python
    builtins (nn.Linear's `input` becomes `input_1`), so the signature follows the new names."""
    with warnings.catch_warnings():   # torch's own deprecation notes, from copying its tree specs
        warnings.filterwarnings("ignore", category=FutureWarning)
        gm = copy.deepcopy(ep.graph_module)
    renamed = {a.name: b.name for a, b in zip(ep.graph.nodes, gm.graph.nodes) if a.name != b.name}

    def spec(s):
        name = getattr(s.arg, "name", None)
        return dataclasses.replace(s, arg=dataclasses.replace(s.arg, name=renamed[name])) if name in renamed else s
    sig = ep.graph_signature
    sig = ExportGraphSignature(input_specs=[spec(s) for s in sig.input_specs],
                               output_specs=[spec(s) for s in sig.output_specs])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        return ep._update(gm, sig)


def program_aliases(ep: torch.export.ExportedProgram) -> dict[str, str]:
    """Every state name of the program → the first name of its tensor. A tied weight is one tensor in a
    program exported in this process, and two tensors over one storage in a program read from a .pt2 file:
    both count as tied (same storage, offset, shape, strides and dtype)."""
    state = {**ep.state_dict, **ep.constants}
    sig = ep.graph_signature
    canonical, out = {}, {}
    for name in [*sig.parameters, *sig.buffers]:
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype) \
            if t.numel() and not t.is_meta else id(t)
        out[name] = canonical.setdefault(key, name)
    return out


def exported_state(ep: torch.export.ExportedProgram):
    """(parameters, buffers, state_dict keys) of a program by its torch names, as a module's
    named_parameters(), named_buffers() and state_dict() would give them (tied names resolved later)."""
    state = {**ep.constants, **ep.state_dict}
    sig = ep.graph_signature
    params = {n: state[n] for n in sig.parameters}
    buffers = {n: state[n] for n in sig.buffers}
    return params, buffers, tuple(k for k in ep.state_dict if k in params or k in buffers)


def _capture_script(module: torch.jit.ScriptModule, args: tuple, kwargs: dict, train: bool) -> Captured:
    """A TorchScript module (torch.jit.script / trace / load) through torch's TorchScript → ExportedProgram
    converter: torch.export cannot trace a ScriptModule, and its graph is already ATen."""
    from torch._export.converter import TS2EPConverter
    args, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, _row_major, (args, kwargs))
    with _mode(module, train), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Manually populate.*")   # unused buffers kept in state
        try:
            ep = _decomposed(TS2EPConverter(module, args, kwargs or None).convert())
        except Exception as e:  # the converter raises many types; the op or construct is in the message
            raise CaptureError(f"TorchScript module {module.original_name}: torch's TorchScript converter "
                               f"failed: {type(e).__name__}: {e}") from e
    return Captured(ep, state_aliases(module), {}, False, train, *_static_inputs(args, kwargs, {}))


def reference_module(ep: torch.export.ExportedProgram) -> torch.nn.Module:
    """`ep.module()`, torch's runnable form of the program, with tied weights tied as `program_aliases` ties
    them (a .pt2 file reads a tied weight back as two tensors), so its gradients are the converted model's."""
    module = ep.module()
    for name, canon in program_aliases(ep).items():
        if name != canon and name in ep.graph_signature.parameters:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, module.get_parameter(canon))
    return module

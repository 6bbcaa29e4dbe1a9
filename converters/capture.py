"""Capture a torch module with torch.export and decompose it to the ops we lower.

Ops with a registered lowering are kept whole (attention, norms, gelu, convolution...);
everything else follows torch's default decomposition to core ATen.

Example:
    >>> cap = capture(model, (x,), dynamic="batch")
    >>> cap.program.graph.print_tabular()
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import itertools
import operator
import re
import sys
import warnings
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor

from bridge.errors import CaptureError
from converters import ops as _ops  # noqa: F401  (registers every lowering)
from converters import selected_rows
from converters.autograd_functions import (collecting_hooks, inlined_functions, recording_functions,
                                          warn_backward_hooks, warn_dropped_hooks)
from converters.registry import registered
from converters.checks import export_assuming_checks
from converters.rejoin import rejoin_splits
from converters.ctc import read_masked_targets, routing_ctc
from converters.packed import packed_inputs, repacking, routing_packed
from converters.caches import (has_cache, model_outputs_in_field_order, register_objects,
                              register_transformers_caches)
from converters.dynamic import dynamic_spec, fixed_dims, fixed_text
from converters.model_conventions import (config_cache_off, hf_kwargs, install_output_hooks, meta_stand_ins,
                                         no_fake_leftovers)
from converters.shortcuts import shortcuts_off
from converters.structure import patched_forward, registering_outputs


@dataclasses.dataclass
class Captured:
    program: torch.export.ExportedProgram
    aliases: dict[str, str]            # every state name → canonical (first) name of its tensor
    extra_kwargs: dict[str, Any]       # kwargs bridge injected at capture (e.g. use_cache=False)
    strict: bool                       # which export mode succeeded
    train: bool
    # example inputs holding no tensor (flags such as output_hidden_states=True, None): torch.export bakes them
    # into the program, so calls may leave them out; kwargs by name, positional ones as the trailing run
    static_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    static_args: tuple = ()
    arg_names: tuple = ()              # forward's names of the positional inputs (batches name them so)


def state_aliases(module: torch.nn.Module) -> dict[str, str]:
    """Map every parameter/buffer name, tied duplicates included, to its canonical name."""
    canonical: dict[int, str] = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        canonical.setdefault(id(t), name)
    out = {}
    for name, t in list(module.named_parameters(remove_duplicate=False)) + list(
            module.named_buffers(remove_duplicate=False)):
        out[name] = canonical.get(id(t), name)
    return out


def _flat_signature(module: torch.nn.Module, kwargs: dict) -> inspect.Signature | None:
    """forward's signature with the kwargs that would land in `**kwargs` as keyword-only parameters, or None:
    torch.export cannot match dynamic_shapes to `**kwargs` (HF models take use_cache, past_key_values so)."""
    sig = inspect.signature(module.forward)
    params = list(sig.parameters.values())
    loose = [k for k in kwargs if k not in sig.parameters]
    if not loose or not any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return sig.replace(parameters=[p for p in params if p.kind is not p.VAR_KEYWORD]
                       + [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in loose])


def _flat_forward(module: torch.nn.Module, sig: inspect.Signature | None):
    """module.forward seen with `sig` (see _flat_signature) while exporting."""
    if sig is None:
        return contextlib.nullcontext()

    def wrapper(forward):
        def flat(*args, **kwargs):
            return forward(*args, **kwargs)
        flat.__signature__ = sig
        return flat
    return patched_forward(module, wrapper)


def decomposition_table(decompose: set = frozenset()) -> dict:
    """torch's default decompositions minus every op we lower directly (but those in `decompose`)."""
    table = torch.export.default_decompositions()
    for target in registered():
        if isinstance(target, torch._ops.OpOverload) and target in table and target not in decompose:
            table.pop(target)
    return table


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy with torch's default row-major strides where its strides differ."""
    strides, acc = [], 1
    for n in reversed(t.shape):
        strides.append(acc)
        acc *= max(int(n), 1)
    if t.stride() == tuple(reversed(strides)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _detach_no_grad_inputs(gm: torch.fx.GraphModule) -> None:
    """`torch.no_grad()` blocks reach the graph as wrap_with_set_grad_enabled(False, block, *inputs), which
    decomposition inlines, losing the grad mode. Detaching the block's tensor inputs keeps torch's semantics:
    nothing computed inside carries a gradient (spectral norm's power iteration, HF rotary tables), and in-place
    updates through the detached inputs still update the buffers/parameters they alias."""
    wrap = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    blocks = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is wrap and n.args[0] is False
              and not _autograd_function_forward(gm, n)]
    for node in blocks:
        _pass_through_self(gm, node)
        with gm.graph.inserting_before(node):
            args = list(node.args)
            for i, a in enumerate(args[2:], 2):
                if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor):
                    args[i] = gm.graph.call_function(torch.ops.aten.detach.default, (a,))
                    args[i].meta.update(val=a.meta["val"], stack_trace=node.meta.get("stack_trace"))
            node.args = tuple(args)
    if blocks:
        gm.recompile()


_MAY_RETURN_SELF = (torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout, torch.ops.aten.to.device,
                    torch.ops.aten.to.other, torch.ops.aten.contiguous.default)


def _returns_self(n):
    """The block input a block output is in torch (`x.to(x.dtype)`, `.contiguous()` of a contiguous x return x
    itself, gradient and all), or None."""
    while isinstance(n, torch.fx.Node) and n.target in _MAY_RETURN_SELF:
        src, val = n.args[0], n.meta.get("val")
        bound = {a.name: v for a, v in zip(n.target._schema.arguments, n.args)} | dict(n.kwargs)
        same = isinstance(val, torch.Tensor) and isinstance(src.meta.get("val"), torch.Tensor) and \
            val.dtype == src.meta["val"].dtype and val.device == src.meta["val"].device
        if not same or bound.get("copy", False) or (n.target is torch.ops.aten.contiguous.default
                                                     and not src.meta["val"].is_contiguous()):
            return None
        n = src
    return n if isinstance(n, torch.fx.Node) and n.op == "placeholder" else None


def _pass_through_self(gm: torch.fx.GraphModule, block: torch.fx.Node) -> None:
    """A no-grad block's output that is one of its inputs itself: later uses read the input, with its gradient."""
    sub = getattr(gm, block.args[1].target, None)
    if not isinstance(sub, torch.fx.GraphModule):
        return
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    outs = next(n for n in sub.graph.nodes if n.op == "output").args[0]
    for i, out in enumerate(outs if isinstance(outs, (list, tuple)) else [outs]):
        src = _returns_self(out)
        if src is None or not isinstance(block.args[2 + placeholders.index(src)], torch.fx.Node):
            continue
        for user in [u for u in block.users if u.target is operator.getitem and u.args[1] == i]:
            user.replace_all_uses_with(block.args[2 + placeholders.index(src)])


def _autograd_function_forward(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Strict export inlines an autograd.Function's forward as a no-grad block too (it runs under no_grad), but
    its gradient is the Function's backward (Bloom's GeLU): differentiating the forward stands for it, zero does not."""
    sub = getattr(gm, node.args[1].target, None)
    return isinstance(sub, torch.fx.GraphModule) and any(
        (n.meta.get("source_fn_stack") or [("",)])[0][0] == "autograd.function" for n in sub.graph.nodes)


@contextlib.contextmanager
def _non_strict_routes():
    """What non-strict export only takes through bridge's ops: user autograd.Functions and gradient hooks
    (their own backward), packed sequences (padded, with their lengths); `x.data` reads as `x.detach()`."""
    with recording_functions(), routing_packed(), _data_as_detach():
        yield


_DATA = torch._C.TensorBase.data


@contextlib.contextmanager
def _data_as_detach():
    """`t.data` is an alias of t that autograd does not see; torch.export refuses writes through it
    (`pe_full.data[:, k:].copy_(pe)`, CogVideoX's patch embedding) as mutating a lifted constant. `t.detach()`
    is the same alias as an op, whose writes functionalize into t; assigning `t.data = ...` is unchanged."""
    before = torch.Tensor.__dict__.get("data")   # set by an enclosing capture, or None
    torch.Tensor.data = property(lambda t: t.detach(), lambda t, value: _DATA.__set__(t, value))
    try:
        yield
    finally:
        if before is None:
            del torch.Tensor.data
        else:
            torch.Tensor.data = before


@contextlib.contextmanager
def _mode(module: torch.nn.Module, train: bool):
    states = {m: m.training for m in module.modules()}
    module.train(train)
    try:
        yield
    finally:
        for m, t in states.items():
            m.training = t


def capture(module: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *,
            dynamic_shapes=None, dynamic: str | None = None, train: bool = False,
            strict: bool | None = None) -> Captured:
    """torch.export `module` (strict first, non-strict where strict fails) and decompose it."""
    if not isinstance(args, tuple):
        args = (args,)
    kwargs = dict(kwargs or {})
    if isinstance(module, (torch.jit.ScriptModule, torch.export.ExportedProgram)):   # already traced
        from converters.programs import capture_traced
        return capture_traced(module, args, kwargs, dynamic_shapes=dynamic_shapes, dynamic=dynamic, train=train)
    register_transformers_caches()   # KV caches in inputs or outputs flatten to their tensors
    args, kwargs = packed_inputs((args, kwargs))   # a PackedSequence input: its padded batch and lengths
    register_objects((args, kwargs))
    # torch.export traces the examples' strides (size-1 dims included); JAX arrays have none
    args, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, _row_major, (args, kwargs))
    extra = hf_kwargs(module, kwargs)
    install_output_hooks(module)
    kwargs.update(extra)
    if dynamic is not None:
        if dynamic_shapes is not None:
            raise CaptureError("pass either dynamic= or dynamic_shapes=, not both")
        dynamic_shapes = dynamic_spec(module, args, kwargs, dynamic, _flat_signature(module, kwargs))
    flat = _flat_signature(module, kwargs) if dynamic_shapes is not None else None
    # a cache passed in is updated in place, and counts may live in Python: non-strict runs forward as Python,
    # where registering_outputs checks them (HF's own exporter uses non-strict for caches too)
    modes = ([False] if has_cache(args, kwargs) else [True, False]) if strict is None else [strict]
    if strict is None and any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
        modes.sort()   # weights on the meta device: non-strict first, as strict (dynamo) writes its stand-ins
    errors = []
    warn_backward_hooks(module)
    with _mode(module, train), config_cache_off(module, kwargs), collecting_hooks() as hooks, \
            shortcuts_off(), routing_ctc(), repacking(module, (args, kwargs)), model_outputs_in_field_order(), \
            no_fake_leftovers(module), meta_stand_ins(module), warnings.catch_warnings():
        # torch's own deprecation chatter and dynamo's side-effect notes say nothing about the user's model
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*side effects happened in the model.forward.*")
        inlined, strict_hooks = None, []   # a strict program that lost a custom backward or gradient hook
        narrow = None   # a strict program that fixed a size dynamic= asked to vary
        for mode in modes:
            hooks.clear()   # hooks the attempt that succeeds leaves out
            try:
                if mode == _CHECKS:   # non-strict failed on a value read from a tensor: only checks?
                    with _non_strict_routes(), _flat_forward(module, flat), registering_outputs(module):
                        ep, assumed = export_assuming_checks(lambda: _exported(
                            module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False))
                    ep, mode = _decomposed(ep), False
                    warnings.warn(f"{type(module).__name__}: checks on tensor values cannot run in a traced "
                                  "program; convert assumed they pass, as they did for the example (the JAX "
                                  "model will not raise on bad input):\n  " + "\n  ".join(assumed), stacklevel=3)
                    break
                with contextlib.nullcontext() if mode else _non_strict_routes(), _flat_forward(module, flat), \
                        contextlib.nullcontext() if mode else registering_outputs(module):
                    ep = _exported(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=mode)
                if mode and any(isinstance(c, FakeTensor) for c in ep.constants.values()):
                    raise CaptureError("strict export made a tensor read through `.data` a constant snapshot; "
                                       "non-strict reads it as the tensor")
                if mode and strict is None and hooks:
                    inlined, strict_hooks = ep, list(hooks)
                    raise CaptureError("strict export drops gradient hooks; non-strict keeps them")
                if mode and inlined_functions(ep.graph_module):
                    if strict is None:
                        inlined = ep
                        raise CaptureError("strict export inlined a custom autograd.Function's forward; "
                                           "non-strict keeps its backward")
                    warnings.warn(_INLINED + "; leave strict=None (or pass strict=False) to keep its backward",
                                  stacklevel=3)
                fixed = fixed_dims(ep, dynamic) if mode and strict is None and dynamic is not None else []
                if fixed:   # dynamo specializes a size the code reads as a Python int (an f-string, a check's
                    narrow = ep   # message); non-strict runs the code as Python and keeps it symbolic
                    raise CaptureError(f"strict export fixed {fixed_text(fixed)}")
                # inside the loop: a strict program can fail to decompose (torch.autocast blocks), non-strict not
                ep = _decomposed(ep)
                break
            except Exception as e:  # torch raises many unrelated types here; we report them all
                errors.append(f"{_MODE_NAMES[mode]}: {type(e).__name__}: {e}")
                if mode is False and "data-dependent" in str(e).lower():
                    modes.append(_CHECKS)
        else:
            hint = ("\nhint: a Python branch on tensor values cannot be captured; write it with torch.where, or "
                    "torch.cond (lowered to lax.cond)" if any("data-dependent" in e.lower() for e in errors) else "")
            shape_inputs = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and not v.is_floating_point()
                            and 0 < v.dim() <= 2 and v.numel() <= 64 and k not in _TOKEN_INPUTS]
            if hint and shape_inputs:
                hint += (f"; where the values come from an input that describes shapes (image sizes, grids: "
                         f"{', '.join(shape_inputs)}?), convert with static=({shape_inputs[0]!r},) to capture it "
                         "as a Python value, the program specialized to it")
            if hint and any("torch/distributions" in e for e in errors):
                hint += "; a torch.distributions object built with validate_args=True checks its values so: drop it"
            if any("torch.autograd.grad" in e or "requires_grad_" in e for e in errors) or _takes_derivatives(module):
                hint += ("\nhint: derivatives taken inside forward (torch.autograd.grad, requires_grad_, torch.func's "
                         "grad / jacrev / jacfwd / vjp / jvp / hessian) cannot be "
                         "captured; convert the network without them and differentiate in JAX, e.g. "
                         "jax.grad(lambda x: jm.apply(params, x).sum())(x)")
            failed = CaptureError(f"torch.export failed for {type(module).__name__}:\n" + "\n".join(errors) + hint)
            if inlined is None and narrow is not None:
                inlined = narrow
            if inlined is None:
                raise failed
            hooks[:] = strict_hooks
            if not hooks:
                warnings.warn(f"{_INLINED} (non-strict export, which keeps it, failed: {errors[-1]})", stacklevel=3)
            try:
                ep, mode = _decomposed(inlined), True
            except Exception as e:
                raise failed from e
    warn_dropped_hooks(hooks)
    fixed = fixed_dims(ep, dynamic) if dynamic is not None else []
    if fixed:
        warnings.warn(f"dynamic={dynamic!r}: {type(module).__name__}'s code ties "
                      f"{fixed_text(fixed)} to a static size (torch.export specialized it); "
                      "the converted model takes only the example's size there", stacklevel=3)
    return Captured(ep, state_aliases(module), extra, mode, train, *_static_inputs(args, kwargs, extra),
                    _arg_names(module, len(args)))


def _exported(module, args, kwargs, **options):
    """torch.export.export, without the partial graph torch prints to stderr when an attempt fails: capture
    expects failures (strict before non-strict, checks stepped over one by one) and reports them itself.
    What a successful attempt prints is passed on."""
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        ep = torch.export.export(module, args, kwargs, **options)
    sys.stderr.write(printed.getvalue())
    return ep


_DERIVATIVES = re.compile(r"\b(jacrev|jacfwd|hessian|vjp|jvp|grad_and_value|func\.grad|autograd\.grad)\s*\(")


def _takes_derivatives(module: torch.nn.Module) -> bool:
    """Whether a forward in the module tree calls a derivative transform (read from its source)."""
    for m in module.modules():
        try:
            src = inspect.getsource(type(m).forward)
        except (OSError, TypeError):
            continue
        if _DERIVATIVES.search(src):
            return True
    return False


def _arg_names(module: torch.nn.Module, n: int) -> tuple:
    """The names forward gives its first n positional parameters (none past a *args)."""
    names = []
    for p in inspect.signature(module.forward).parameters.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or len(names) == n:
            break
        names.append(p.name)
    return tuple(names) if len(names) == n else ()


def _static_inputs(args: tuple, kwargs: dict, extra: dict) -> tuple[dict, tuple]:
    """The example inputs without tensors: kwargs by name, and positional args after the last with a tensor."""
    def static(v):
        return not any(isinstance(x, torch.Tensor) for x in torch.utils._pytree.tree_leaves(v))
    n = max((i + 1 for i, a in enumerate(args) if not static(a)), default=0)
    return {k: v for k, v in kwargs.items() if k not in extra and static(v)}, tuple(args[n:])


_CHECKS = "assuming checks"
# integer inputs that are data, not sizes: never suggested as static
_TOKEN_INPUTS = {"input_ids", "attention_mask", "token_type_ids", "position_ids", "labels", "decoder_input_ids",
                 "decoder_attention_mask", "cache_position", "mm_token_type_ids"}
_MODE_NAMES = {True: "strict", False: "non-strict", _CHECKS: _CHECKS}

_INLINED = ("strict export inlined a custom torch.autograd.Function's forward: JAX will differentiate that forward "
            "instead of the Function's backward")


def _decomposed(ep):
    _detach_no_grad_inputs(ep.graph_module)
    read_masked_targets(ep.graph_module)
    try:
        ep = ep.run_decompositions(decomposition_table())
    except Exception as e:   # an op kept whole whose shape rule guards on a data-dependent size (x[mask])
        readers = selected_rows.readers(ep.graph)
        if "data-dependent" not in str(e).lower() or not readers:
            raise
        ep = ep.run_decompositions(decomposition_table(readers))
    rejoin_splits(ep.graph_module)   # feats.split(counts.tolist()) concatenated back: a view of feats
    return ep

"""Custom `torch.autograd.Function`s keep their own backward.

torch.export records only a Function's forward, so JAX would differentiate that forward: a
straight-through estimator (`round` forward, identity backward) would get zero gradients, a gradient
reversal layer the unreversed ones. While capturing, `Function.apply` of every user Function with its own
backward becomes one `bridge::autograd_function` node; its lowering (converters/ops/custom_grad.py) is a
`jax.custom_vjp` whose forward and backward are the Function's own `forward` and `backward`, traced to
ATen with make_fx at the shapes JAX runs them and evaluated with the same lowerings.

Example:
    >>> with recording_functions():            # around torch.export (non-strict)
    ...     ep = torch.export.export(model, args, strict=False)
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import warnings
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing
from torch.overrides import TorchFunctionMode

_CALLS: dict[int, "Call"] = {}        # call id -> what the node needs to trace forward/backward again
_IDS = itertools.count()
_ORIGINAL_APPLY = torch.autograd.Function.apply.__func__


@dataclasses.dataclass
class Call:
    cls: type                          # the autograd.Function subclass
    template: tuple                    # apply's arguments, tensors replaced by _Slot(i)
    single: bool = True                # forward returned one tensor (else a tuple)


@dataclasses.dataclass(frozen=True)
class _Slot:
    index: int


class Ctx:
    """What forward/backward see as `ctx`: saved tensors, attributes, needs_input_grad."""

    def __init__(self, needs_input_grad=()):
        self.needs_input_grad = tuple(needs_input_grad)
        self.saved_tensors: tuple = ()
        self.materialize_grads = True

    def save_for_backward(self, *tensors):
        self.saved_tensors = tuple(tensors)

    def save_for_forward(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass

    def mark_dirty(self, *tensors):
        pass

    def set_materialize_grads(self, value: bool):
        self.materialize_grads = value


def _own_backward(cls) -> bool:
    """A Function whose gradient is its own backward (torch's internal Functions are left inlined)."""
    base = torch.autograd.Function
    return (getattr(cls, "backward", None) is not getattr(base, "backward", None)
            or getattr(cls, "vjp", None) is not getattr(base, "vjp", None)) \
        and not cls.__module__.startswith("torch.")


def _uses_setup_context(cls) -> bool:
    return cls.setup_context is not torch.autograd.function._SingleLevelFunction.setup_context


def rebuild(template: tuple, tensors) -> list:
    return [tensors[a.index] if isinstance(a, _Slot) else a for a in template]


def run_forward(call: Call, tensors, ctx: Ctx):
    """The Function's forward on `tensors` (its other arguments as recorded), filling `ctx`."""
    args = rebuild(call.template, tensors)
    if _uses_setup_context(call.cls):
        out = call.cls.forward(*args)
        call.cls.setup_context(ctx, tuple(args), out)
        return out
    return call.cls.forward(ctx, *args)


def _outputs(call: Call, tensors) -> list[torch.Tensor]:
    with torch.no_grad(), _inside():   # Functions this forward calls are part of it (inlined)
        out = run_forward(call, tensors, Ctx([False] * len(tensors)))
    call.single = isinstance(out, torch.Tensor)
    return [out] if call.single else list(out)


@torch.library.custom_op("bridge::autograd_function", mutates_args=())
def autograd_function(call_id: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A captured Function call: its outputs (copies, never aliases of the inputs)."""
    return [o.clone() for o in _outputs(_CALLS[call_id], tensors)]


@autograd_function.register_fake
def _(call_id, tensors):
    return [torch.empty_like(o) for o in _outputs(_CALLS[call_id], tensors)]


_STATE = threading.local()


@contextlib.contextmanager
def _inside():
    depth = getattr(_STATE, "depth", 0)
    _STATE.depth = depth + 1
    try:
        yield
    finally:
        _STATE.depth = depth


class _OutsideReads(TorchFunctionMode):
    """Trainable tensors a Function's forward reads that are neither its arguments nor made inside it."""

    def __init__(self, own):
        super().__init__()
        self.known = {id(t): t for t in own}    # values kept: ids stay unique while recording
        self.outside: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.requires_grad and id(t) not in self.known:
                self.outside[id(t)] = t
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.known[id(t)] = t
        return out


class _GradModeKept(TorchFunctionMode):
    """Grad mode switches inside are dropped (a recomputing Function's forward runs under no_grad)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch._C._set_grad_enabled:
            return None
        return func(*args, **(kwargs or {}))


def _outside_reads(call: Call, tensors) -> list[torch.Tensor]:
    """Run the forward once, untraced (a draw or an in-place update must not reach the program twice)."""
    reads = _OutsideReads(tensors)
    with disable_proxy_modes_tracing(), torch.no_grad(), _inside(), reads:
        run_forward(call, tensors, Ctx([False] * len(tensors)))
    return list(reads.outside.values())


def _names(template: tuple, found: list[torch.Tensor]) -> str:
    """`block.0.weight`-style names of `found` where a module among the arguments owns them, else shapes."""
    owners = [a for a in template if isinstance(a, torch.nn.Module)]
    owners += [a.__self__ for a in template if isinstance(getattr(a, "__self__", None), torch.nn.Module)]
    names = {id(p): n for m in owners for n, p in m.named_parameters()}
    shown = [names.get(id(t), f"a {tuple(t.shape)} tensor") for t in found]
    return ", ".join(shown[:4]) + (f" and {len(shown) - 4} more" if len(shown) > 4 else "")


def _apply(cls, *args, **kwargs):
    if kwargs or getattr(_STATE, "depth", 0):
        return _ORIGINAL_APPLY(cls, *args, **kwargs)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    slots = iter(range(len(tensors)))
    template = tuple(_Slot(next(slots)) if isinstance(a, torch.Tensor) else a for a in args)
    call = Call(cls, template)
    outside = _outside_reads(call, tensors)
    if outside:   # gradient checkpointing / reversible layers over a module: their backward feeds .grad
        if not cls.__module__.startswith("torch."):   # torch's own (reentrant checkpoint) is recomputation
            warnings.warn(f"autograd.Function {cls.__qualname__} reads trainable tensors that are not its "
                          f"arguments ({_names(template, outside)}); its backward cannot hand their gradients to "
                          f"JAX, so JAX differentiates its forward instead (exact for recomputation and reversible "
                          f"layers; a custom gradient it defines is not kept)", stacklevel=2)
        with _GradModeKept():   # its forward, differentiable: not the no-grad region apply would record
            return run_forward(call, tensors, Ctx([t.requires_grad for t in tensors]))
    if not _own_backward(cls):
        return _ORIGINAL_APPLY(cls, *args, **kwargs)
    outs = torch.ops.bridge.autograd_function(register_call(call), tensors)
    return outs[0] if call.single else tuple(outs)


_HOOKS: dict[int, Any] = {}   # hook id -> a gradient hook forward registered on an intermediate tensor


@torch.library.custom_op("bridge::grad_hook", mutates_args=())
def grad_hook(x: torch.Tensor, hook_id: int) -> torch.Tensor:
    """Identity forward; its lowering runs the hook on the gradient (Tensor.register_hook's semantics)."""
    return x.clone()


@grad_hook.register_fake
def _(x, hook_id):
    return torch.empty_like(x)


def _hooking(original):
    def register_hook(self, hook):
        """An intermediate's later uses read grad_hook(self): its gradient passes through `hook`."""
        if self.is_leaf or getattr(_STATE, "depth", 0):   # parameters and inputs are not graph values
            return original(self, hook)
        hook_id = next(_IDS)
        _HOOKS[hook_id] = hook
        self.copy_(torch.ops.bridge.grad_hook(self, hook_id))
        return _Handle(hook_id)
    return register_hook


class _Handle:
    """What register_hook returns; removing it during capture makes the hook a no-op."""

    def __init__(self, hook_id: int):
        self.hook_id = hook_id

    def remove(self):
        _HOOKS[self.hook_id] = lambda g: None


def hook(hook_id: int):
    return _HOOKS[hook_id]


@contextlib.contextmanager
def recording_functions():
    """Route user Functions' `apply` through `bridge::autograd_function`, and gradient hooks forward
    registers on intermediate tensors through `bridge::grad_hook`, while this is active."""
    previous = torch.autograd.Function.__dict__["apply"]   # the classmethod itself, not a bound method
    previous_hook = torch.Tensor.register_hook
    torch.autograd.Function.apply = classmethod(_apply)
    torch.Tensor.register_hook = _hooking(previous_hook)
    try:
        yield
    finally:
        torch.autograd.Function.apply = previous
        torch.Tensor.register_hook = previous_hook


def inlined_functions(graph_module: torch.fx.GraphModule) -> bool:
    """Whether a strict (dynamo) export inlined a custom Function's forward (its backward is then lost)."""
    from converters.interpreter import _call_nodes
    return any(any(entry[0] == "autograd.function" for entry in n.meta.get("source_fn_stack", ()) or ())
               for n in _call_nodes(graph_module.graph))


def call(call_id: int) -> Call:
    return _CALLS[call_id]


def register_call(call: Call) -> int:
    """A new id under which the lowering finds `call` (a custom op with its own autograd registers one too)."""
    call_id = next(_IDS)
    _CALLS[call_id] = call
    return call_id


def warn_backward_hooks(module: torch.nn.Module) -> None:
    """Module backward hooks change torch's gradients; torch.export drops them: say so, naming the modules."""
    from torch.nn.modules import module as nn_module
    owners = [f"module {name!r}" if name else type(module).__name__ for name, m in module.named_modules()
              if m._backward_hooks or m._backward_pre_hooks]
    owners += [f"parameter {name!r}" for name, p in module.named_parameters() if p._backward_hooks]
    if nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks:
        owners.append("(global nn.Module backward hooks)")
    if owners:
        warnings.warn(f"backward hooks on {', '.join(owners[:5])}{' ...' if len(owners) > 5 else ''}: torch.export "
                      "does not record them, so JAX gradients do not run them", stacklevel=4)


@contextlib.contextmanager
def collecting_hooks():
    """Collects the hooks forward registers with Tensor.register_hook while torch.export traces it."""
    original, seen = torch.Tensor.register_hook, []

    def record(self, hook):
        seen.append(hook)
        return original(self, hook)

    torch.Tensor.register_hook = record
    try:
        yield seen
    finally:
        torch.Tensor.register_hook = original


def warn_dropped_hooks(hooks: list) -> None:
    """The hooks forward registered that the captured program does not run (see collecting_hooks)."""
    if not hooks:
        return
    code = [h.__code__ for h in hooks if hasattr(h, "__code__") and "/torch/" not in h.__code__.co_filename]
    where = ", ".join(sorted({f"{c.co_filename}:{c.co_firstlineno}" for c in code}))
    warnings.warn(f"forward registers gradient hooks (Tensor.register_hook{' at ' + where if where else ''}) "
                  "on tensors the captured graph cannot hook (parameters, inputs, or a strict-only export), "
                  "so JAX gradients do not run them", stacklevel=4)

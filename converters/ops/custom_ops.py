"""A user's torch.library custom op (`@torch.library.custom_op("mylib::op")`) with no lowering of its own.

torch.export keeps such an op whole: its implementation is opaque to torch's tracer. bridge traces that Python
implementation (the CPU kernel where one is registered) to ATen ops with make_fx, at the shapes JAX runs it, and
evaluates it with the same lowerings. An op with `register_autograd` keeps its own backward: it is presented as a
`torch.autograd.Function` and lowered as one (a `jax.custom_vjp` of the traced forward and backward); without it,
JAX differentiates the implementation. An implementation that is not torch code (numpy, a compiled kernel) fails
naming the op, with the way out: `bridge.register_lowering("mylib::op")` and a JAX function.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import torch
from torch.utils import _pytree as pytree

from bridge.errors import LoweringError
from converters import autograd_functions as af
from converters.dtypes import torch_dtype
from converters.ops import custom_grad
from converters.registry import Lowering, fallback, lowering


def _opdef(target):
    """The torch.library CustomOpDef behind `target`, or None (ATen, bridge's own ops, anything else)."""
    schema = getattr(target, "_schema", None)
    if schema is None or not isinstance(target, torch._ops.OpOverload):
        return None
    from torch._library.custom_ops import OPDEFS
    return OPDEFS.get(schema.name)


def _implementation(opdef):
    return opdef._backend_fns.get("cpu") or opdef._init_fn


def _arguments(schema, args, kwargs) -> tuple[list, dict]:
    """The op's positional and keyword-only arguments, defaults filled in (what its implementation and
    setup_context see, as torch calls them)."""
    positional, keyword = list(args), {}
    for a in schema.arguments[len(args):]:
        value = kwargs[a.name] if a.name in kwargs else a.default_value
        if a.kwarg_only:
            keyword[a.name] = value
        else:
            positional.append(value)
    return positional, keyword


def _function(opdef, spec):
    """The op as an autograd.Function of its flat argument leaves (tensors and constants), with the backward
    `register_autograd` gave it: one gradient per leaf, a list argument's gradients spread over its tensors."""
    impl = _implementation(opdef)
    positional, keyword = pytree.tree_unflatten([None] * spec.num_leaves, spec)

    class CustomOp(torch.autograd.Function):
        @staticmethod
        def forward(*leaves):
            args, kwargs = pytree.tree_unflatten(list(leaves), spec)
            return impl(*args, **kwargs)

        @staticmethod
        def setup_context(ctx, inputs, output):
            if opdef._setup_context_fn is None:
                return
            args, kwargs = pytree.tree_unflatten(list(inputs), spec)
            extra = {"keyword_only_inputs": kwargs} if keyword else {}
            opdef._setup_context_fn(ctx=ctx, inputs=tuple(args), output=output, **extra)

        @staticmethod
        def backward(ctx, *grads):
            per_arg = opdef._backward_fn(ctx, *grads)   # one per positional argument
            per_arg = [per_arg] if isinstance(per_arg, torch.Tensor) or per_arg is None else list(per_arg)
            per_leaf = []
            for arg, g in zip(positional, per_arg):
                if isinstance(arg, (list, tuple)):
                    per_leaf.extend([None] * len(arg) if g is None else g)
                else:
                    per_leaf.append(g)
            return tuple(per_leaf) + (None,) * len(pytree.tree_leaves(keyword))

    CustomOp.__qualname__ = f"custom op {opdef._namespace}::{opdef._name}"
    return CustomOp


@functools.lru_cache(maxsize=None)
def _call_id(target, spec, constants: tuple) -> int:
    """One recorded Function call per op, argument structure and constant arguments (cached, so a retrace
    reuses the traced forward/backward)."""
    opdef = _opdef(target)
    template = tuple(af._Slot(c[1]) if c[0] == "tensor" else c[1] for c in constants)
    return af.register_call(af.Call(_function(opdef, spec), template, single=False))


@functools.lru_cache(maxsize=None)
def _forward_graph(target, spec, constants: tuple, specs: tuple, mutated: tuple = ()) -> torch.fx.GraphModule:
    """The implementation on the tensor leaves: its outputs, then the new values of the `mutated` tensors
    (indices among the tensors; the implementation writes into copies of them)."""
    from converters.capture import decomposition_table
    impl = _implementation(_opdef(target))

    def run(*tensors):
        tensors = [t.clone() if i in mutated else t for i, t in enumerate(tensors)]
        it = iter(tensors)
        leaves = [next(it) if c[0] == "tensor" else c[1] for c in constants]
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        out = impl(*args, **kwargs)
        outs = [] if out is None else [out] if isinstance(out, torch.Tensor) else list(out)
        return [*outs, *(tensors[i] for i in mutated)]

    examples = [torch.zeros(shape, dtype=torch_dtype(dtype)) for shape, dtype in specs]
    return custom_grad._traced(run, examples, decomposition_table())


def _leaves(target, args, kwargs):
    leaves, spec = pytree.tree_flatten(_arguments(target._schema, args, kwargs))
    tensors = [x for x in leaves if isinstance(x, jax.Array)]
    slots = iter(range(len(tensors)))
    constants = tuple(("tensor", next(slots)) if isinstance(x, jax.Array) else ("const", x) for x in leaves)
    return tensors, spec, constants


def _lower(target, *args, **kwargs):
    opdef = _opdef(target)
    tensors, spec, constants = _leaves(target, args, kwargs)
    single = len(target._schema.returns) == 1 and str(target._schema.returns[0].type) == "Tensor"
    name = f"{opdef._namespace}::{opdef._name}"
    try:
        if opdef._backward_fn is not None:
            outs = custom_grad.autograd_function(_call_id(target, spec, constants), tensors)
        else:
            specs = tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in tensors)
            from converters.interpreter import run_graph   # the interpreter imports every op family
            outs = run_graph(_forward_graph(target, spec, constants, specs), tensors)
    except LoweringError as e:   # its forward or backward, traced as a Function's
        raise LoweringError(f"{e}{_HINT.format(name=name)}") from e
    except Exception as e:   # make_fx could not trace the implementation (numpy, a compiled kernel, ...)
        raise LoweringError(f"custom op {name}: its implementation could not be traced to torch ops "
                            f"({type(e).__name__}: {e}){_HINT.format(name=name)}") from e
    return outs[0] if single else tuple(outs)


_HINT = ("\nhint: give bridge a JAX implementation: @bridge.register_lowering({name!r}) on a function of the op's "
         "arguments (tensors arrive as jax.Arrays)")


def _mutable_args(schema) -> list[str]:
    return [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]


def _view_of(kwargs: dict, name: str):
    """auto_functionalized_v2's record of which base (and which part of it) the argument `name` is."""
    index = kwargs.pop(f"_{name}_base_index")
    kwargs.pop(f"_{name}_alias", None)
    if f"_{name}_slice_dim" in kwargs:
        return index, tuple(kwargs.pop(f"_{name}_slice_{k}") for k in ("dim", "start", "end"))
    if f"_{name}_storage_offset" in kwargs:
        raise LoweringError(f"auto_functionalized: the argument {name!r} of a mutating custom op is a strided view "
                            "of another tensor; pass it a whole tensor or a slice")
    return index, None


@lowering(torch.ops.higher_order.auto_functionalized_v2)
def auto_functionalized_v2(op, _only_clone_these_bases=None, **kwargs):
    """A custom op that writes into its arguments (`mutates_args`), made functional by torch.export: the
    implementation runs on copies of the bases it writes; returns (its outputs, every base's new value)."""
    if _opdef(op) is None:
        raise LoweringError(f"auto_functionalized: {op} is not a torch.library custom op")
    bases = list(kwargs.pop("_all_bases", []))
    views = {}
    for name in _mutable_args(op._schema):
        index, part = _view_of(kwargs, name)
        views[name] = (index, part)
        if index is None:
            kwargs[name] = None
            continue
        base = bases[index]
        if part is not None:
            dim, start, end = part
            dim = dim % base.ndim
            start, end, _ = slice(start, end).indices(base.shape[dim])
            views[name] = (index, (dim, start))
            base = jax.lax.slice_in_dim(base, start, end, axis=dim)
        kwargs[name] = base
    outs, written = _run_mutating(op, kwargs, [n for n, v in views.items() if v[0] is not None])
    for name, new in written.items():
        index, part = views[name]
        bases[index] = new if part is None else jax.lax.dynamic_update_slice_in_dim(bases[index], new, part[1],
                                                                                    axis=part[0])
    return (*(outs or [None]), *bases)


@lowering(torch.ops.higher_order.auto_functionalized)
def auto_functionalized(op, _only_clone_these_tensors=None, **kwargs):
    names = [n for n in _mutable_args(op._schema) if kwargs.get(n) is not None]
    outs, written = _run_mutating(op, kwargs, names)
    return (*(outs or [None]), *(written.get(n) for n in _mutable_args(op._schema)))


class _Written:
    def __init__(self, name: str):
        self.name = name


def _run_mutating(op, kwargs: dict, names: list[str]) -> tuple[list, dict]:
    """The op's implementation on `kwargs`, writing into copies of the arguments `names`: (outputs, new values)."""
    tensors, spec, constants = _leaves(op, (), kwargs)
    # which tensor leaves are the written arguments: the same flattening with markers in their places
    marked = pytree.tree_leaves(_arguments(op._schema, (), {**kwargs, **{n: _Written(n) for n in names}}))
    slots = [c[1] if c[0] == "tensor" else None for c in constants]
    written_by = {slots[i]: m.name for i, m in enumerate(marked) if isinstance(m, _Written)}
    mutated = tuple(sorted(written_by))
    specs = tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in tensors)
    from converters.interpreter import run_graph   # the interpreter imports every op family
    try:
        res = run_graph(_forward_graph(op, spec, constants, specs, mutated), tensors)
    except Exception as e:
        name = f"{op._schema.name}"
        raise LoweringError(f"custom op {name} (writes into {', '.join(names)}): its implementation could not be "
                            f"traced to torch ops ({type(e).__name__}: {e}){_HINT.format(name=name)}") from e
    n_out = len(res) - len(mutated)
    return list(res[:n_out]), {written_by[i]: v for i, v in zip(mutated, res[n_out:])}


@fallback
def custom_op(target) -> Lowering | None:
    opdef = _opdef(target)
    return None if opdef is None else Lowering(functools.partial(_lower, target), False, __name__)

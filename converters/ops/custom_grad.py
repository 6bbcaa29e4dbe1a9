"""`bridge::autograd_function`: a user `torch.autograd.Function` as a `jax.custom_vjp`; `bridge::grad_hook`:
a gradient hook forward registered on an intermediate tensor, the same way.

The Function's `forward` (with what it saves on ctx) and its `backward` are traced to ATen by make_fx at
the shapes and dtypes JAX runs them with (cached per call site and signature), then evaluated with the
same lowerings as the rest of the program; see converters/autograd_functions.py for the capture side.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from bridge.errors import LoweringError
from converters import autograd_functions as af
from converters.dtypes import torch_dtype
from converters.registry import lowering

_CTX_FIELDS = ("needs_input_grad", "saved_tensors", "materialize_grads")


@dataclasses.dataclass
class _Traced:
    forward: torch.fx.GraphModule      # tensors -> outputs + saved tensors + tensor attributes of ctx
    backward: torch.fx.GraphModule     # saved + tensor attributes + output grads -> input grads
    n_out: int
    float_out: list[bool]              # outputs that take a gradient
    grad_none: list[bool]              # backward returned None for this tensor input


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _graph_outputs(gm: torch.fx.GraphModule) -> list:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    return [n.meta["val"] for n in out]


def _traced(fn, examples, table) -> torch.fx.GraphModule:
    """make_fx of `fn`, with in-place ops on its own tensors made functional (a Function's
    `out.masked_fill_(mask, 0)`, a hook's `g.mul_(0.5)`): the graph then holds only ops with lowerings. The
    ATen graph is functionalized, not `fn`: functorch transforms refuse Functions nested in `fn`."""
    gm = make_fx(fn, decomposition_table=table, tracing_mode="fake")(*examples)
    if not any(isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
               for n in gm.graph.nodes if n.op == "call_function"):
        return gm
    functional = torch.func.functionalize(gm, remove="mutations_and_views")
    return make_fx(functional, decomposition_table=table, tracing_mode="fake")(*examples)


@functools.lru_cache(maxsize=None)
def _trace(call_id: int, specs: tuple) -> _Traced:
    from converters.capture import decomposition_table
    call = af.call(call_id)
    examples = [torch.zeros(shape, dtype=torch_dtype(dtype)) for shape, dtype in specs]
    needs = [_is_float(t.dtype) for t in examples]
    seen: dict = {}

    def forward(*tensors):
        ctx = af.Ctx(needs)
        out = af.run_forward(call, list(tensors), ctx)
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        extra = {k: v for k, v in vars(ctx).items() if k not in _CTX_FIELDS}
        seen.update(n_out=len(outs), saved_none=[t is None for t in ctx.saved_tensors],
                    tensor_attrs=[k for k, v in extra.items() if isinstance(v, torch.Tensor)],
                    attrs={k: v for k, v in extra.items() if not isinstance(v, torch.Tensor)})
        saved = [t for t in ctx.saved_tensors if t is not None]
        return [*outs, *saved, *(extra[k] for k in seen["tensor_attrs"])]

    table = decomposition_table()
    fwd = _traced(forward, examples, table)
    vals = _graph_outputs(fwd)
    n_out, n_saved = seen["n_out"], seen["saved_none"].count(False)
    outs, saved, tattrs = vals[:n_out], vals[n_out:n_out + n_saved], vals[n_out + n_saved:]
    float_out = [_is_float(o.dtype) for o in outs]
    grad_none: list[bool] = []

    def backward(*flat):
        it = iter(flat)
        ctx = af.Ctx(needs)
        kept = [next(it) for _ in range(n_saved)]
        ctx.saved_tensors = tuple(None if none else kept.pop(0) for none in seen["saved_none"])
        for k in seen["tensor_attrs"]:
            setattr(ctx, k, next(it))
        for k, v in seen["attrs"].items():
            setattr(ctx, k, v)
        grads_out = [next(it) if f else None for f in float_out]
        grads = call.cls.backward(ctx, *grads_out)
        grads = [grads] if isinstance(grads, torch.Tensor) or grads is None else list(grads)
        per_tensor = [g for g, a in zip(grads, call.template) if isinstance(a, af._Slot)]
        grad_none[:] = [g is None for g in per_tensor]
        return [g for g in per_tensor if g is not None]

    like = lambda v: torch.zeros(v.shape, dtype=v.dtype)  # noqa: E731
    bwd_examples = [like(v) for v in [*saved, *tattrs]] + [like(o) for o, f in zip(outs, float_out) if f]
    bwd = _traced(backward, bwd_examples, table)
    return _Traced(fwd, bwd, n_out, float_out, grad_none)


def _sum_to(g, shape: tuple):
    """A backward's gradient for an input of `shape`, as torch's engine takes it: summed over the dims it
    broadcast the input along (leading ones, and size-1 dims of the input), or broadcast to the shape."""
    lead = g.ndim - len(shape)
    if lead > 0:
        g = g.sum(axis=tuple(range(lead)))
    dims = tuple(i for i, (n, m) in enumerate(zip(shape, g.shape)) if n == 1 and m != 1) if g.ndim == len(shape) else ()
    if dims:
        g = g.sum(axis=dims, keepdims=True)
    return jnp.broadcast_to(g, shape)


def _run(gm, inputs):
    from converters.interpreter import run_graph   # the interpreter imports every op family
    return run_graph(gm, inputs)


@lowering(torch.ops.bridge.autograd_function.default)
def autograd_function(call_id, tensors):
    tensors = list(tensors)
    specs = tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in tensors)
    try:
        tr = _trace(call_id, specs)
    except Exception as e:   # make_fx could not trace the Function's forward/backward at these shapes
        name = af.call(call_id).cls.__qualname__
        raise LoweringError(f"autograd.Function {name}: tracing its forward/backward failed "
                            f"({type(e).__name__}: {e})") from e

    @jax.custom_vjp
    def fn(*xs):
        return tuple(_run(tr.forward, list(xs))[:tr.n_out])

    def fwd(*xs):
        res = _run(tr.forward, list(xs))
        return tuple(res[:tr.n_out]), (tuple(res[tr.n_out:]), xs)

    def bwd(residual, cts):
        saved, xs = residual
        grads = iter(_run(tr.backward, [*saved, *(c for c, f in zip(cts, tr.float_out) if f)]))
        out = []
        for x, none in zip(xs, tr.grad_none):
            if not jnp.issubdtype(x.dtype, jnp.inexact):
                out.append(np.zeros(x.shape, jax.dtypes.float0))
            elif none:
                out.append(jnp.zeros_like(x))
            else:
                out.append(_sum_to(next(grads), x.shape).astype(x.dtype))
        return tuple(out)

    fn.defvjp(fwd, bwd)
    return list(fn(*tensors))


@functools.lru_cache(maxsize=None)
def _trace_hook(hook_id: int, shape: tuple, dtype) -> torch.fx.GraphModule:
    from converters.capture import decomposition_table
    user_hook = af.hook(hook_id)

    def run(g):
        out = user_hook(g)
        return [g if out is None else out]

    return _traced(run, [torch.zeros(shape, dtype=torch_dtype(dtype))], decomposition_table())


@lowering(torch.ops.bridge.grad_hook.default)
def grad_hook(x, hook_id):
    """Identity whose gradient is the hook's result on it, as Tensor.register_hook gives torch."""
    @jax.custom_vjp
    def fn(v):
        return v

    def bwd(_, g):
        gm = _trace_hook(hook_id, tuple(g.shape), jnp.dtype(g.dtype))
        return (jnp.broadcast_to(_run(gm, [g])[0], g.shape).astype(g.dtype),)

    fn.defvjp(lambda v: (v, None), bwd)
    return fn(x)

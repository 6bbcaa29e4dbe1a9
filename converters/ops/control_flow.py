"""Control flow torch.export keeps as higher-order ops: torch.cond, torch.while_loop, scan and map, and
`torch.compiler.nested_compile_region` calls (invoke_subgraph).

Branches and bodies arrive as FX subgraphs, evaluated with the same lowerings (`interpreter.run_graph`) inside
`lax.cond` / `lax.while_loop` / `lax.scan`. A subgraph that draws random numbers makes the op take a PRNG key,
folded with the iteration index in loops so every step draws afresh.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import torch
from jax import lax
from jax.custom_derivatives import linear_call

from bridge.errors import LoweringError
from converters.registry import draws_random, lowering

hop = torch.ops.higher_order
aten = torch.ops.aten


def _run(gm, inputs, key=None):
    from converters.interpreter import run_graph   # the interpreter imports every op family
    return run_graph(gm, inputs, key)


def _subgraphs_draw(node) -> bool:
    """Whether any subgraph passed to this node (recursively) has a node that draws random numbers."""
    from converters.interpreter import _attr, _call_nodes
    owner = node.graph.owning_module
    subs = [_attr(owner, a.target) for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
    return any(draws_random(n) for gm in subs for n in _call_nodes(gm.graph))


def _key(key, i):
    return None if key is None else jax.random.fold_in(key, i)


@lowering(hop.cond, random=_subgraphs_draw)
def cond(key, pred, true_fn, false_fn, operands):
    operands = list(operands)
    if not hasattr(pred, "shape") or not isinstance(pred, jax.core.Tracer):   # known now: one branch
        return _run(true_fn if bool(pred) else false_fn, operands, key)
    return lax.cond(pred.reshape(()).astype(jnp.bool_), lambda ops: _run(true_fn, ops, key),
                    lambda ops: _run(false_fn, ops, key), operands)


@lowering(hop.while_loop, random=_subgraphs_draw)
def while_loop(key, cond_fn, body_fn, carried_inputs, additional_inputs):
    """A trip count known while tracing (the loop's test reads only a counter and bounds that are constants or
    static shapes: `i < 3`, `i < x.shape[0]`) runs as a `lax.scan` of that length, which reverse mode
    differentiates as torch autograd does. Otherwise the count is data and the loop is a `lax.while_loop`:
    forward and forward-mode only, and jax.grad through it raises an error naming torch.while_loop and the
    user's line."""
    carry, extra = list(carried_inputs), list(additional_inputs)

    def body(i, c):
        out = _run(body_fn, [*c, *extra], _key(key, i))
        return [o.astype(x.dtype) for o, x in zip(out, c)]

    trips = _static_trip_count(cond_fn, body_fn, carry, extra)
    if trips is not None:
        return tuple(lax.scan(lambda c, i: (body(i, c), None), carry, jnp.arange(trips, dtype=jnp.int32))[0])

    def test(c):
        return _run(cond_fn, [*c[1], *extra])[0].reshape(()).astype(jnp.bool_)

    out = lax.while_loop(test, lambda c: (c[0] + 1, body(*c)), (jnp.zeros((), jnp.int32), carry))[1]
    where = _source(body_fn) or _source(cond_fn)
    return tuple(_no_reverse_mode(o, where) for o in out)


_MAX_STATIC_TRIPS = 10_000   # a longer loop is counted no further while tracing (and stays a lax.while_loop)
_FOLDED = 64                 # the most elements (all together) of the values the loop's test reads, to count it


def _static_trip_count(cond_fn, body_fn, carry, extra) -> int | None:
    """How many times the loop runs, when its test depends (through the body) only on small values known while
    tracing: those carried values are iterated alone, eagerly, until the test fails. None otherwise."""
    n = len(carry)
    body_deps, read = _deps(body_fn), _deps(cond_fn)[0]
    while read is not None:   # carried values the test reads, directly or through the body's updates of them
        more = [body_deps[k] for k in read if k < n]
        if any(d is None for d in more):
            return None
        if read.issuperset(set().union(*more)):
            break
        read = read.union(*more)
    if read is None:
        return None
    values = [*carry, *extra]
    if any(isinstance(values[k], jax.core.Tracer) for k in read) or \
            sum(getattr(values[k], "size", 1) for k in read) > _FOLDED:   # counters and bounds, not data
        return None
    loop = sorted(k for k in read if k < n)
    state = list(values)   # the others are read for their shapes only (static, as every carry's is)
    try:
        with jax.ensure_compile_time_eval():
            for trips in range(_MAX_STATIC_TRIPS + 1):
                go = _run_part(cond_fn, state, [0])[0]
                if isinstance(go, jax.core.Tracer):
                    return None
                if not bool(jnp.asarray(go).reshape(())):
                    return trips
                new = _run_part(body_fn, state, loop)
                for k, v in zip(loop, new):
                    state[k] = v.astype(values[k].dtype) if hasattr(v, "astype") and hasattr(values[k], "dtype") else v
    except Exception:   # not computable eagerly after all: the loop stays a lax.while_loop, which reports it
        return None
    return None


def _outputs(gm) -> list:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    return list(out) if isinstance(out, (list, tuple)) else [out]


_SHAPE_ONLY = (aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int)   # read no values


def _deps(gm) -> list[set[int] | None]:
    """Per output of `gm`: the indices of the placeholders whose values it depends on (not those whose shapes
    only it reads); None where a node on the way draws random numbers (not known while tracing)."""
    index = {n.name: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    deps: dict[str, set[int] | None] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            deps[n.name] = {index[n.name]}
        elif n.op == "call_function" and n.target in _SHAPE_ONLY:
            deps[n.name] = set()
        elif n.op in ("call_function", "get_attr"):
            ins = [deps[a.name] for a in n.all_input_nodes]
            deps[n.name] = None if (n.op == "call_function" and draws_random(n)) or any(d is None for d in ins) \
                else set().union(*ins)
    return [deps[o.name] if isinstance(o, torch.fx.Node) else set() for o in _outputs(gm)]


def _run_part(gm, inputs: list, outs: list[int]) -> list:
    """The outputs `outs` of subgraph `gm` given its `inputs`, evaluating only the nodes they need."""
    from converters.dtypes import to_jax
    from converters.interpreter import _attr, eval_node
    targets = [o for o in (_outputs(gm)[k] for k in outs) if isinstance(o, torch.fx.Node)]
    needed, todo = set(), list(targets)
    while todo:
        node = todo.pop()
        if node.name not in needed:
            needed.add(node.name)
            todo.extend(node.all_input_nodes)
    env = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n in gm.graph.nodes:
        if n.name not in needed:
            continue
        if n.op == "placeholder":
            env[n.name] = inputs[placeholders.index(n)]
        elif n.op == "get_attr":
            value = _attr(gm, n.target)
            env[n.name] = to_jax(value) if isinstance(value, torch.Tensor) else value
        elif n.op == "call_function":
            env[n.name] = eval_node(n, env, None)
    return [env[o.name] if isinstance(o, torch.fx.Node) else o for o in (_outputs(gm)[k] for k in outs)]


def _source(gm) -> str | None:
    """The user's line that made the subgraph's first op (the loop body or test), as 'file:line in fn: code'."""
    from converters.interpreter import source_line
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.meta.get("stack_trace"):
            line = source_line(n)
            if not line.startswith("<graph node"):
                return line
    return None


def _no_reverse_mode(x, where):
    """`x` unchanged, forward and in forward mode (jax.jvp, jax.jacfwd); transposing it (jax.grad, jax.vjp)
    raises an error naming the op and the user's line, before JAX's own for lax.while_loop."""
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.inexact):
        return x

    def transpose(_, ct):
        raise LoweringError(
            f"torch.while_loop{f' at {where}' if where else ''} has no reverse-mode gradient in JAX: its trip "
            "count is not known while JAX traces it (the loop's test reads values computed from the inputs, "
            "parameters or buffers; buffers and constants passed into jax.jit are traced too), and "
            "lax.while_loop cannot be reverse-differentiated. Forward mode (jax.jvp, jax.jacfwd) works; for "
            "jax.grad write the loop with a trip count known at conversion (a constant or a shape: "
            "`i < n`), or as torch's scan over a fixed length")

    @jax.custom_jvp
    def guard(x):
        return x

    @guard.defjvp
    def guard_jvp(primals, tangents):
        try:
            return primals[0], linear_call(lambda _, t: t, transpose, None, tangents[0])
        except NotImplementedError:   # tangents batched (jax.jacfwd, vmap inside grad): JAX's own error stands
            return primals[0], tangents[0]

    return guard(x)


@lowering(hop.scan, random=_subgraphs_draw)
def scan(key, combine_fn, init, xs, additional_inputs):
    """combine_fn(*carry, *x_t, *additional) -> [*carry, *y_t] along dim 0; returns [*final carry, *stacked ys]."""
    init, extra = list(init), list(additional_inputs)
    n = len(init)
    length = xs[0].shape[0] if xs else 0

    def step(carry, x):
        i, x = x
        out = _run(combine_fn, [*carry, *x, *extra], _key(key, i))
        return [o.astype(c.dtype) for o, c in zip(out[:n], carry)], out[n:]

    carry, ys = lax.scan(step, init, (jnp.arange(length), list(xs)), length=length)
    return [*carry, *ys]


@lowering(hop.map_impl, random=_subgraphs_draw)
def map_impl(key, body_fn, xs, additional_inputs):
    """body_fn(*x_t, *additional) for every slice along dim 0, stacked."""
    extra = list(additional_inputs)
    length = xs[0].shape[0]
    return list(lax.map(lambda a: _run(body_fn, [*a[1], *extra], _key(key, a[0])), (jnp.arange(length), list(xs))))


@lowering(hop.invoke_subgraph, random=_subgraphs_draw)
def invoke_subgraph(key, subgraph, identifier, *operands):
    """A `torch.compiler.nested_compile_region` function's call: its subgraph, inlined (XLA sees each call)."""
    return tuple(_run(subgraph, list(operands), key))

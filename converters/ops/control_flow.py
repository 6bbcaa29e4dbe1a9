"""Control flow torch.export keeps as higher-order ops: torch.cond, torch.while_loop, scan and map.

Branches and bodies arrive as FX subgraphs, evaluated with the same lowerings (`interpreter.run_graph`) inside
`lax.cond` / `lax.while_loop` / `lax.scan`. A subgraph that draws random numbers makes the op take a PRNG key,
folded with the iteration index in loops so every step draws afresh.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import torch
from jax import lax

from converters.registry import draws_random, lowering

hop = torch.ops.higher_order


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
    """Forward only, like lax.while_loop (the trip count is data-dependent)."""
    extra = list(additional_inputs)

    def test(c):
        return _run(cond_fn, [*c[1], *extra])[0].reshape(()).astype(jnp.bool_)

    def body(c):
        i, carry = c
        out = _run(body_fn, [*carry, *extra], _key(key, i))
        return i + 1, [o.astype(x.dtype) for o, x in zip(out, carry)]

    return tuple(lax.while_loop(test, body, (jnp.zeros((), jnp.int32), list(carried_inputs)))[1])


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

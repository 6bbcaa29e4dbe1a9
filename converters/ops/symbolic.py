"""Graph plumbing: tuple getitem, SymInt arithmetic (plain Python ints under jit), and asserts."""
from __future__ import annotations

import math
import operator

import jax
import jax.numpy as jnp
import torch

from converters.ops.common import aten
from converters.registry import lowering

for _fn in (operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
            operator.mod, operator.neg, operator.pow, operator.eq, operator.ne, operator.lt, operator.le,
            operator.gt, operator.ge, operator.and_, operator.or_, operator.abs,
            math.ceil, math.floor, math.sqrt, math.trunc):
    lowering(_fn)(_fn)


def _traced_or(fn, traced):
    """A Python builtin on sizes, or its jnp twin on a traced value (a count read from a mask, an .item())."""
    def lower(*xs):
        return traced(*xs) if any(isinstance(x, jax.Array) for x in xs) else fn(*xs)
    lower.__name__ = getattr(fn, "__name__", "sym")
    return lower


lowering(torch.sym_float)(_traced_or(float, lambda x: jnp.asarray(x, jnp.float32)))
lowering(torch.sym_int)(_traced_or(int, lambda x: jnp.trunc(x).astype(jnp.int32)))
lowering(torch.sym_max)(_traced_or(max, jnp.maximum))
lowering(torch.sym_min)(_traced_or(min, jnp.minimum))
lowering(torch.sym_sum)(sum)


@lowering(operator.not_, torch.sym_not)
def sym_not(x):
    """`not` of a Python bool, or of a value read from a tensor (traced under jit: no Python bool)."""
    return jnp.logical_not(x) if isinstance(x, jax.Array) else not x


@lowering(torch.sym_ite)
def sym_ite(cond, a, b):
    """`a if cond else b` on sizes; a condition read from a tensor is traced, so both are kept."""
    return jnp.where(cond, a, b) if isinstance(cond, jax.Array) else (a if cond else b)


@lowering(aten.sym_size.int)
def sym_size(x, dim):
    return x.shape[dim]


@lowering(aten.sym_numel.default)
def sym_numel(x):
    return math.prod(x.shape)


@lowering(aten.sym_stride.int)
def sym_stride(x, dim):
    return math.prod(x.shape[dim + 1:]) if dim >= 0 else math.prod(x.shape[x.ndim + dim + 1:])


@lowering(aten.sym_storage_offset.default)
def sym_storage_offset(x):
    return 0


@lowering(aten._assert_scalar.default, aten._assert_tensor_metadata.default, aten.sym_constrain_range.default,
          aten.sym_constrain_range_for_size.default, aten._assert_async.msg, aten._assert_async.default)
def no_op(*args, **kwargs):
    return None


@lowering(torch.ops.higher_order.with_effects)
def with_effects(token, op, *args, **kwargs):
    """An op ordered by an effect token (torch.export threads one through side-effecting ops): JAX
    programs are pure, so the token is dropped and the op's own lowering runs."""
    from converters.registry import lookup
    out = lookup(op).fn(*args, **kwargs)
    if out is None:
        return (None,)
    return (None, *out) if isinstance(out, (tuple, list)) else (None, out)


@lowering(aten._local_scalar_dense.default, aten.item.default)
def item(x):
    return x.reshape(())

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

lowering(torch.sym_float)(float)
lowering(torch.sym_int)(int)
lowering(torch.sym_max)(max)
lowering(torch.sym_min)(min)
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

"""View and layout ops: reshape, permute, expand, slice, cat, split, copies and casts."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import torch
from jax import lax

from bridge.errors import LoweringError
from converters.ops.common import astype, aten, dim_, dt, size_
from converters.registry import lowering


@lowering(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.view_copy.default)
def view(x, shape):
    return jnp.reshape(x, size_(shape))


@lowering(aten.view.dtype)
def view_dtype(x, dtype):
    if jnp.dtype(dt(dtype)).itemsize != x.dtype.itemsize:
        raise NotImplementedError(f"view as {dtype} changes the element size of {x.dtype}")
    return lax.bitcast_convert_type(x, dt(dtype))


@lowering(aten.permute.default, aten.permute_copy.default)
def permute(x, dims):
    return jnp.transpose(x, [dim_(d, x.ndim) for d in dims])


@lowering(aten.transpose.int)
def transpose(x, dim0, dim1):
    return jnp.swapaxes(x, dim_(dim0, x.ndim), dim_(dim1, x.ndim)) if x.ndim else x


@lowering(aten.t.default)
def t(x):
    return x.T


@lowering(aten.expand.default, aten.expand_copy.default)
def expand(x, shape, *, implicit=False):
    shape = list(size_(shape))
    lead = len(shape) - x.ndim
    for i in range(x.ndim):
        if shape[lead + i] == -1:
            shape[lead + i] = x.shape[i]
    return jnp.broadcast_to(x, shape)


@lowering(aten.unsqueeze.default, aten.unsqueeze_copy.default)
def unsqueeze(x, dim):
    return jnp.expand_dims(x, dim % (x.ndim + 1))


@lowering(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.squeeze_copy.dims)
def squeeze(x, dim=None):
    if dim is None:
        return jnp.squeeze(x)
    dims = [dim] if isinstance(dim, int) else dim
    return jnp.squeeze(x, tuple(d for d in {dim_(d, x.ndim) for d in dims} if x.ndim and x.shape[d] == 1))


@lowering(aten.slice.Tensor, aten.slice_copy.Tensor)
def slice_(x, dim=0, start=None, end=None, step=1):
    d = dim_(dim, x.ndim)
    lo, hi, _ = slice(start, end).indices(x.shape[d])
    return lax.slice_in_dim(x, lo, max(lo, hi), stride=step, axis=d)


@lowering(aten.select.int, aten.select_copy.int)
def select(x, dim, index):
    """x.select(dim, index); an index read from a tensor (`for e in torch.arange(E)[:, None]: w[e[0]]`) is
    traced under jit: a dynamic index."""
    d = dim_(dim, x.ndim)
    if isinstance(index, jax.core.Tracer):
        return lax.dynamic_index_in_dim(x, index % x.shape[d], axis=d, keepdims=False)
    return lax.index_in_dim(x, index % x.shape[d], axis=d, keepdims=False)


@lowering(aten.narrow.default)
def narrow(x, dim, start, length):
    d = dim_(dim, x.ndim)
    if isinstance(start, jax.core.Tracer):   # a start read from a tensor: a dynamic slice of static length
        return lax.dynamic_slice_in_dim(x, start % x.shape[d], length, axis=d)
    return lax.slice_in_dim(x, start % x.shape[d], start % x.shape[d] + length, axis=d)


@lowering(aten.split_with_sizes.default, aten.split_with_sizes_copy.default)
def split_with_sizes(x, sizes, dim=0):
    d = dim_(dim, x.ndim)
    if any(isinstance(s, jax.core.Tracer) for s in sizes):
        raise LoweringError("split sizes read from the data (`x.split(counts.tolist())`) make pieces of "
                            "data-dependent sizes, which jax.jit cannot hold; bridge supports pieces that are "
                            "computed on one by one and concatenated back in order, or returned (padded with zeros)")
    offsets, acc = [], 0
    for s in sizes[:-1]:
        acc += s
        offsets.append(acc)
    return jnp.split(x, offsets, axis=d)


def padded_pieces(x, sizes, d):
    """Split sizes read from the data under jit (`x.split(counts.tolist())`): a traced program has static
    shapes, so each piece holds x.shape[d] entries along d, its own first and zeros after (the convention of
    jnp.nonzero(size=...)). Where the sizes are known (outside jit) the pieces are torch's."""
    n = x.shape[d]
    pos = jnp.arange(n)
    start, pieces = 0, []
    for size in sizes:
        keep = (pos < size).reshape([n if i == d else 1 for i in range(x.ndim)])
        piece = jnp.take(x, jnp.clip(start + pos, 0, n - 1), axis=d)
        pieces.append(jnp.where(keep, piece, jnp.zeros((), x.dtype)))
        start = start + size
    return pieces


@lowering(aten.split.Tensor, aten.split_copy.Tensor)
def split(x, size, dim=0):
    d = dim_(dim, x.ndim)
    n = x.shape[d]
    return split_with_sizes(x, [min(size, n - i) for i in range(0, n, size)] or [0], d)


@lowering(aten.unbind.int)
def unbind(x, dim=0):
    d = dim_(dim, x.ndim)
    return [lax.index_in_dim(x, i, axis=d, keepdims=False) for i in range(x.shape[d])]


@lowering(aten.cat.default)
def cat(tensors, dim=0):
    tensors = [t for t in tensors if not (t.ndim == 1 and t.shape[0] == 0)] or tensors[:1]
    dtype = jnp.result_type(*tensors)
    return jnp.concatenate([t.astype(dtype) for t in tensors], axis=dim_(dim, tensors[0].ndim))


@lowering(aten.stack.default)
def stack(tensors, dim=0):
    return jnp.stack(tensors, axis=dim % (tensors[0].ndim + 1))


@lowering(aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default,
          aten.contiguous.default, aten.alias_copy.default)
def identity(x, *, memory_format=None):
    return x


@lowering(aten.detach.default, aten.detach_copy.default)
def detach(x):
    """`.detach()`: same values, and no gradient flows back through it (as in torch)."""
    return lax.stop_gradient(x)


@lowering(aten._to_copy.default)
def to_copy(x, *, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False, memory_format=None):
    return x if dtype is None else astype(x, dt(dtype))


@lowering(torch.ops.prims.convert_element_type.default)
def convert_element_type(x, dtype):
    return astype(x, dt(dtype))


@lowering(aten.to.dtype, aten.to.dtype_layout, aten.to.device)
def to(x, *args, dtype=None, **_):
    for a in args:
        if hasattr(a, "is_floating_point"):  # a torch.dtype positional
            dtype = a
    return x if dtype is None else astype(x, dt(dtype))


@lowering(aten.flip.default)
def flip(x, dims):
    return jnp.flip(x, [dim_(d, x.ndim) for d in dims])


@lowering(aten.roll.default)
def roll(x, shifts, dims=()):
    if not dims:
        return jnp.roll(x.reshape(-1), shifts).reshape(x.shape)
    return jnp.roll(x, shifts, [dim_(d, x.ndim) for d in dims])


@lowering(aten.repeat.default)
def repeat(x, repeats):
    x = x.reshape((1,) * (len(repeats) - x.ndim) + x.shape)
    return jnp.tile(x, repeats)


@lowering(aten.tril.default)
def tril(x, diagonal=0):
    return jnp.tril(x, diagonal)


@lowering(aten.triu.default)
def triu(x, diagonal=0):
    return jnp.triu(x, diagonal)


@lowering(aten.constant_pad_nd.default)
def constant_pad_nd(x, pad, value=0):
    cfg = [(0, 0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        cfg[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1], 0)
    return lax.pad(x, jnp.asarray(value, x.dtype), cfg)


@lowering(aten.flatten.using_ints)
def flatten(x, start_dim=0, end_dim=-1):
    if x.ndim == 0:
        return x.reshape(1)
    s, e = dim_(start_dim, x.ndim), dim_(end_dim, x.ndim)
    return x.reshape(x.shape[:s] + (-1,) + x.shape[e + 1:])


@lowering(aten.copy.default, aten.copy_.default)
def copy(x, src, non_blocking=False):
    """copy(self, src): src broadcast to self's shape, in self's dtype. copy_ reaches a lowering only as a
    functionalized subgraph's write-back into its own input (a gradient hook's `g.clamp_(...)`): its value."""
    return jnp.broadcast_to(src.astype(x.dtype), x.shape)


@lowering(aten.resize.default, aten.resize_.default)
def resize(x, size, *, memory_format=None):
    """The row-major elements of `x` in the new shape; torch leaves elements past the old end uninitialized
    (zeros here)."""
    size = size_(size)
    n = math.prod(size)
    flat = x.reshape(-1)[:n]
    return jnp.pad(flat, (0, n - flat.size)).reshape(size)


@lowering(aten.sym_is_contiguous.default)
def sym_is_contiguous(x, memory_format=None):
    """JAX arrays have no strides: every one is contiguous."""
    return True

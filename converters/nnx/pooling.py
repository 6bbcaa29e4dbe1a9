"""torch pooling modules as NNX modules on channels-last inputs (N, *spatial, C).

Windows, padding, `ceil_mode`, `count_include_pad`, `divisor_override` and the adaptive pools'
bin edges follow torch exactly; shapes are static, so everything works under jit and grad.
"""
from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax


def _out_size(n, k, s, p, d, ceil_mode) -> int:
    span = n + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= n + p:   # the last window must start inside the input or left pad
        out -= 1
    return out


def _pads(shape, k, s, p, d, ceil_mode):
    outs = [_out_size(n, *a, ceil_mode) for n, *a in zip(shape, k, s, p, d)]
    return outs, [(pi, max((o - 1) * si + di * (ki - 1) + 1 - n - pi, 0))
                  for n, o, ki, si, pi, di in zip(shape, outs, k, s, p, d)]


class _Pool(nnx.Module):
    def __init__(self, kernel_size, stride, padding, dilation=1, ceil_mode=False):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.ceil_mode = dilation, ceil_mode

    def _geometry(self, x):
        nd = x.ndim - 2
        k, s, p, d = (tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd
                      for v in (self.kernel_size, self.stride, self.padding, self.dilation))
        return (k, s, p, d, *_pads(x.shape[1:-1], k, s, p, d, self.ceil_mode))


class MaxPool(_Pool):
    """torch.nn.MaxPool{1,2,3}d (without return_indices)."""

    def __call__(self, x):
        k, s, _, d, outs, pads = self._geometry(x)
        init = jnp.array(-jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min, x.dtype)
        if all(di == 1 for di in d):
            return lax.reduce_window(x, init, lax.max, (1, *k, 1), (1, *s, 1), ((0, 0), *pads, (0, 0)))
        # JAX has no VJP for dilated reduce_window: take the max over one strided slice per window tap
        x = lax.pad(x, init, ((0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)))
        taps = []
        for offset in np.ndindex(*k):
            start = (0, *(o * di for o, di in zip(offset, d)), 0)
            limit = (x.shape[0], *(st + (o - 1) * si + 1 for st, o, si in zip(start[1:], outs, s)), x.shape[-1])
            taps.append(lax.slice(x, start, limit, (1, *s, 1)))
        return functools.reduce(jnp.maximum, taps)


class AvgPool(_Pool):
    """torch.nn.AvgPool{1,2,3}d: the divisor counts the left/right padding iff `count_include_pad`."""

    def __init__(self, kernel_size, stride, padding, ceil_mode=False, count_include_pad=True,
                 divisor_override=None):
        super().__init__(kernel_size, stride, padding, 1, ceil_mode)
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override

    def __call__(self, x):
        k, s, p, _, outs, pads = self._geometry(x)
        total = lax.reduce_window(x, jnp.array(0, x.dtype), lax.add, (1, *k, 1), (1, *s, 1),
                                  ((0, 0), *pads, (0, 0)))
        if self.divisor_override:
            return total / self.divisor_override
        counts = np.ones((), np.float64)
        for n, o, ki, si, pi in zip(x.shape[1:-1], outs, k, s, p):
            start = np.arange(o) * si - pi
            end = np.minimum(start + ki, n + pi)
            if not self.count_include_pad:
                start, end = np.maximum(start, 0), np.minimum(end, n)
            counts = np.multiply.outer(counts, end - start)
        return total / jnp.asarray(counts[None, ..., None], x.dtype)


class AdaptivePool(nnx.Module):
    """torch.nn.Adaptive{Avg,Max}Pool{1,2,3}d: bin i of n inputs → o outputs is [⌊i·n/o⌋, ⌈(i+1)·n/o⌉)."""

    def __init__(self, output_size, reduce: str):
        self.output_size, self.reduce = output_size, reduce

    def __call__(self, x):
        nd = x.ndim - 2
        sizes = self.output_size if isinstance(self.output_size, (tuple, list)) else (self.output_size,) * nd
        op = jnp.mean if self.reduce == "avg" else jnp.max
        for axis, o in enumerate(sizes, start=1):
            n = x.shape[axis]
            if o is None or o == n:
                continue
            if n % o == 0:
                x = op(x.reshape(x.shape[:axis] + (o, n // o) + x.shape[axis + 1:]), axis=axis + 1)
                continue
            bins = [op(lax.slice_in_dim(x, (i * n) // o, math.ceil((i + 1) * n / o), axis=axis),
                       axis=axis, keepdims=True) for i in range(o)]
            x = jnp.concatenate(bins, axis=axis)
        return x

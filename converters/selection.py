"""Evaluating the plan of converters.selected_rows for one run: the masks traced under jit, the rows they
select kept at full size, and what each planned node does with them (see that module's docstring).

Example:
    >>> rows = Selection(plan(program_nodes), placeholder_meta)
    >>> env[node.name] = rows.eval(node, env, key, eval_node)   # for each node in rows.rules
"""
from __future__ import annotations

import math
import warnings
from collections import ChainMap

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from bridge.errors import LoweringError
from converters.dtypes import jax_dtype
from converters.ops.shape import padded_pieces
from converters.selected_rows import (COUNTED, DROP, Rule, aten, bound_args, mask_node, row_dims,
                                      scale_of)


class Selection:
    """One run's masks, keyed by their row-count symbol, and the selected counts of size nodes. A mask that
    is a concrete array (eager, outside jit) selects as torch does: rows are compacted, nothing is filled."""

    def __init__(self, rules: dict[str, Rule], placeholders: dict | None = None):
        self.rules = rules
        self.placeholders = placeholders or {}   # placeholder name -> meta: binds size symbols to input sizes
        self.valid: dict = {}     # symbol -> (N,) bool, for masks traced under jit
        self.mask_of: dict = {}   # symbol -> name of the mask node
        self.counts: dict = {}    # size node name -> the count version of its value

    def eval(self, node, env: dict, key, eval_node):
        rule = self.rules[node.name]
        if rule.kind == "pieces":
            return self._pieces(node, env, rule, key, eval_node)
        if rule.kind == "segments":
            return self._segments(node, env, rule, key, eval_node)
        if rule.kind == "merge":
            return self._merge(node, env, rule, key, eval_node)
        if rule.kind == "pinned":
            return self._pinned(node, env, key, eval_node)
        if rule.kind == "source":
            return self._source(node, env, rule.symbol, key, eval_node)
        if rule.symbol not in self.valid:   # a concrete mask: torch's own semantics
            return eval_node(node, env, key)
        if rule.kind == "refuse":
            raise _refuse(node, rule.fill)
        if rule.kind == "size":   # both: the size for shapes (N), the count for arithmetic
            self.counts[node.name] = self._count_of(node, env, rule, key, eval_node)
            return eval_node(node, env, key)
        if rule.kind == "put":
            return self._put(node, env, rule.symbol)
        if rule.kind == "rank":   # the k-th selected row is numbered k (start + k); the others any number
            start = bound_args(node).get("start", 0)
            rank = jnp.cumsum(self.mask(rule.symbol), dtype=jnp.int32) - 1
            return (rank + (start if isinstance(start, (int, float)) else env[start.name])).astype(
                jax_dtype(node.meta["val"].dtype))
        env = self._counted(node, env)
        if rule.kind == "rows":
            return eval_node(node, env, key)
        if rule.kind == "gather":   # rank k -> the k-th selected row's place among all N
            k = next(iter(rule.scales.values()), 1)
            order, idx = self.order(rule.symbol, k), env[rule.fill]
            idx = jnp.where(idx < 0, idx + self.count(rule.symbol, k), idx)
            return eval_node(node, ChainMap({rule.fill: order[jnp.clip(idx, 0, order.size - 1)]}, env), key)
        if rule.kind == "compact":   # the selected rows first, in their order
            first = {n: jnp.take(env[n], self.order(rule.symbol, rule.scales.get(n, 1)), axis=dims[0])
                     for n, dims in rule.positions.items()}
            return eval_node(node, ChainMap(first, env), key)
        filled = {n: self._fill(env[n], dims, self.mask(rule.symbol, rule.scales.get(n, 1)), rule.fill)
                  for n, dims in rule.positions.items()}
        out = eval_node(node, ChainMap(filled, env), key)
        if node.target.overloadpacket is aten.mean:   # a mean over all N rows -> over the selected ones
            out = (out * self.valid[rule.symbol].shape[0] / self.count(rule.symbol)).astype(out.dtype)
        return out

    def mask(self, symbol, k: int = 1):
        """Which of the N rows the mask selects; k > 1: of the k * N entries of rows repeated k times each."""
        return self.valid[symbol] if k == 1 else jnp.repeat(self.valid[symbol], k)

    def count(self, symbol, k: int = 1):
        return jnp.sum(self.mask(symbol, k), dtype=jnp.int32)

    def order(self, symbol, k: int = 1):
        """Positions of the selected rows among all N, in order (then the unselected ones)."""
        return jnp.argsort(~self.mask(symbol, k), stable=True)

    def output(self, node, value):
        """A graph output: sizes as counts. Selected rows returned under jit, where their number (the data's)
        cannot be a shape: all N rows, the selected ones first and in order, zeros after (the convention of
        jnp.nonzero(size=...)); outside jit torch's rows."""
        if node.name in self.counts:
            return self.counts[node.name]
        rule, val = self.rules[node.name], node.meta.get("val")
        dims = row_dims(val, rule.symbol)
        if rule.symbol not in self.valid or dims == []:
            return value
        k = scale_of(val, rule.symbol)
        if not dims or len(dims) != 1 or k is None:
            raise _refuse(node, "is returned: its size depends on the mask's values, which a jitted function "
                                "cannot return; return a reduction, or write the rows back with `out[mask] = rows`")
        warnings.warn(f"rows selected by a mask are returned ({source_line(node)}); under jit, where their number "
                      f"cannot be a shape, the output holds all {value.shape[dims[0]]}: the selected ones first, "
                      "zeros after", stacklevel=2)
        d = dims[0]
        keep = (jnp.arange(value.shape[d]) < self.count(rule.symbol, k)).reshape(
            [-1 if i == d else 1 for i in range(value.ndim)])
        return jnp.where(keep, jnp.take(value, self.order(rule.symbol, k), axis=d), jnp.zeros((), value.dtype))

    def _segments(self, node, env, rule, key, eval_node):
        """Under jit, every piece is the whole (N rows), and the i-th segment's mask selects piece i's rows."""
        sizes = [env[s.name] if isinstance(s, torch.fx.Node) else s for s in node.args[1]]
        if not any(isinstance(s, jax.core.Tracer) for s in sizes):
            return eval_node(node, env, key)
        x = env[node.args[0].name]
        pos = jnp.arange(x.shape[bound_args(node).get("dim", 0) % x.ndim])
        start = 0
        for symbol, size in zip(rule.fill, sizes):
            self.valid[symbol] = (pos >= start) & (pos < start + size)
            start = start + size
        return [x] * len(sizes)

    def _merge(self, node, env, rule, key, eval_node):
        """The segments of one split joined back in order: each row from the piece whose segment holds it."""
        if rule.fill[0] not in self.valid:   # concrete counts (outside jit): torch's pieces
            return eval_node(node, env, key)
        (d,), out = next(iter(rule.positions.values())), None
        for name, symbol in zip(rule.positions, rule.fill):
            keep = self.valid[symbol].reshape([-1 if i == d else 1 for i in range(env[name].ndim)])
            out = env[name] if out is None else jnp.where(keep, env[name], out)
        return out.astype(jax_dtype(node.meta["val"].dtype))

    def _pieces(self, node, env, rule, key, eval_node):
        sizes = [env[s.name] if isinstance(s, torch.fx.Node) else s for s in node.args[1]]
        if not any(isinstance(s, jax.core.Tracer) for s in sizes):
            return eval_node(node, env, key)
        x = env[node.args[0].name]
        if rule.symbol in self.valid:   # selected rows: the selected ones first
            (dims,) = rule.positions.values()
            x = jnp.take(x, self.order(rule.symbol, rule.scales[node.args[0].name]), axis=dims[0])
        return padded_pieces(x, sizes, bound_args(node).get("dim", 0) % x.ndim)

    def _count_of(self, node, env, rule, key, eval_node):
        if node.target in (aten.sym_size.int, aten.sym_numel.default):
            shape = env[node.args[0].name].shape
            dims, k = rule.positions.get(node.args[0].name, []), rule.scales.get(node.args[0].name, 1)
            sizes = [self.count(rule.symbol, k) if d in dims else s for d, s in enumerate(shape)]
            return sizes[node.args[1]] if node.target is aten.sym_size.int else math.prod(sizes)
        return eval_node(node, ChainMap(self.counts, env), key)

    def _counted(self, node, env):
        """Sizes passed where the op takes a number (`loss / x[mask].shape[0]`) are the selected count."""
        schema = getattr(node.target, "_schema", None)
        if schema is None or not self.counts:
            return env
        counted = {v.name: self.counts[v.name] for arg, v in zip(schema.arguments, node.args)
                   if isinstance(v, torch.fx.Node) and v.name in self.counts
                   and any(t in str(arg.type) for t in COUNTED)}
        return ChainMap(counted, env) if counted else env

    @staticmethod
    def _fill(x, dims, valid, value):
        if value is DROP:   # only the indices: a write past every size is dropped (JAX's scatter mode)
            if jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.bool_:
                return x
            value = np.inf
        if jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.bool_:
            fill = jnp.asarray(value, x.dtype)
        else:
            info = jnp.iinfo(x.dtype)
            fill = jnp.asarray(info.min if value == -np.inf else info.max if value == np.inf else value, x.dtype)
        keep = jnp.ones((), bool)
        for d in dims:   # a Gram matrix x[m].T @ x[m] holds the rows in two dims
            keep = keep & valid.reshape([valid.shape[0] if i == d else 1 for i in range(x.ndim)])
        return jnp.where(keep, x, fill)

    def _source(self, node, env, symbol, key, eval_node):
        x = env[node.args[0].name]
        if node.target is aten.index.Tensor:
            used = [i for i, ix in enumerate(node.args[1]) if ix is not None]
            mask_node = node.args[1][used[0]] if len(used) == 1 else None
        else:   # nonzero(mask) / masked_select(x, mask)
            mask_node = node.args[0] if node.target is aten.nonzero.default else node.args[1]
        mask = None if mask_node is None else env[mask_node.name]
        if not isinstance(mask, jax.core.Tracer) or (node.target is aten.index.Tensor and mask.dtype != jnp.bool_):
            return eval_node(node, env, key)   # a concrete mask (torch's semantics), or the lowering's own error
        self.mask_of[symbol] = mask_node.name
        if node.target is aten.nonzero.default:   # every coordinate, row-major; the mask says which are picked
            self.valid[symbol] = (mask != 0).reshape(-1)
            grid = jnp.indices(mask.shape).reshape(mask.ndim, -1).T
            return grid.astype(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
        if node.target is aten.masked_select.default:
            shape = jnp.broadcast_shapes(x.shape, mask.shape)
            self.valid[symbol] = jnp.broadcast_to(mask, shape).reshape(-1)
            return jnp.broadcast_to(x, shape).reshape(-1)
        j = used[0]
        self.valid[symbol] = mask.reshape(-1)
        return x.reshape(x.shape[:j] + (-1,) + x.shape[j + mask.ndim:])

    def _pinned(self, node, env, key, eval_node):
        """x[mask] / masked_select / nonzero with a count the program knows (`torch._check(x[m].numel() ==
        feats.numel())`, HF's placeholder check): the first `count` Trues, gathered at a static size."""
        mask = env[mask_node(node).name]
        if not isinstance(mask, jax.core.Tracer):
            return eval_node(node, env, key)
        shape = [int(d) if is_concrete_int(d) else int(d.node.expr.xreplace(self._bindings(env)))
                 for d in node.meta["val"].shape]
        if node.target is aten.nonzero.default:
            return jnp.argwhere(mask, size=shape[0], fill_value=-1).astype(jax_dtype(node.meta["val"].dtype))
        x = env[node.args[0].name]
        if node.target is aten.masked_select.default:
            full = jnp.broadcast_shapes(x.shape, mask.shape)
            x, mask, j = jnp.broadcast_to(x, full).reshape(-1), jnp.broadcast_to(mask, full), 0
        else:
            j = next(i for i, ix in enumerate(node.args[1]) if ix is not None)
            x = x.reshape(x.shape[:j] + (-1,) + x.shape[j + mask.ndim:])
        picked = jnp.nonzero(mask.reshape(-1), size=shape[j], fill_value=x.shape[j])[0]   # past the end: NaN
        return jnp.take(x, picked, axis=j, mode="fill")

    def _bindings(self, env) -> dict:
        """Each size symbol of the inputs (s0: the batch) -> its size in this run."""
        out = {}
        for name, meta in self.placeholders.items():
            for want, got in zip(getattr(meta, "shape", ()), getattr(env.get(name), "shape", ())):
                if not is_concrete_int(want):
                    out[want.node.expr] = got
        return out

    def _put(self, node, env, symbol):
        out_node, indices, values_node = node.args[:3]
        accumulate = bound_args(node).get("accumulate", False)
        used = [i for i, ix in enumerate(indices) if ix is not None]
        if len(used) != 1:
            raise _refuse(node, "writes rows selected by a boolean mask through several indices")
        j = used[0]
        out, mask, values = env[out_node.name], env[indices[j].name], env[values_node.name]
        rows = out.shape[:j] + (mask.size,) + out.shape[j + mask.ndim:]
        values = jnp.broadcast_to(values.astype(out.dtype), rows)
        if indices[j].name != self.mask_of[symbol]:   # another mask (as many Trues): its k-th True takes the
            ranks = jnp.cumsum(mask.reshape(-1)) - 1  # k-th selected row
            order = self.order(symbol)
            values = jnp.take(values, order[jnp.clip(ranks, 0, mask.size - 1)], axis=j)
        values = values.reshape(out.shape)
        mask = mask.reshape((1,) * j + mask.shape + (1,) * (out.ndim - j - mask.ndim))
        return out + jnp.where(mask, values, 0) if accumulate else jnp.where(mask, values, out)


def source_line(node) -> str:
    from converters.interpreter import source_line
    return source_line(node)


def _refuse(node, what: str) -> LoweringError:
    return LoweringError(f"{node.target} at {source_line(node)} {what}: bridge keeps every row and the mask "
                         "(static shapes for jax.jit), which supports ops on each row, reductions over the rows "
                         "and `out[mask] = rows`")

"""Rows picked by a boolean mask (`x[mask]`, `masked_select`) without data-dependent shapes.

torch.export gives `x[mask]` an unbacked size u0 (as many rows as the mask selects); JAX traces static
shapes only. Here such a tensor keeps all N = mask.numel() rows, and the mask rides along, keyed by u0:
- ops that treat rows independently (elementwise, linear layers, softmax over features...) run on all N
  rows; the unselected ones are never read back;
- reductions and contractions over the rows fill the unselected rows with the reduction's identity first
  (0 for sums and matmuls, -inf for max, 1 for products); a mean divides by the selected count;
- `out[mask] = rows` becomes `where(mask, rows, out)`, and `x[mask].shape[0]` is the selected count where
  it is a number, N where it is a size; `torch.arange` of it numbers each selected row by its rank,
  `rows[idx]` reads the idx-th selected rows, and `x.masked_scatter(other_mask, rows)` fills the other
  mask's Trues with the selected rows in order;
- writes at indices the rows carry (`tok` of `_, tok = torch.where(mask)`: `index_add_`, `scatter_add`,
  `out[tok] += rows`) add 0 from the unselected rows; `index_copy`, `scatter` and `out[tok] = rows` drop them.
Where a check fixes the count (`torch._check(x[mask].numel() == feats.numel())`, HF's placeholder check), the
program knows the size: the first `count` selected rows are gathered at that static size instead.
What would mix selected rows otherwise (sorting, slicing, returning them) raises under jit,
naming the op and line; with a concrete mask (outside jit) everything runs as in torch. Masked losses and
per-group adapters thus convert and differentiate:

    >>> loss = F.cross_entropy(logits[mask], labels[mask])      # mean over the selected rows only
    >>> h_new[lang_mask] = adapter(h[lang_mask])                 # X-MOD's per-language adapters
    >>> out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])  # Mixtral's loop over experts
"""
from __future__ import annotations

import dataclasses
import math
import operator
from collections import ChainMap

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, is_concrete_int

from bridge.errors import LoweringError
from converters.dtypes import jax_dtype

aten = torch.ops.aten
_DROP = "drop"   # fill an index the rows carry with one past any size: the write is dropped
_SOURCES = (aten.index.Tensor, aten.masked_select.default, aten.nonzero.default)
_PUTS = (aten.index_put.default, aten.index_put_.default)
# reductions / contractions over the selected rows: the identity the unselected ones are filled with
_FILL = {**dict.fromkeys((aten.sum, aten.nansum, aten.mean, aten.mm, aten.addmm, aten.bmm, aten.baddbmm,
                          aten.matmul, aten.dot, aten.vdot, aten.mv, aten.einsum, aten.any, aten.count_nonzero,
                          aten.linear, aten.tensordot), 0),
         **dict.fromkeys((aten.amax, aten.max, aten.logsumexp), -np.inf),
         **dict.fromkeys((aten.amin, aten.min), np.inf), aten.prod: 1, aten.all: True,
         # writes at integer indices the rows carry (`torch.where(mask)`'s): the unselected rows add 0 / are dropped
         **dict.fromkeys((aten.index_add, aten.scatter_add), 0),
         **dict.fromkeys((aten.index_copy, aten.scatter), _DROP)}
# ops that keep the rows but combine them along a dim: safe once the unselected rows hold the identity
_SCANS = {**dict.fromkeys((aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax,
                           aten.logcumsumexp), -np.inf), aten.cumsum: 0, aten.cumprod: 1}
# ops whose `dim` arguments only move or add dims (the rows stay rows)
_MOVES = {aten.permute, aten.transpose, aten.t, aten.unsqueeze, aten.squeeze, aten.movedim, aten.expand,
          aten.view, aten.reshape, aten._unsafe_view, aten.clone, aten.alias}
# ops that read only a tensor's dtype and device: any rows they are given are a template
_TEMPLATES = {aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty, aten.new_empty_strided}
_DIM_ARGS = ("dim", "dims", "dim0", "dim1", "source", "destination")
_COUNTED = ("Scalar", "float", "number", "Tensor")   # schema types where a size is used as a number


@dataclasses.dataclass
class Rule:
    kind: str                   # source | pinned | size | put | rows | rank | compact | gather | reduce | scan | refuse
    symbol: object
    positions: dict = dataclasses.field(default_factory=dict)   # input node name -> dims holding the rows
    fill: object = None         # reduce/scan: the identity; gather: the index node; refuse: why


def _symbols(val) -> set:
    try:
        return set(free_unbacked_symbols(val)) if val is not None else set()
    except Exception:   # values free_unbacked_symbols does not know (strings, devices)
        return set()


def _row_dims(val, symbol) -> list[int] | None:
    """Dims of a tensor meta that are exactly the row count; None where a dim is some other expression of it."""
    dims = []
    for d, size in enumerate(val.shape if isinstance(val, torch.Tensor) else ()):
        expr = getattr(getattr(size, "node", None), "expr", None)
        if expr is not None and symbol in expr.free_symbols:
            if expr != symbol:
                return None
            dims.append(d)
    return dims


def _bound(node) -> dict:
    schema = getattr(node.target, "_schema", None)
    out = {a.name: v for a, v in zip(schema.arguments, node.args)} if schema is not None else {}
    return {**out, **node.kwargs}


def _dim_values(node) -> list[int]:
    bound, out = _bound(node), []
    for name in _DIM_ARGS:
        v = bound.get(name)
        out += list(v) if isinstance(v, (list, tuple)) else [v] if isinstance(v, int) else []
    return out


def _rule(node, symbol, positions: dict, val) -> Rule:
    packet = getattr(node.target, "overloadpacket", None)
    out_dims = _row_dims(val, symbol)
    first = node.all_input_nodes[0].name if node.all_input_nodes else None
    if not isinstance(val, (torch.Tensor, list, tuple)):
        return Rule("size", symbol, positions)
    if node.target in _PUTS:
        index_rows = [i for i in node.args[1] if isinstance(i, torch.fx.Node) and i.name in positions]
        if index_rows and all(i.meta["val"].dtype != torch.bool for i in index_rows):   # out[idx] = v, idx rows
            return Rule("reduce", symbol, positions, 0 if _bound(node).get("accumulate", False) else _DROP)
        return Rule("put", symbol, positions)
    if positions and node.target is not operator.getitem and getattr(node.target, "namespace", "") != "aten":
        return Rule("refuse", symbol, fill="passes rows selected by a boolean mask into an op bridge does not see "
                                           "into (a torch.cond branch, a custom op or autograd.Function)")
    if out_dims is None or any(d is None for d in positions.values()):
        return Rule("refuse", symbol, fill="gives rows selected by a boolean mask another size or shape")
    if isinstance(val, (list, tuple)) and packet in (aten.max, aten.min) and any(
            u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
        return Rule("refuse", symbol, fill="takes the index of the largest/smallest of rows selected by a mask")
    if packet is aten.arange and out_dims == [0] and _bound(node).get("step", 1) == 1:
        return Rule("rank", symbol, positions)   # arange(count): each selected row's position among them
    if packet in (aten.arange, aten.randperm):
        return Rule("refuse", symbol, fill="numbers rows selected by a boolean mask in random order")
    if not positions or packet in _TEMPLATES:   # the count as a number, a new size, or a template
        return Rule("rows", symbol, positions)
    if packet is aten.masked_scatter and set(positions) == {node.args[2].name}:
        return Rule("compact", symbol, positions)   # the selected rows, in order, fill another mask's Trues
    rows = positions.get(first, [])
    if packet is aten.index and len(rows) == 1 and len(node.args[1]) > rows[0]:
        idx = node.args[1][rows[0]]   # x[m][idx]: idx numbers the selected rows (their rank)
        if isinstance(idx, torch.fx.Node) and not idx.meta["val"].dtype.is_floating_point \
                and idx.meta["val"].dtype != torch.bool:
            return Rule("gather", symbol, {first: rows}, fill=idx.name)
    if not out_dims and not (isinstance(val, (list, tuple)) and packet not in _FILL):
        if packet not in _FILL:
            return Rule("refuse", symbol, fill="reduces rows selected by a boolean mask by their order")
        return Rule("reduce", symbol, positions, _FILL[packet])
    ndim = node.all_input_nodes[0].meta["val"].dim() if rows else 0
    hit = {d % ndim for d in _dim_values(node)} & set(rows) if ndim and packet not in _MOVES else set()
    if packet is aten.index and rows:   # x[m][idx]: which rows idx picks depends on their position
        hit |= {i for i, ix in enumerate(node.args[1]) if ix is not None} & set(rows)
    if not hit:
        return Rule("rows", symbol, positions)
    if packet in _SCANS:
        return Rule("scan", symbol, positions, _SCANS[packet])
    return Rule("refuse", symbol, fill="combines rows selected by a boolean mask along their dim")


def plan(nodes: list) -> dict[str, Rule]:
    """How each node that reads or makes rows selected by a boolean mask is evaluated."""
    rules: dict[str, Rule] = {}
    known: set = set()
    if not any(n.target in _SOURCES for n in nodes):
        return rules
    for node in nodes:
        val = node.meta.get("val")
        ins = set().union(*(_symbols(n.meta.get("val")) for n in node.all_input_nodes))
        outs = _symbols(val)
        if node.target in _SOURCES and not outs and not ins and _mask_node(node) is not None:
            rules[node.name] = Rule("pinned", None)   # a check (`torch._check`) fixed the count: a static shape
            continue
        if node.target in _SOURCES and len(outs - ins) == 1 and not ins:
            (symbol,) = outs
            known.add(symbol)
            rules[node.name] = Rule("source", symbol)
            continue
        touched = (ins | outs) & known
        if not touched:
            continue
        symbol = next(iter(touched))
        if len(ins | outs) > 1:
            if len(touched) == 1 and not isinstance(val, torch.Tensor):   # the count against a number read
                rules[node.name] = Rule("size", symbol)                     # from a tensor (`.item()`): a check
            else:
                rules[node.name] = Rule("refuse", symbol, fill="mixes rows selected by different masks")
            continue
        positions = {n.name: _row_dims(n.meta.get("val"), symbol) for n in node.all_input_nodes}
        rules[node.name] = _rule(node, symbol, {k: v for k, v in positions.items() if v != []}, val)
    return rules


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
            start = _bound(node).get("start", 0)
            rank = jnp.cumsum(self.valid[rule.symbol], dtype=jnp.int32) - 1
            return (rank + (start if isinstance(start, (int, float)) else env[start.name])).astype(
                jax_dtype(node.meta["val"].dtype))
        env = self._counted(node, env)
        if rule.kind == "rows":
            return eval_node(node, env, key)
        if rule.kind == "gather":   # rank k -> the k-th selected row's place among all N
            order, idx = self.order(rule.symbol), env[rule.fill]
            idx = jnp.where(idx < 0, idx + self.count(rule.symbol), idx)
            return eval_node(node, ChainMap({rule.fill: order[jnp.clip(idx, 0, order.size - 1)]}, env), key)
        if rule.kind == "compact":   # the selected rows first, in their order
            order = self.order(rule.symbol)
            first = {n: jnp.take(env[n], order, axis=dims[0]) for n, dims in rule.positions.items()}
            return eval_node(node, ChainMap(first, env), key)
        filled = {n: self._fill(env[n], dims, rule.symbol, rule.fill) for n, dims in rule.positions.items()}
        out = eval_node(node, ChainMap(filled, env), key)
        if node.target.overloadpacket is aten.mean:   # a mean over all N rows -> over the selected ones
            out = (out * self.valid[rule.symbol].shape[0] / self.count(rule.symbol)).astype(out.dtype)
        return out

    def count(self, symbol):
        return jnp.sum(self.valid[symbol], dtype=jnp.int32)

    def order(self, symbol):
        """Positions of the selected rows among all N, in order (then the unselected ones)."""
        return jnp.argsort(~self.valid[symbol], stable=True)

    def output(self, node, value):
        """A graph output: sizes as counts; selected rows only outside jit (their number is the data's)."""
        if node.name in self.counts:
            return self.counts[node.name]
        rule = self.rules[node.name]
        if rule.symbol in self.valid and _row_dims(node.meta.get("val"), rule.symbol) != []:
            raise _refuse(node, "is returned: its number of rows depends on the mask's values, which a jitted "
                                "function cannot return; return a reduction, or write the rows back with "
                                "`out[mask] = rows`")
        return value

    def _count_of(self, node, env, rule, key, eval_node):
        if node.target in (aten.sym_size.int, aten.sym_numel.default):
            shape = env[node.args[0].name].shape
            dims = rule.positions.get(node.args[0].name, [])
            sizes = [self.count(rule.symbol) if d in dims else s for d, s in enumerate(shape)]
            return sizes[node.args[1]] if node.target is aten.sym_size.int else math.prod(sizes)
        return eval_node(node, ChainMap(self.counts, env), key)

    def _counted(self, node, env):
        """Sizes passed where the op takes a number (`loss / x[mask].shape[0]`) are the selected count."""
        schema = getattr(node.target, "_schema", None)
        if schema is None or not self.counts:
            return env
        counted = {v.name: self.counts[v.name] for arg, v in zip(schema.arguments, node.args)
                   if isinstance(v, torch.fx.Node) and v.name in self.counts
                   and any(t in str(arg.type) for t in _COUNTED)}
        return ChainMap(counted, env) if counted else env

    def _fill(self, x, dims, symbol, value):
        valid = self.valid[symbol]
        if value is _DROP:   # only the indices: a write past every size is dropped (JAX's scatter mode)
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
        mask = env[_mask_node(node).name]
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
        accumulate = _bound(node).get("accumulate", False)
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


def _mask_node(node):
    """The boolean mask a source op selects with (x[mask] with a single index, masked_select, nonzero)."""
    if node.target is aten.index.Tensor:
        used = [ix for ix in node.args[1] if ix is not None]
        ok = len(used) == 1 and isinstance(used[0], torch.fx.Node) and used[0].meta["val"].dtype == torch.bool
        return used[0] if ok else None
    if node.target is aten.nonzero.default:
        return node.args[0]
    return node.args[1] if node.target is aten.masked_select.default else None


def _refuse(node, what: str) -> LoweringError:
    from converters.interpreter import source_line
    return LoweringError(f"{node.target} at {source_line(node)} {what}: bridge keeps every row and the mask "
                         "(static shapes for jax.jit), which supports ops on each row, reductions over the rows "
                         "and `out[mask] = rows`")


def readers(graph: torch.fx.Graph) -> set:
    """Ops reading tensors whose size is data-dependent: capture decomposes them with torch's own rules."""
    return {n.target for n in graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and any(_symbols(a.meta.get("val")) for a in n.all_input_nodes)}

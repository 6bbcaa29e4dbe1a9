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
A reshape that flattens each row (`(count, T, D) -> (T * count, D)`) keeps them rows, each repeated T times
(`scale_of`). Returned under jit, where their number cannot be a shape, the rows come back as all N, the selected
ones first and zeros after (jnp.nonzero(size=...)'s convention); so do the pieces of a split by counts read from
the data (`rows.split(counts.tolist())`) that are only returned. A split of other rows by such counts makes
segments (MoE experts over tokens sorted by expert, JetMoE's `inputs.split(expert_size)`): each piece is all N
rows with its segment's mask, and the pieces concatenated back in order are merged by those masks. What would mix selected rows otherwise
(sorting, slicing) raises under jit, naming the op and line; with a concrete mask (outside jit) everything runs
as in torch. Masked losses and per-group adapters thus convert and differentiate:

    >>> loss = F.cross_entropy(logits[mask], labels[mask])      # mean over the selected rows only
    >>> h_new[lang_mask] = adapter(h[lang_mask])                 # X-MOD's per-language adapters
    >>> out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])  # Mixtral's loop over experts
"""
from __future__ import annotations

import dataclasses
import math
import operator

import numpy as np
import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, is_concrete_int

aten = torch.ops.aten
DROP = "drop"   # fill an index the rows carry with one past any size: the write is dropped
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
         **dict.fromkeys((aten.index_copy, aten.scatter), DROP)}
# ops that keep the rows but combine them along a dim: safe once the unselected rows hold the identity
_SCANS = {**dict.fromkeys((aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax,
                           aten.logcumsumexp), -np.inf), aten.cumsum: 0, aten.cumprod: 1}
# ops whose `dim` arguments only move or add dims (the rows stay rows)
_MOVES = {aten.permute, aten.transpose, aten.t, aten.unsqueeze, aten.squeeze, aten.movedim, aten.expand,
          aten.view, aten.reshape, aten._unsafe_view, aten.clone, aten.alias}
# ops that read only a tensor's dtype and device: any rows they are given are a template
_TEMPLATES = {aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty, aten.new_empty_strided}
_RESHAPES = {aten.view, aten.reshape, aten._unsafe_view}
_DIM_ARGS = ("dim", "dims", "dim0", "dim1", "source", "destination")
COUNTED = ("Scalar", "float", "number", "Tensor")   # schema types where a size is used as a number


@dataclasses.dataclass
class Rule:
    kind: str                   # source | pinned | size | put | rows | rank | compact | gather | reduce | scan | refuse
    symbol: object
    positions: dict = dataclasses.field(default_factory=dict)   # input node name -> dims holding the rows
    fill: object = None         # reduce/scan: the identity; gather: the index node; refuse: why
    scales: dict = dataclasses.field(default_factory=dict)      # input node name -> k (see scale_of)
    scale: int = 1              # the output's k


def _symbols(val) -> set:
    """The data-dependent size symbols of a meta: a tensor's sizes (not its strides or storage offset, which
    a split's later pieces take from the earlier pieces' sizes), SymInts, or those of a list of them."""
    if isinstance(val, torch.Tensor):
        val = tuple(val.shape)
    elif isinstance(val, (list, tuple)):
        return set().union(*(_symbols(v) for v in val))
    try:
        return set(free_unbacked_symbols(val)) if val is not None else set()
    except Exception:   # values free_unbacked_symbols does not know (strings, devices)
        return set()


def _factor(expr, symbol) -> int | None:
    """k where a size is k * count (k a positive integer), else None."""
    k, rest = expr.as_coeff_Mul()
    return int(k) if rest == symbol and k.is_Integer and k > 0 else None


def _exprs(val, symbol) -> dict:
    """dim -> size expression, for the dims of a tensor meta whose size involves the row count."""
    out = {}
    for d, size in enumerate(val.shape if isinstance(val, torch.Tensor) else ()):
        expr = getattr(getattr(size, "node", None), "expr", None)
        if expr is not None and symbol in expr.free_symbols:
            out[d] = expr
    return out


def row_dims(val, symbol) -> list[int] | None:
    """Dims of a tensor meta that hold the rows (k * count of them, see scale_of); None where a dim is some
    other expression of the count."""
    exprs = _exprs(val, symbol)
    return None if any(_factor(e, symbol) is None for e in exprs.values()) else list(exprs)


def scale_of(val, symbol) -> int | None:
    """k where the row dims hold k * count entries: each row repeated k times in a row, as flattening
    (count, k, ...) -> (k * count, ...) lays them out. 1 without row dims; None where the dims differ."""
    ks = {_factor(e, symbol) for e in _exprs(val, symbol).values()}
    return None if None in ks or len(ks) > 1 else ks.pop() if ks else 1


def _same_blocks(a, a_dims, b, b_dims) -> bool:
    """A reshape keeps each row's entries together, in order, where one dim holds the rows on both sides and
    the static dims before it hold as many entries on both sides."""
    if len(a_dims) != 1 or len(b_dims) != 1:
        return a_dims == b_dims and _sizes(a.shape[:max(a_dims) + 1]) == _sizes(b.shape[:max(b_dims) + 1])
    pre_a, pre_b = _sizes(a.shape[:a_dims[0]]), _sizes(b.shape[:b_dims[0]])
    if all(isinstance(s, int) for s in (*pre_a, *pre_b)):
        return math.prod(pre_a) == math.prod(pre_b)
    return pre_a == pre_b


def _sizes(shape) -> list:
    """Sizes as ints or sympy expressions (comparing SymInts themselves would guard on them)."""
    return [int(s) if is_concrete_int(s) else s.node.expr for s in shape]


def bound_args(node) -> dict:
    schema = getattr(node.target, "_schema", None)
    out = {a.name: v for a, v in zip(schema.arguments, node.args)} if schema is not None else {}
    return {**out, **node.kwargs}


def _dim_values(node) -> list[int]:
    bound, out = bound_args(node), []
    for name in _DIM_ARGS:
        v = bound.get(name)
        out += list(v) if isinstance(v, (list, tuple)) else [v] if isinstance(v, int) else []
    return out


def _rule(node, symbol, positions: dict, val) -> Rule:
    rule = _rule_of(node, symbol, positions, val)
    ins = {n.name: n.meta.get("val") for n in node.all_input_nodes if n.name in rule.positions}
    rule.scales = {name: scale_of(v, symbol) for name, v in ins.items()}
    rule.scale = scale_of(val, symbol) if isinstance(val, torch.Tensor) else 1
    if rule.kind == "refuse":
        return rule
    out_dims, first = row_dims(val, symbol), node.all_input_nodes[0]
    if getattr(node.target, "overloadpacket", None) in _RESHAPES and first.name in ins:
        if not _same_blocks(ins[first.name], positions[first.name], val, out_dims):
            return Rule("refuse", symbol, fill="reshapes rows selected by a boolean mask across other dims")
    elif rule.scale != 1 or set(rule.scales.values()) - {1}:
        if None in rule.scales.values() or rule.scale is None or rule.kind in ("put", "rank") or (
                out_dims and set(rule.scales.values()) - {rule.scale}):
            return Rule("refuse", symbol, fill="gives rows selected by a boolean mask another size or shape")
    return rule


def _rule_of(node, symbol, positions: dict, val) -> Rule:
    packet = getattr(node.target, "overloadpacket", None)
    out_dims = row_dims(val, symbol)
    first = node.all_input_nodes[0].name if node.all_input_nodes else None
    if not isinstance(val, (torch.Tensor, list, tuple)):
        return Rule("size", symbol, positions)
    if node.target in _PUTS:
        index_rows = [i for i in node.args[1] if isinstance(i, torch.fx.Node) and i.name in positions]
        if index_rows and all(i.meta["val"].dtype != torch.bool for i in index_rows):   # out[idx] = v, idx rows
            return Rule("reduce", symbol, positions, 0 if bound_args(node).get("accumulate", False) else DROP)
        return Rule("put", symbol, positions)
    if positions and node.target is not operator.getitem and getattr(node.target, "namespace", "") != "aten":
        return Rule("refuse", symbol, fill="passes rows selected by a boolean mask into an op bridge does not see "
                                           "into (a torch.cond branch, a custom op or autograd.Function)")
    if out_dims is None or any(d is None for d in positions.values()):
        return Rule("refuse", symbol, fill="gives rows selected by a boolean mask another size or shape")
    if isinstance(val, (list, tuple)) and packet in (aten.max, aten.min) and any(
            u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
        return Rule("refuse", symbol, fill="takes the index of the largest/smallest of rows selected by a mask")
    if packet is aten.arange and out_dims == [0] and bound_args(node).get("step", 1) == 1:
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
    rules: dict[str, Rule] = {n.name: Rule("pieces", None) for n in nodes if _returned_pieces(n)}
    known: set = set()
    groups: dict = {}   # a segments split's name -> its pieces' size symbols, in order
    if not any(n.target in _SOURCES or data_split(n) for n in nodes):
        return rules
    for node in nodes:
        val = node.meta.get("val")
        ins = set().union(*(_symbols(n.meta.get("val")) for n in node.all_input_nodes))
        outs = _symbols(val)
        group = _segments(node, known) if node.name not in rules else None
        if group is not None:   # x.split(counts.tolist()): each piece the rows of one segment
            known |= set(group)
            groups[node.name] = group
            rules[node.name] = Rule("segments", None, fill=group)
            continue
        if node.target is operator.getitem and node.args[0].name in groups:
            rules[node.name] = Rule("rows", groups[node.args[0].name][node.args[1]])
            continue
        merge = _merge(node, groups)
        if merge is not None:
            rules[node.name] = merge
            continue
        if node.target in _SOURCES and not outs and not ins and mask_node(node) is not None:
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
        if node.name in rules:   # x[m].split(counts.tolist()): pieces of the selected rows, in order
            rules[node.name] = _split_rows(node, symbol)
            continue
        if len(ins | outs) > 1:
            if not isinstance(val, torch.Tensor):   # the count against a number read from a tensor
                rules[node.name] = Rule("size", symbol)   # (`.item()`), or the segments' total: a check
            else:
                rules[node.name] = Rule("refuse", symbol, fill="mixes rows selected by different masks")
            continue
        positions = {n.name: row_dims(n.meta.get("val"), symbol) for n in node.all_input_nodes}
        rules[node.name] = _rule(node, symbol, {k: v for k, v in positions.items() if v != []}, val)
    return rules


_SPLITS = (aten.split_with_sizes.default, aten.split_with_sizes_copy.default)


def data_split(node) -> bool:
    """A split into sizes read from the data (`x.split(counts.tolist())`)."""
    sizes = node.args[1] if node.target in _SPLITS else ()
    return any(isinstance(s, torch.fx.Node) for s in sizes)


def _segments(node, known: set) -> list | None:
    """The pieces' size symbols of a split by counts read from the data, along a dim that holds no selected
    rows: piece i is the rows of the i-th segment (the grouped rows of an MoE, one expert's each)."""
    if not data_split(node):
        return None
    x = node.args[0].meta.get("val")
    d = bound_args(node).get("dim", 0) % x.dim()
    group = [getattr(getattr(p.shape[d], "node", None), "expr", None) for p in node.meta["val"]]
    if _symbols(x) & known or not all(e is not None and e.is_Symbol for e in group) or len(set(group)) < len(group):
        return None
    return group


def _merge(node, groups: dict) -> Rule | None:
    """A concatenation of every segment of one split, in order, along its dim: the whole again."""
    if node.target is not aten.cat.default or not groups:
        return None
    parts, ndim = node.args[0], node.meta["val"].dim()
    if not all(isinstance(p, torch.fx.Node) and getattr(p.meta.get("val"), "ndim", -1) == ndim for p in parts):
        return None
    d = (node.args[1] if len(node.args) > 1 else 0) % ndim
    exprs = [getattr(getattr(p.meta["val"].shape[d], "node", None), "expr", None) for p in parts]
    if not any(list(g) == exprs for g in groups.values()):
        return None
    positions = {p.name: row_dims(p.meta["val"], e) for p, e in zip(parts, exprs)}
    if any(dims != [d] for dims in positions.values()) or len(positions) != len(parts):
        return Rule("refuse", exprs[0], fill="joins segments that also hold their rows in another dim")
    return Rule("merge", None, positions, fill=exprs)
_PASS_ON = (operator.getitem, aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
            aten.alias.default, aten._assert_tensor_metadata.default)


def _returned_pieces(node) -> bool:
    """A split into sizes read from the data (`x.split(counts.tolist())`) whose pieces are only returned
    (through views): under jit each is returned padded (`padded_pieces`). Pieces concatenated back in order
    are rewritten at capture (converters.rejoin); other uses keep the lowering's error."""
    if not data_split(node):
        return False

    def returned(n) -> bool:
        return all(u.op == "output" or (u.target in _PASS_ON and returned(u)) for u in n.users)
    return returned(node)


def _split_rows(node, symbol) -> Rule:
    """Returned pieces of selected rows, split along their dim: read compacted, the selected rows first."""
    x = node.args[0].meta.get("val")
    dims, k = row_dims(x, symbol), scale_of(x, symbol)
    if not dims or k is None or len(dims) != 1 or dims[0] != bound_args(node).get("dim", 0) % x.dim():
        return Rule("refuse", symbol, fill="splits rows selected by a boolean mask along another dim")
    return Rule("pieces", symbol, {node.args[0].name: dims}, scales={node.args[0].name: k})


def mask_node(node):
    """The boolean mask a source op selects with (x[mask] with a single index, masked_select, nonzero)."""
    if node.target is aten.index.Tensor:
        used = [ix for ix in node.args[1] if ix is not None]
        ok = len(used) == 1 and isinstance(used[0], torch.fx.Node) and used[0].meta["val"].dtype == torch.bool
        return used[0] if ok else None
    if node.target is aten.nonzero.default:
        return node.args[0]
    return node.args[1] if node.target is aten.masked_select.default else None


def readers(graph: torch.fx.Graph) -> set:
    """Ops reading tensors whose size is data-dependent: capture decomposes them with torch's own rules."""
    return {n.target for n in graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and any(_symbols(a.meta.get("val")) for a in n.all_input_nodes)}

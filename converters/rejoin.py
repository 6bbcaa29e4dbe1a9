"""Pieces of a split concatenated back in order: one view of the whole tensor.

Vision-language models (Idefics2/3, SmolVLM) split their image features per sample by counts read from the
data (`feats.split(counts.tolist())`), flatten each piece and concatenate them again. The pieces have
data-dependent sizes, which a traced JAX program cannot hold; their concatenation is just the whole tensor,
flattened the same way. This pass rewrites

    cat([view(split(x, sizes, 0)[0], (-1, *rest)), ..., view(split(x, sizes, 0)[n-1], (-1, *rest))], 0)

(the views optional, every piece once and in order) to `view(x, (-1, *rest))`, and removes the pieces, the
counts read for them and torch's range checks on those counts where nothing else uses them. A split along
another dim concatenated back along it, with no views between, becomes `x` itself. Where each piece is computed
on before the join (an MoE's experts, one per group of tokens), the join stays and the shapes after it are
written in the whole's size, as torch checked (its lowering: converters/selected_rows.py's segments).

Example:
    >>> rejoin_splits(ep.graph_module)   # after decomposition, before lowering
"""
from __future__ import annotations

import operator

import sympy
import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from converters.ctc import erase_with_size_checks
from converters.selected_rows import data_split

aten = torch.ops.aten
_SPLITS = (aten.split_with_sizes.default, aten.split.Tensor, aten.split_with_sizes_copy.default,
           aten.split_copy.Tensor)
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _piece(node):
    """(split node, index) when `node` is a split's output, or a view of one; plus whether a view was taken."""
    viewed = isinstance(node, torch.fx.Node) and node.target in _VIEWS
    base = node.args[0] if viewed else node
    if not (isinstance(base, torch.fx.Node) and base.target is operator.getitem
            and isinstance(base.args[0], torch.fx.Node) and base.args[0].target in _SPLITS):
        return None
    return base.args[0], base.args[1], viewed


def _dim(node, position: int, ndim: int) -> int:
    d = node.args[position] if len(node.args) > position else node.kwargs.get("dim", 0)
    return d % ndim if ndim else 0


def _trailing(val) -> list[int] | None:
    """The sizes after the first dim, where all are plain numbers."""
    rest = list(val.shape[1:])
    return [int(s) for s in rest] if all(is_concrete_int(s) for s in rest) else None


def _whole(cat: torch.fx.Node):
    """(split, view shape or None) when `cat` concatenates every piece of one split, in order."""
    parts = cat.args[0]
    pieces = [_piece(p) for p in parts]
    if not parts or any(p is None for p in pieces) or len({p[0] for p in pieces}) != 1:
        return None
    split = pieces[0][0]
    if [p[1] for p in pieces] != list(range(len(split.meta["val"]))):
        return None   # some piece is left out, repeated or moved
    x = split.args[0]
    x_val, cat_val = x.meta["val"], cat.meta["val"]
    split_dim, cat_dim = _dim(split, 2, x_val.dim()), _dim(cat, 1, cat_val.dim())
    if not any(p[2] for p in pieces):   # cat(split(x, d), d) is x
        return (split, None) if split_dim == cat_dim and x_val.dim() == cat_val.dim() else None
    rest = _trailing(cat_val)
    # each piece is a block of rows, contiguous in x's row-major order, when the split is along the first dim;
    # flattened alike and concatenated along the first dim, the blocks follow each other as in x
    if split_dim != 0 or cat_dim != 0 or rest is None \
            or any(p.meta["val"].dim() != cat_val.dim() or _trailing(p.meta["val"]) != rest for p in parts):
        return None
    return split, [-1, *rest]


def _expr(size):
    return sympy.Integer(int(size)) if is_concrete_int(size) else size.node.expr


def _sizes_as_total(graph, cat, split, x) -> None:
    """Shapes after `cat` that hold the pieces' sizes (u1 + u2) are written in x's (u0 = u1 + u2, as torch
    checked): the last piece's size is the total less the others'."""
    d = _dim(split, 2, x.meta["val"].dim())
    sizes = [_expr(p.shape[d]) for p in split.meta["val"]]
    last = sizes[-1]
    if not isinstance(last, sympy.Symbol) or last in set().union(*(e.free_symbols for e in sizes[:-1])):
        return
    total = _expr(x.meta["val"].shape[d])
    sub, pieces = {last: total - sum(sizes[:-1])}, set().union(*(e.free_symbols for e in sizes)) - total.free_symbols
    shape_env = x.meta["val"].fake_mode.shape_env

    def total_of(expr):
        """expr with the pieces' sum written as the total; None where a piece's own size remains (a size of
        one piece, as another split by the same counts has it, keeps its symbol)."""
        new = sympy.expand(expr.xreplace(sub))
        return None if new.free_symbols & pieces or new == expr else new

    def resized(val):
        if isinstance(val, (list, tuple)):
            return type(val)(resized(v) for v in val)
        if isinstance(val, torch.SymInt):
            new = total_of(val.node.expr)
            return val if new is None else shape_env.create_symintnode(new, hint=None)
        if not isinstance(val, torch.Tensor) or all(
                is_concrete_int(s) or total_of(_expr(s)) is None for s in val.shape):
            return val
        with val.fake_mode:
            return val.new_empty([resized(s) if isinstance(s, torch.SymInt) else s for s in val.shape])

    after = False
    for node in graph.nodes:
        after = after or node is cat
        if after and "val" in node.meta:
            node.meta["val"] = resized(node.meta["val"])


def _joined(cat: torch.fx.Node, splits: list):
    """The split whose pieces, each computed on alone (one expert per group of rows), `cat` joins back in order
    along the split's dim: its inputs' sizes there are the pieces' sizes."""
    ndim = cat.meta["val"].dim()
    vals = [p.meta.get("val") if isinstance(p, torch.fx.Node) else None for p in cat.args[0]]
    if not splits or not all(isinstance(v, torch.Tensor) and v.dim() == ndim for v in vals):
        return None   # (torch.cat takes legacy empty 1-d tensors beside n-d ones)
    d = _dim(cat, 1, ndim)
    sizes = [_expr(v.shape[d]) for v in vals]
    for split in splits:
        x_val = split.args[0].meta["val"]
        if x_val.dim() == ndim and _dim(split, 2, ndim) == d and len(split.meta["val"]) == len(sizes) \
                and [_expr(p.shape[d]) for p in split.meta["val"]] == sizes:
            return split
    return None


def rejoin_splits(gm: torch.fx.GraphModule) -> bool:
    """Rewrite every concatenation of a whole split (see the module docstring); True where one was found.
    Where the pieces were computed on before they are joined, shapes after the join are written in the
    whole's size (the join itself runs as converters.selected_rows' segments)."""
    graph, changed = gm.graph, False
    splits = [n for n in graph.nodes if n.op == "call_function" and data_split(n)]
    for cat in [n for n in graph.nodes if n.op == "call_function" and n.target is aten.cat.default]:
        found = _whole(cat) if cat.graph is graph and cat in set(graph.nodes) else None
        if found is None:
            split = _joined(cat, splits) if cat in set(graph.nodes) else None
            if split is not None:
                _sizes_as_total(graph, cat, split, split.args[0])
                changed = True
            continue
        split, shape = found
        x = split.args[0]
        _sizes_as_total(graph, cat, split, x)
        if shape is None:
            cat.replace_all_uses_with(x)
        else:
            with graph.inserting_after(cat):
                view = graph.call_function(aten.view.default, (x, shape))
            view.meta = {**cat.meta, "val": x.meta["val"].view(shape)}
            cat.replace_all_uses_with(view)
        graph.erase_node(cat)
        graph.eliminate_dead_code()   # the pieces and their views, where nothing else reads them
        if split not in set(graph.nodes):   # the counts read for the split (`.tolist()`), their range checks
            for size in split.args[1] if isinstance(split.args[1], (list, tuple)) else []:
                if isinstance(size, torch.fx.Node) and size in set(graph.nodes):
                    erase_with_size_checks(graph, size)
        changed = True
    if changed:
        graph.eliminate_dead_code()
        gm.recompile()
    return changed

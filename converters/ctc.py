"""CTC loss through capture. torch's `_ctc_loss` returns its alignment lattice, whose size depends on the
longest target (a value), so torch.export refuses it. While capturing, `F.ctc_loss` (and `nn.CTCLoss`)
call one op instead, `bridge::ctc_loss`, whose output shape is static; it lowers to a JAX forward
recursion (converters/ops/ctc.py).

Targets given concatenated and built with `masked_select` (Hugging Face's CTC heads:
`labels.masked_select(labels >= 0)`) have a data-dependent length too: the op then reads the padded labels
and the mask instead, so no data-dependent shape reaches JAX.

Example:
    >>> with routing_ctc():
    ...     ep = torch.export.export(model, (x,), {"labels": labels})
    >>> read_masked_targets(ep.graph_module)
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

_ORIGINAL = F.ctc_loss
_REDUCTIONS = ("none", "mean", "sum")


@torch.library.custom_op("bridge::ctc_loss", mutates_args=())
def ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor,
             target_lengths: torch.Tensor, blank: int, reduction: str, zero_infinity: bool,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """F.ctc_loss; with `mask`, the targets are `targets[mask]` (concatenated, row-major)."""
    if mask is not None:
        targets = targets[mask]
    return _ORIGINAL(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity).clone()


@ctc_loss.register_fake
def _(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity, mask=None):
    shape = (log_probs.shape[1],) if reduction == "none" and log_probs.dim() == 3 else ()
    return log_probs.new_empty(shape)


def _lengths(x, like: torch.Tensor) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(list(x), dtype=torch.long, device=like.device)


def _routed(log_probs, targets, input_lengths, target_lengths, blank=0, reduction="mean", zero_infinity=False):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return torch.ops.bridge.ctc_loss(log_probs, targets, _lengths(input_lengths, log_probs),
                                     _lengths(target_lengths, log_probs), blank, reduction, zero_infinity)


@contextlib.contextmanager
def routing_ctc():
    """F.ctc_loss (which nn.CTCLoss calls) goes through bridge::ctc_loss while capturing."""
    F.ctc_loss = _routed
    try:
        yield
    finally:
        F.ctc_loss = _ORIGINAL


def read_masked_targets(gm: torch.fx.GraphModule) -> None:
    """bridge::ctc_loss fed by masked_select(labels, mask) reads (labels, mask) instead; the masked_select and
    what only measured or checked its data-dependent size go away."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.bridge.ctc_loss.default:
            continue
        picked = node.args[1]
        if not (isinstance(picked, torch.fx.Node) and picked.target is torch.ops.aten.masked_select.default):
            continue
        args = list(node.args) + [None] * (8 - len(node.args))
        args[1], args[7] = picked.args
        node.args, node.kwargs = tuple(args), {}
        changed = True
        erase_with_size_checks(gm.graph, picked)
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()


_CHECK_OPS = (torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default,
              torch.ops.aten.sym_constrain_range.default)
_SIZE_OPS = (torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.sym_not, torch.sym_max,
             torch.sym_min, torch.sym_ite, torch.sym_int, torch.sym_float)


def _size_arithmetic(n: torch.fx.Node) -> bool:
    """A size read or Python arithmetic on sizes (operator.ge, ...): pure, no tensor computed."""
    return n.op == "call_function" and (n.target in _SIZE_OPS or getattr(n.target, "__module__", "") == "_operator")


def erase_with_size_checks(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Remove `node` when what still uses it only measures its (data-dependent) size for torch's own range
    checks; those go too."""
    doomed: set[torch.fx.Node] = set()

    def only_checks(n: torch.fx.Node) -> bool:
        if n.target in _CHECK_OPS or n in doomed:
            doomed.add(n)
            return True
        if n is not node and not _size_arithmetic(n):
            return False
        if all(only_checks(u) for u in n.users):
            doomed.add(n)
            return True
        return False

    if only_checks(node):
        for n in reversed(list(graph.nodes)):   # users before what they use
            if n in doomed:
                graph.erase_node(n)

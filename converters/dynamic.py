"""Dynamic sizes: the `dynamic=` presets as torch.export specs, and the sizes a captured program holds static.

Example:
    >>> spec = dynamic_spec(model, (x,), {}, "batch")       # {'x': {0: Dim.AUTO}}
    >>> fixed_dims(ep, "batch")                             # [('x', 0, 2)] where the code fixes the batch
    >>> check_sizes([("x", meta.shape, (6, 2))], ep.range_constraints)   # InputError if the code needs <= 4
"""
from __future__ import annotations

import inspect

import sympy
import torch
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils._sympy.numbers import int_oo

from bridge.errors import CaptureError, InputError
from converters.caches import has_cache, is_cache

DYNAMIC_PRESETS = {"batch": (0,), "batch+seq": (0, 1)}


def dynamic_spec(module, args, kwargs, dynamic: str, sig: inspect.Signature | None = None):
    if dynamic not in DYNAMIC_PRESETS:
        raise CaptureError(f"dynamic={dynamic!r} is not one of {sorted(DYNAMIC_PRESETS)}")
    dims = DYNAMIC_PRESETS[dynamic]
    bound = (sig or inspect.signature(module.forward)).bind(*args, **kwargs)
    # a decode step (a cache among the inputs) is written with one new token: that size-1 dim stays static
    decode = has_cache(args, kwargs)

    def spec(name, value):
        if isinstance(value, torch.Tensor):
            out = {}
            for d in dims:
                if d < value.dim():
                    if value.shape[d] < 2 and decode:
                        continue
                    if value.shape[d] < 2:
                        raise CaptureError(
                            f"dynamic={dynamic!r}: input {name!r} has size {value.shape[d]} in dim {d}; "
                            "torch.export specializes sizes 0 and 1, use an example with size >= 2")
                    out[d] = Dim.AUTO
            return out or None
        if is_cache(value):   # its tensors (B, heads, length, dim): any size the code does not fix may vary
            return [{d: Dim.AUTO for d in range(t.dim()) if t.shape[d] >= 2}
                    for t in torch.utils._pytree.tree_leaves(value)]
        node = torch.utils._pytree.SUPPORTED_NODES.get(type(value))
        builtin = getattr(torch.utils._pytree, "BUILTIN_TYPES", (list, tuple, dict))
        if node is not None and type(value) not in builtin and not hasattr(value, "_fields"):
            # a registered class (ModelOutput, dataclass): torch.export matches its flattened children
            return [spec(f"{name}[{i}]", v) for i, v in enumerate(node.flatten_fn(value)[0])]
        if isinstance(value, (list, tuple)):
            specs = [spec(f"{name}[{i}]", v) for i, v in enumerate(value)]
            return type(value)(*specs) if hasattr(value, "_fields") else type(value)(specs)   # NamedTuples too
        if isinstance(value, dict):
            return {k: spec(f"{name}.{k}", v) for k, v in value.items()}
        return None

    return {name: spec(name, value) for name, value in bound.arguments.items()}


def fixed_dims(ep, dynamic: str) -> list[tuple[str, int, int]]:
    """(input, dim, size) of each dim `dynamic` asks to vary that the program holds static where it matters:
    at a size another input keeps variable in that dim (images tied to the tokens' batch), or where nothing
    varies at all. A size only the example shares (a cache's heads, a bias) is not named."""
    user = set(ep.graph_signature.user_inputs)
    shapes = [(n.name, n.meta["val"].shape) for n in ep.graph.nodes
              if n.op == "placeholder" and n.name in user and hasattr(n.meta.get("val"), "shape")]
    dims = DYNAMIC_PRESETS[dynamic]
    varying = {(d, shape[d].node.hint) for _, shape in shapes for d in dims
               if d < len(shape) and not is_concrete_int(shape[d])}
    anything = any(not is_concrete_int(size) for _, shape in shapes for size in shape)
    return [(name, d, int(shape[d])) for name, shape in shapes for d in dims
            if d < len(shape) and is_concrete_int(shape[d]) and int(shape[d]) >= 2
            and (not anything or (d, int(shape[d])) in varying)]


def fixed_text(fixed: list) -> str:
    return ", ".join(f"input {name!r} dim {d} (size {size})" for name, d, size in fixed)


def check_sizes(inputs, ranges: dict) -> None:
    """The dynamic sizes of a call, as the program was captured for them; else an InputError naming the input
    and dim. One size per symbol across inputs (torch.export found them equal: a mask's length and the
    tokens'), derived sizes (`2*s0`) equal to their expression, and each size in the range the model's code
    allowed at capture (`if x.shape[0] > 4` taken one way narrows the batch to [2, 4]). Sizes 0 and 1 below
    torch.export's default lower bound of 2 stay accepted. `inputs`: (name, captured shape, given shape)."""
    bound, derived = {}, []
    for name, want_shape, shape in inputs:
        for d, (want, got) in enumerate(zip(want_shape, shape)):
            if is_concrete_int(want) or not hasattr(want, "node"):
                continue
            expr = want.node.expr
            if not isinstance(expr, sympy.Symbol):
                derived.append((name, d, expr, got))
            elif expr in bound and bound[expr][0] != got:
                first = bound[expr]
                raise InputError(f"input {name!r} dim {d} has size {got}, but input {first[1]!r} dim {first[2]} has "
                                 f"{first[0]}: the model was captured with these sizes equal")
            else:
                bound.setdefault(expr, (got, name, d))
    values = {s: v[0] for s, v in bound.items()}
    for name, d, expr, got in derived:
        if expr.free_symbols <= values.keys():
            want = expr.subs(values)
            if want.is_Integer and int(want) != got:
                raise InputError(f"input {name!r} dim {d} has size {got}; the model was captured with it equal to "
                                 f"{expr} = {int(want)} from the other inputs' sizes")
    for sym, (got, name, d) in bound.items():
        r = ranges.get(sym)
        if r is None:
            continue
        lo, hi = r.lower, r.upper
        if (lo > 2 and got < lo) or (hi != int_oo and got > hi):
            span = f"[{lo}, {'inf' if hi == int_oo else hi}]"
            raise InputError(f"input {name!r} dim {d} has size {got}, outside {span}: a branch or index in the "
                             "model's code on this size held only in that range when it was captured; convert "
                             "again with an example in the range you need")

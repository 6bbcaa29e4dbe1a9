"""Checks on tensor values inside forward: `if (var < 0).any(): raise ValueError(...)`, `assert
torch.isfinite(x).all()`, Hugging Face's `if labels.max() >= vocab_size: raise`. A traced program cannot
branch on values, so torch.export refuses them, yet they only guard against bad input.

Where non-strict export fails on a value read inside the test of an `assert`, or of an `if` with a branch
that only raises, capture exports again stepping over that check (a line tracer jumps past it, as if it
passed, which it did for the example), until the export succeeds or fails on a value that decides real
computation (a branch, a loop count, a Python number), which is refused naming its source line. The
converted model does not raise on bad input (nothing can under jit); convert warns naming each check.
A loop that skips an empty selection (`if tok.numel() == 0: continue`, MoE expert loops) is stepped over the
same way: rows selected by a mask keep every row (converters/selected_rows.py), and on an empty selection
the rest of the body writes nothing.

Example:
    >>> ep, assumed = export_assuming_checks(lambda: torch.export.export(model, (x, var), strict=False))
    >>> assumed          # ['torch/nn/functional.py:3344  elif torch.any(var < 0):']
"""
from __future__ import annotations

import ast
import contextlib
import functools
import sys
import traceback

from bridge.errors import CaptureError

# frames of torch's own tracing machinery: never the site of a user's check
_MACHINERY = ("/torch/_", "/torch/fx/", "/torch/export/", "/torch/utils/", "/torch/overrides.py",
              "/converters/checks.py", "/converters/packed.py", "/converters/autograd_functions.py")
_MAX_CHECKS = 32


def export_assuming_checks(export):
    """(what `export()` returns once every check it fails on is stepped over, the checks stepped over); a
    value that is not a check raises CaptureError naming its line."""
    skips: dict[tuple[str, int], int] = {}   # (file, line of the check) → line execution continues at
    assumed: list[str] = []
    while True:
        try:
            with _stepping_over(skips):
                return export(), assumed
        except Exception as e:  # torch raises several types for a data-dependent value
            if "data-dependent" not in str(e).lower() or len(skips) >= _MAX_CHECKS:
                raise
            path, line, node = _failing_condition(e.__traceback__)
            where = _describe(path, line)
            if node is None or not _is_check(node):
                raise CaptureError("a value read from a tensor decides more than a check that raises, "
                                   f"at {where}{_loop_hint(path, line)}") from e
            target = _continue_at(path, node)
            if target is None or (path, node.lineno) in skips:
                raise CaptureError(f"cannot step over the check at {where}") from e
            skips[(path, node.lineno)] = target
            assumed.append(where + ("  (assumed not empty: the loop body writes nothing for no rows)"
                                    if _skips_empty(node) else ""))


@contextlib.contextmanager
def _stepping_over(skips: dict[tuple[str, int], int]):
    """While inside: execution reaching a skipped check's line jumps to where it continues."""
    files = {path for path, _ in skips}

    def local(frame, event, arg):
        if event == "line":
            path, line = frame.f_code.co_filename, frame.f_lineno
            while (path, line) in skips:   # a check right after a check: no line event fires between jumps
                line = skips[(path, line)]
            if line != frame.f_lineno:
                frame.f_lineno = line
        return local

    def on_call(frame, event, arg):
        return local if frame.f_code.co_filename in files else None

    previous = sys.gettrace()
    sys.settrace(on_call if skips else previous)
    try:
        yield
    finally:
        sys.settrace(previous)


def _failing_condition(tb):
    """(file, line, condition node or None) of the innermost frame of the failure outside torch's machinery
    whose line lies in a condition's test (else the innermost such frame, with None)."""
    frames = [(f.filename, f.lineno) for f in traceback.extract_tb(tb)
              if not any(m in f.filename for m in _MACHINERY)][::-1]
    for path, line in frames:
        node = _condition_at(path, line)
        if node is not None:
            return path, line, node
    return (*frames[0], None) if frames else ("<unknown>", 0, None)


def _continue_at(path: str, node) -> int | None:
    """The line that runs next when the check passes: the other branch of an `if`, or the statement after it
    (None where that would leave a loop body or the function)."""
    if isinstance(node, ast.If):
        if _raises_only(node.body) and node.orelse and not _raises_only(node.orelse):
            return node.orelse[0].lineno
        if _raises_only(node.orelse):
            return node.body[0].lineno
    parents = _parents(path)
    while True:
        parent = parents.get(node)
        if parent is None:
            return None
        for block in (getattr(parent, f, None) for f in ("body", "orelse", "finalbody")):
            if isinstance(block, list) and node in block and block.index(node) + 1 < len(block):
                return block[block.index(node) + 1].lineno
        if not isinstance(parent, (ast.If, ast.With, ast.Try)):   # the end of a loop body or a function
            return None
        node = parent


@functools.lru_cache(maxsize=64)
def _parents(path: str) -> dict:
    tree = _tree(path)
    if tree is None:
        return {}
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


@functools.lru_cache(maxsize=64)
def _tree(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None


def _condition_at(path: str, line: int):
    """The innermost assert/if/while/conditional expression whose test spans `line` in `path`."""
    best = None
    for node in _conditions(path):
        test = node.test
        if test.lineno <= line <= (test.end_lineno or test.lineno):
            if best is None or (test.end_lineno - test.lineno) <= (best.test.end_lineno - best.test.lineno):
                best = node
    return best


@functools.lru_cache(maxsize=64)
def _conditions(path: str) -> tuple:
    tree = _tree(path)
    kinds = (ast.If, ast.Assert, ast.While, ast.IfExp)
    return () if tree is None else tuple(n for n in ast.walk(tree) if isinstance(n, kinds))


def _loop_hint(path: str, line: int) -> str:
    """For `for e in mask.nonzero():` (a trip count read from a tensor): how to write the loop instead."""
    tree = _tree(path)
    loops = [] if tree is None else [n for n in ast.walk(tree) if isinstance(n, ast.For)
                                     and n.iter.lineno <= line <= (n.iter.end_lineno or n.iter.lineno)]
    if not loops:
        return ""
    return ("\nhint: the loop's trip count is read from a tensor; loop over every candidate instead "
            "(`for e in range(num_experts):`) and select inside (`slot, tok = torch.where(mask[e])`): rows of an "
            "empty selection write nothing")


def _raises_only(block: list) -> bool:
    """A block that ends in `raise` and does nothing else but call (log, warn) on the way."""
    return bool(block) and isinstance(block[-1], ast.Raise) and all(isinstance(s, ast.Expr) for s in block[:-1])


def _is_check(node) -> bool:
    if isinstance(node, ast.Assert):
        return True
    return isinstance(node, ast.If) and (_raises_only(node.body) or _raises_only(node.orelse) or _skips_empty(node))


_COUNTS = ("numel", "size", "shape", "len", "nelement")


def _skips_empty(node) -> bool:
    """`if rows.numel() == 0: continue` (also `.shape[0]`, `.size(0)`, `len(rows)`, `not rows.numel()`): a loop
    that skips an empty selection, as MoE expert loops do. Rows selected by a mask keep every row (see
    converters/selected_rows.py), so running the rest of the body on an empty selection writes nothing."""
    if not isinstance(node, ast.If) or node.orelse or len(node.body) != 1 or not isinstance(node.body[0], ast.Continue):
        return False
    return _tests_empty(node.test)


def _tests_empty(test) -> bool:
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):   # `if flag and rows.numel() == 0`
        return any(_tests_empty(v) for v in test.values)
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        counted = test.operand
    elif (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], (ast.Eq, ast.LtE))
          and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == 0):
        counted = test.left
    else:
        return False
    return any((getattr(n, "attr", None) or getattr(n, "id", None)) in _COUNTS
               for n in ast.walk(counted) if isinstance(n, (ast.Attribute, ast.Name)))


def _describe(path: str, line: int) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().splitlines()[line - 1].strip()
    except (OSError, IndexError):
        text = ""
    short = path.split("site-packages/")[-1]
    return f"{short}:{line}  {text}"

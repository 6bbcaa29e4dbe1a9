"""Errors raised to users. Each message names the file, key, op or shape at fault.

Example:
    >>> try:
    ...     bridge.convert(model, (x,))
    ... except bridge.errors.UnsupportedOpsError as e:
    ...     print(e.missing)        # {'aten.foo.default': (count, ['model.py:12 ...'])}
"""
from __future__ import annotations


class BridgeError(Exception):
    """Base class of every error bridge raises on purpose."""


class CaptureError(BridgeError):
    """torch.export could not capture the module (both strict and non-strict failed)."""


class UnsupportedOpsError(BridgeError):
    """The graph uses ATen ops with no lowering; lists every one with count and source lines.

    `missing` maps the op name to `(count, [source lines])`.
    """

    def __init__(self, missing: dict[str, tuple[int, list[str]]]):
        self.missing = missing
        lines = [f"{len(missing)} unsupported op(s); no JAX lowering is registered for:"]
        for op, (count, sources) in sorted(missing.items()):
            lines.append(f"  {op}  (used {count}x)")
            lines.extend(f"      at {src}" for src in sources)
        lines.append("hint: bridge.register_lowering(op, fn) gives bridge a JAX implementation of an op")
        super().__init__("\n".join(lines))


class DuplicateLoweringError(BridgeError):
    """Two lowerings were registered for the same ATen overload."""


class LoweringError(BridgeError):
    """A lowering failed while tracing; names the op, its source line and input shapes."""


class InputError(BridgeError):
    """Inputs passed to `apply` do not match the exported signature (names, count or shapes)."""


class MissingRngError(BridgeError):
    """The program draws random numbers (dropout, rand...) and no `rng` key was given."""


class StateError(BridgeError):
    """params/buffers passed to `apply` miss keys or carry unexpected ones."""


class CheckpointError(BridgeError):
    """A checkpoint file or directory is unreadable, corrupt, unsafe or missing; names the file and fault."""


class KeyMismatchError(BridgeError):
    """Checkpoint keys do not fit the model: lists every missing, unexpected, shape- and dtype-mismatched key.

    `report` is the same `KeyReport` that `strict=False` returns.
    """

    def __init__(self, report, source: str = ""):
        self.report = report
        super().__init__(f"weights from {source or 'the given state'} do not fit the model:\n{report}")


class ExportError(BridgeError):
    """An export could not be written (missing or read-only target, unsupported format); nothing was left behind."""


class NonFiniteLossError(BridgeError):
    """Training produced a NaN/Inf loss; names the step and the last good checkpoint."""


class UnsupportedModuleError(BridgeError):
    """The structural (NNX) path has no rule for a module, or for one of its settings.

    Names the module type, its dotted path in the model and why; `to_flax(..., fallback="graph")`
    converts such modules through the graph path instead.
    """

    def __init__(self, module_type: str, path: str, reason: str = "no structural rule for this module type"):
        self.module_type, self.path, self.reason = module_type, path, reason
        super().__init__(f"{module_type} at '{path or '<root>'}': {reason}")

"""bridge: PyTorch models into JAX, trained there at scale, and weights back to PyTorch.

Example:
    >>> import bridge
    >>> jm = bridge.convert(model, (x,))
"""
from importlib import import_module

from bridge import errors

_EXPORTS = {
    "convert": "bridge.conversion",
    "JaxModule": "bridge.jax_module",
    "parity_report": "bridge.parity",
}
__all__ = ["errors", *_EXPORTS]


def __getattr__(name: str):  # re-exports, imported on first use so `import bridge.errors` stays light
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bridge' has no attribute {name!r}")

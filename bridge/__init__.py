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
    "load_weights": "bridge.checkpoint",
    "iter_weights": "bridge.checkpoint",
    "to_state_dict": "bridge.state",
    "export": "bridge.exporter",
    "empty_weights": "bridge.meta_init",
    "to_flax": "converters.nnx",
    "from_flax": "converters.nnx",
    "as_jax_inputs": "converters.structure",
    "static_cache": "converters.model_conventions",
    "register_lowering": "converters.registry",
    "PackedInput": "converters.packed",
}
__all__ = ["errors", *_EXPORTS]


def __getattr__(name: str):  # re-exports, imported on first use so `import bridge.errors` stays light
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bridge' has no attribute {name!r}")

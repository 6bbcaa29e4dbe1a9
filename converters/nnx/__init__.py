"""Structural path: torch layers → idiomatic Flax NNX modules, weights moved by one invertible table.

Example:
    >>> from converters.nnx import to_flax, from_flax
    >>> fm = to_flax(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU()))
    >>> fm.layers[0].kernel.shape          # (in, out)
    (4, 8)
"""
from converters.nnx.convert import from_flax, to_flax
from converters.nnx.layouts import TABLE, render

__all__ = ["to_flax", "from_flax", "TABLE", "render"]

"""The one table of layout rules between torch layers and Flax NNX modules.

Each row says: torch layer type(s), the torch state name, the NNX module type, the NNX variable
path(s), and the steps that turn the torch tensor into the NNX value(s). Every step is a small
invertible transformation (`forward` torch → flax, `inverse` flax → torch); export runs the same
steps backwards, so import and export can never drift apart. All steps move or slice data only
(transpose, flip, split, reshape): both directions are bit-exact.

Example:
    >>> rows_for_torch(torch.nn.Conv3d)[0]
    Row(torch=(Conv1d, Conv2d, Conv3d), name='weight', flax=Conv, paths=('kernel',), steps=(MoveAxes(...),))
    >>> print(render())          # the markdown table in docs/flax.md
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import torch
from flax import nnx
from torch import nn

# -- steps: tiny invertible transformations, composed by a row (optax-style chain) -------------------


@dataclasses.dataclass(frozen=True)
class MoveAxes:
    """moveaxis(src → dst); inverse moves them back. (O, I, *K) → (*K, I, O) is src=(0, 1), dst=(-1, -2)."""
    src: tuple[int, ...]
    dst: tuple[int, ...]

    def forward(self, xs, module):
        return tuple(jnp.moveaxis(x, self.src, self.dst) for x in xs)

    def inverse(self, ys, module):
        return tuple(jnp.moveaxis(y, self.dst, self.src) for y in ys)

    def __str__(self):
        return f"moveaxis {self.src}→{self.dst}"


@dataclasses.dataclass(frozen=True)
class Flip:
    """Reverse every axis from `start` on (a transposed convolution's spatial taps); its own inverse."""
    start: int

    def forward(self, xs, module):
        return tuple(jnp.flip(x, tuple(range(self.start, x.ndim))) for x in xs)

    inverse = forward

    def __str__(self):
        return f"flip axes {self.start}:"


@dataclasses.dataclass(frozen=True)
class Split:
    """One tensor → `parts` equal chunks along `axis` (torch's packed q/k/v); inverse concatenates."""
    parts: int
    axis: int = 0

    def forward(self, xs, module):
        (x,) = xs
        return tuple(jnp.split(x, self.parts, axis=self.axis))

    def inverse(self, ys, module):
        return (jnp.concatenate(ys, axis=self.axis),)

    def __str__(self):
        return f"split {self.parts} on axis {self.axis}"


@dataclasses.dataclass(frozen=True)
class Unflatten:
    """Axis `axis` of size a·b → (a, b) with a = the NNX module's attribute `size` (e.g. num_heads);
    inverse merges the two axes back."""
    axis: int
    size: str

    def forward(self, xs, module):
        n = getattr(module, self.size)
        return tuple(x.reshape(x.shape[:self.axis] + (n, -1) + x.shape[self.axis + 1:]) for x in xs)

    def inverse(self, ys, module):
        return tuple(y.reshape(y.shape[:self.axis] + (-1,) + y.shape[self.axis + 2:]) for y in ys)

    def __str__(self):
        return f"unflatten axis {self.axis} into ({self.size}, -1)"


# -- rows ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    torch: tuple[type, ...]          # torch layer types the row applies to
    name: str                        # torch state_dict name inside the layer
    flax: type                       # NNX module type
    paths: tuple[str, ...]           # NNX variable path(s), '.'-joined
    steps: tuple = ()                # torch → flax, applied in order; flax → torch in reverse
    dtype: torch.dtype | None = None  # torch dtype to restore on export (None: the array's own)
    when: Callable[[nnx.Module], bool] | None = None  # export only when true of the NNX module

    def to_flax(self, tensor, module) -> tuple:
        xs = (tensor,)
        for step in self.steps:
            xs = step.forward(xs, module)
        return xs

    def to_torch(self, values, module):
        ys = tuple(values)
        for step in reversed(self.steps):
            ys = step.inverse(ys, module)
        (y,) = ys
        return y


KERNEL = (MoveAxes((0, 1), (-1, -2)),)                  # (O, I, *K) → (*K, I, O); Linear (O, I) → (I, O)
TRANSPOSED_KERNEL = (Flip(2), MoveAxes((0, 1), (-2, -1)))  # (I, O, *K) → flipped (*K, I, O)
HEADS_IN = (MoveAxes((0,), (-1,)), Unflatten(1, "num_heads"))   # (H·D, E) → (E, H, D)
HEADS_OUT = (MoveAxes((0,), (-1,)), Unflatten(0, "num_heads"))  # (E, H·D) → (H, D, E)
QKV = ("query", "key", "value")


def _packed(m) -> bool:
    return m.in_kv_features == m.in_features


def _separate(m) -> bool:
    return not _packed(m)


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MHA = (nn.MultiheadAttention,)

# Rows of one torch type are listed in torch's state_dict order, so exports keep it.
TABLE: tuple[Row, ...] = (
    Row((nn.Linear,), "weight", nnx.Linear, ("kernel",), KERNEL),
    Row((nn.Linear,), "bias", nnx.Linear, ("bias",)),
    Row(_CONV, "weight", nnx.Conv, ("kernel",), KERNEL),
    Row(_CONV, "bias", nnx.Conv, ("bias",)),
    Row(_CONVT, "weight", nnx.ConvTranspose, ("kernel",), TRANSPOSED_KERNEL),
    Row(_CONVT, "bias", nnx.ConvTranspose, ("bias",)),
    Row((nn.Embedding,), "weight", nnx.Embed, ("embedding",)),
    Row((nn.LayerNorm,), "weight", nnx.LayerNorm, ("scale",)),
    Row((nn.LayerNorm,), "bias", nnx.LayerNorm, ("bias",)),
    Row((nn.RMSNorm,), "weight", nnx.RMSNorm, ("scale",)),
    Row((nn.GroupNorm,), "weight", nnx.GroupNorm, ("scale",)),
    Row((nn.GroupNorm,), "bias", nnx.GroupNorm, ("bias",)),
    Row(_BN, "weight", nnx.BatchNorm, ("scale",)),
    Row(_BN, "bias", nnx.BatchNorm, ("bias",)),
    Row(_BN, "running_mean", nnx.BatchNorm, ("mean",)),
    Row(_BN, "running_var", nnx.BatchNorm, ("var",)),
    Row(_BN, "num_batches_tracked", nnx.BatchNorm, ("num_batches_tracked",), dtype=torch.long),
    Row((nn.PReLU,), "weight", nnx.PReLU, ("negative_slope",)),
    Row(_MHA, "in_proj_weight", nnx.MultiHeadAttention, tuple(f"{p}.kernel" for p in QKV),
        (Split(3),) + HEADS_IN, when=_packed),
    *(Row(_MHA, f"{p[0]}_proj_weight", nnx.MultiHeadAttention, (f"{p}.kernel",), HEADS_IN, when=_separate)
      for p in QKV),
    Row(_MHA, "in_proj_bias", nnx.MultiHeadAttention, tuple(f"{p}.bias" for p in QKV),
        (Split(3), Unflatten(0, "num_heads"))),
    Row(_MHA, "out_proj.weight", nnx.MultiHeadAttention, ("out.kernel",), HEADS_OUT),
    Row(_MHA, "out_proj.bias", nnx.MultiHeadAttention, ("out.bias",)),
)


def _lookup(cls: type, key) -> tuple[Row, ...]:
    for base in cls.__mro__:
        rows = tuple(r for r in TABLE if key(r, base))
        if rows:
            return rows
    return ()


def rows_for_torch(cls: type) -> tuple[Row, ...]:
    """Rows of the nearest torch base class of `cls` that has rules."""
    return _lookup(cls, lambda r, base: base in r.torch)


def rows_for_flax(cls: type) -> tuple[Row, ...]:
    """Rows of the nearest NNX base class of `cls` that has rules."""
    return _lookup(cls, lambda r, base: r.flax is base)


def render() -> str:
    """The table as markdown (docs/flax.md embeds this output)."""
    lines = ["| torch layer | torch name | NNX module | NNX path | torch → NNX |", "|---|---|---|---|---|"]
    for r in TABLE:
        steps = "; ".join(map(str, r.steps)) or "identity"
        if r.dtype is not None:
            steps += f" (exported as {str(r.dtype).replace('torch.', '')})"
        if r.when is not None:
            steps += f" [{r.when.__name__.strip('_')} q/k/v]"
        lines.append(f"| {', '.join(t.__name__ for t in r.torch)} | `{r.name}` | `nnx.{r.flax.__name__}` | "
                     f"{', '.join(f'`{p}`' for p in r.paths)} | {steps} |")
    return "\n".join(lines)

"""NNX modules with torch semantics where Flax's own differ or are missing.

Everything is channels-last, as in Flax: a torch (N, C, H, W) activation is (N, H, W, C) here.
Subclasses keep Flax's variable names (`kernel`, `scale`, `mean`, ...) so the layout table and
Flax tooling treat them as the stock layers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bridge.errors import UnsupportedModuleError

# -- activations ----------------------------------------------------------------------------------


def softplus(x, beta=1.0, threshold=20.0):
    """torch.nn.Softplus: linear above `threshold` (in units of beta·x)."""
    return jnp.where(x * beta > threshold, x, jax.nn.softplus(x * beta) / beta)


def mish(x):
    return x * jnp.tanh(jax.nn.softplus(x))


def hardtanh(x, min_val=-1.0, max_val=1.0):
    return jnp.clip(x, min_val, max_val)


def tanhshrink(x):
    return x - jnp.tanh(x)


def softshrink(x, lambd=0.5):
    return jnp.where(x > lambd, x - lambd, jnp.where(x < -lambd, x + lambd, jnp.zeros_like(x)))


def hardshrink(x, lambd=0.5):
    return jnp.where(jnp.abs(x) > lambd, x, jnp.zeros_like(x))


def threshold(x, threshold=0.0, value=0.0):
    return jnp.where(x > threshold, x, jnp.full_like(x, value))


def softmin(x, axis=-1):
    return jax.nn.softmax(-x, axis=axis)


class Activation(nnx.Module):
    """A stateless function with its settings, e.g. `Activation(jax.nn.gelu, approximate=False)`."""

    def __init__(self, fn, channels_last: bool = False, **settings):
        self.fn, self.channels_last = fn, channels_last
        self.settings = tuple(sorted(settings.items()))

    def __call__(self, x):
        settings = dict(self.settings)
        if "axis" in settings and self.channels_last:   # torch's dim of (N, C, *spatial) on (N, *spatial, C)
            settings["axis"] = channels_last_axis(settings["axis"], x.ndim)
        return self.fn(x, **settings)

    def __repr__(self):
        args = "".join(f", {k}={v!r}" for k, v in self.settings)
        return f"Activation({getattr(self.fn, '__name__', self.fn)}{args})"


def channels_last_axis(axis: int, ndim: int) -> int:
    """torch's dim of an (N, C, *spatial) tensor as the axis of its (N, *spatial, C) layout (ndim > 2)."""
    if ndim <= 2:
        return axis
    axis %= ndim
    return ndim - 1 if axis == 1 else axis - 1 if axis > 1 else axis


class PReLU(nnx.PReLU):
    """nnx.PReLU whose slope has torch's shape: (1,) or one per channel (torch's dim 1: the last axis of a
    channels-last feature map or of (N, C), axis 1 of (N, C, L) where the model keeps torch's layout)."""
    channels_last: bool = True

    def __call__(self, x):
        slope = self.negative_slope[...].astype(x.dtype)
        axis = x.ndim - 1 if self.channels_last or x.ndim <= 2 else 1
        slope = slope.reshape(tuple(-1 if i == axis else 1 for i in range(x.ndim)))
        return jnp.where(x >= 0, x, slope * x)


# -- layers whose torch semantics nnx lacks -------------------------------------------------------


class Conv(nnx.Conv):
    """nnx.Conv that first pads with torch's 'reflect' / 'replicate' / 'circular' padding modes."""

    def __init__(self, *args, pad_width, padding_mode, **kwargs):
        super().__init__(*args, padding="VALID", **kwargs)
        self.pad_width = tuple(pad_width)
        self.padding_mode = padding_mode          # numpy name: 'reflect', 'edge' or 'wrap'

    def __call__(self, x, out_sharding=None):
        x = jnp.pad(x, ((0, 0), *self.pad_width, (0, 0)), mode=self.padding_mode)
        return super().__call__(x, out_sharding=out_sharding)


class BatchNorm(nnx.BatchNorm):
    """nnx.BatchNorm with torch's statistics: the running variance takes the unbiased batch variance,
    `momentum` is Flax's decay (0.9 ⇔ torch 0.1; None ⇔ torch's cumulative average), and
    `num_batches_tracked` counts train steps. Without running stats (torch track_running_stats=False)
    batch statistics are used in both modes."""

    def __init__(self, num_features, *, momentum, track_running_stats=True, **kwargs):
        super().__init__(num_features, momentum=0.0 if momentum is None else momentum,
                         use_fast_variance=False, **kwargs)
        self.momentum = momentum
        if track_running_stats:
            self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
        else:
            self.mean = self.var = self.num_batches_tracked = nnx.data(None)

    def __call__(self, x, use_running_average=None, *, mask=None):
        tracking = self.num_batches_tracked is not None
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        axes = tuple(range(x.ndim - 1))
        if use_ra and tracking:
            mean, var = self.mean[...], self.var[...]
        else:
            mean = x.mean(axes, keepdims=True)
            var = jnp.square(x - mean).mean(axes, keepdims=True)
            if tracking:
                n = x.size // x.shape[-1]
                self.num_batches_tracked[...] += 1
                if self.momentum is None:
                    rate = 1.0 / self.num_batches_tracked[...].astype(mean.dtype)
                else:
                    rate = 1.0 - self.momentum
                self.mean[...] = (1 - rate) * self.mean[...] + rate * mean.reshape(-1)
                self.var[...] = (1 - rate) * self.var[...] + rate * var.reshape(-1) * (n / max(n - 1, 1))
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        return nnx.nn.normalization._normalize(x, mean, var, scale, bias, axes, (-1,), self.dtype, self.epsilon)


class Embed(nnx.Embed):
    """nnx.Embed with torch's `padding_idx`: that row gets no gradient."""

    def __init__(self, *args, padding_idx: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.padding_idx = padding_idx

    def __call__(self, inputs, out_sharding=None):
        if self.padding_idx is None:
            return super().__call__(inputs, out_sharding=out_sharding)
        table = self.embedding[...]
        frozen = (jnp.arange(table.shape[0]) == self.padding_idx)[:, None]
        table = jnp.where(frozen, jax.lax.stop_gradient(table), table)
        return jnp.take(table, inputs, axis=0)


class Flatten(nnx.Module):
    """torch.nn.Flatten. With `channels_last` the input is (N, *spatial, C) and the result has torch's
    (C, *spatial) order, so a Linear after it keeps its torch weights."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1, channels_last: bool = False):
        self.start_dim, self.end_dim, self.channels_last = start_dim, end_dim, channels_last

    def __call__(self, x):
        if self.channels_last and x.ndim > 2:
            x = jnp.moveaxis(x, -1, 1)
        start, end = self.start_dim % x.ndim, self.end_dim % x.ndim
        y = x.reshape(x.shape[:start] + (-1,) + x.shape[end + 1:])
        if self.channels_last and x.ndim > 2 and start > 1:
            y = jnp.moveaxis(y, 1, -1)
        return y


class Dict(nnx.Dict):
    """nnx.Dict that iterates in torch's order (nnx transforms re-set attributes alphabetically)."""

    def __init__(self, mapping=None, /, **kwargs):
        items = dict(mapping or {}, **kwargs)
        self._order = tuple(items)
        super().__init__(items)

    def __iter__(self):
        keys = [k for k in vars(self) if not k.startswith("_")]
        return iter([k for k in self._order if k in keys] + [k for k in keys if k not in self._order])


class NamedSequential(Dict):
    """torch.nn.Sequential with named children (an OrderedDict): applied in torch's order."""

    def __call__(self, x):
        for name in self:
            x = self[name](x)
        return x


class Mirror(nnx.Module):
    """A torch module with custom Python `forward`, mirrored: same child names, converted children.

    `bridge.to_flax(model, forwards={TorchClass: fn})` makes `fn(self, *args)` its `__call__`;
    without one, calling it raises, naming the type and path.
    """

    def __init__(self, torch_type: str, path: str, torch_names: tuple[str, ...] = ()):
        self.torch_type, self.torch_path = torch_type, path
        self.torch_names = torch_names        # children and own tensors, in torch's state_dict order

    def __call__(self, *args, **kwargs):
        raise UnsupportedModuleError(self.torch_type, self.torch_path,
                                     "its forward is custom Python; pass forwards={cls: fn} to to_flax "
                                     "with fn(self, *args) mirroring it, or fallback='graph'")

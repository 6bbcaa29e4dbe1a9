"""A user's torch.library custom ops convert: traced through their Python implementation, with the backward
`register_autograd` gave them; one whose implementation is not torch code takes `bridge.register_lowering`."""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bridge
from bridge.errors import DuplicateLoweringError, LoweringError
from bridge.tree import flatten
from converters.dtypes import to_jax
from tests.conftest import GRAD_TOL, assert_close, rel_err


@torch.library.custom_op("bridge_test::gelu_mul", mutates_args=())
def gelu_mul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """No autograd registered: JAX differentiates the implementation."""
    return torch.nn.functional.gelu(x) * y


gelu_mul.register_fake(lambda x, y: torch.empty_like(x))


@torch.library.custom_op("bridge_test::ste_round", mutates_args=())
def ste_round(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Straight-through rounding: the implementation's own gradient is zero, the registered one the identity."""
    return torch.round(x * scale) / scale


ste_round.register_fake(lambda x, scale: torch.empty_like(x))
ste_round.register_autograd(lambda ctx, g: (g, None))


@torch.library.custom_op("bridge_test::combine", mutates_args=())
def combine(xs: list[torch.Tensor], w: Optional[torch.Tensor], *, p: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    s = sum(x ** p for x in xs)
    s = s if w is None else s * w
    return s, s.sum(-1)


@combine.register_fake
def _(xs, w, *, p=2):
    return torch.empty_like(xs[0]), xs[0].new_empty(xs[0].shape[:-1])


def _combine_setup(ctx, inputs, keyword_only_inputs, output):
    xs, w = inputs
    ctx.save_for_backward(*xs, w)
    ctx.p = keyword_only_inputs["p"]


def _combine_backward(ctx, g, g_sum):
    *xs, w = ctx.saved_tensors
    g = g + g_sum[..., None]
    # half the true gradient for xs (so the test sees the registered backward), w's unreduced over the batch
    return [0.5 * ctx.p * x ** (ctx.p - 1) * g * w for x in xs], g * sum(x ** ctx.p for x in xs)


combine.register_autograd(_combine_backward, setup_context=_combine_setup)


@torch.library.custom_op("bridge_test::numpy_sin", mutates_args=())
def numpy_sin(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.sin(x.detach().numpy()))


numpy_sin.register_fake(lambda x: torch.empty_like(x))
numpy_sin.register_autograd(lambda ctx, g: g * torch.cos(ctx.saved_tensors[0]),
                            setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]))


@torch.library.custom_op("bridge_test::rms_norm_into", mutates_args=("out",))
def rms_norm_into(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Writes into `out` (as kernel libraries' `out` buffers do) and returns the mean square too."""
    ms = x.pow(2).mean(-1, keepdim=True)
    out.copy_(x * torch.rsqrt(ms + eps) * w)
    return ms[..., 0]


rms_norm_into.register_fake(lambda out, x, w, eps: x.new_empty(x.shape[:-1]))


class WritesIntoSlice(torch.nn.Module):
    def __init__(self, plain=False):
        super().__init__()
        self.plain = plain
        self.lin = torch.nn.Linear(8, 8)
        self.w = torch.nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        h = self.lin(x)
        buf = torch.ones(x.shape[0], 12)
        if self.plain:   # the same computation in torch ops (the custom op has no autograd)
            ms = h.pow(2).mean(-1, keepdim=True)
            buf = torch.cat([buf[:, :2], h * torch.rsqrt(ms + 1e-6) * self.w, buf[:, 10:]], 1)
            return buf, ms[..., 0]
        ms = rms_norm_into(buf[:, 2:10], h, self.w, 1e-6)
        return buf, ms


def test_custom_op_writing_into_its_arguments():
    module, x = WritesIntoSlice(), torch.randn(3, 8)
    jm = bridge.convert(module, (x,), dynamic="batch")
    with torch.no_grad():
        ref = module(x)
    got = jax.jit(jm.apply)(jm.params, to_jax(x))
    for g, r in zip(got, ref):
        assert_close(g, r)
    plain = WritesIntoSlice(plain=True)
    plain.load_state_dict(module.state_dict())
    ref, w, grads = _torch_reference(plain, x)
    jgrads = flatten(jax.grad(lambda p: sum(jnp.sum(o * to_jax(wi)) for o, wi in zip(jm.apply(p, to_jax(x)), w)))(
        jm.params))
    _assert_grads(jgrads, grads)


class Net(torch.nn.Module):
    def __init__(self, ops):
        super().__init__()
        self.ops = ops
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.w = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.ops == "gelu_mul":
            return gelu_mul(a, b)
        if self.ops == "ste_combine":
            return combine([ste_round(a, 4.0), b], self.w, p=2)
        return numpy_sin(a)


def _torch_reference(module, x):
    """Outputs and parameter gradients (of a weighted sum) in torch; gelu_mul has no autograd, so its
    implementation is called directly."""
    module.zero_grad()
    if getattr(module, "ops", None) == "gelu_mul":
        out = (gelu_mul._init_fn(module.a(x), module.b(x)),)
    else:
        out = module(x)
        out = out if isinstance(out, tuple) else (out,)
    w = [torch.randn(o.shape) for o in out]
    sum((o * wi).sum() for o, wi in zip(out, w)).backward()
    return [o.detach() for o in out], w, {n: p.grad for n, p in module.named_parameters()}


def _assert_grads(got, ref):
    for n, g in ref.items():   # None: a parameter the op does not read
        assert rel_err(got[n], torch.zeros(got[n].shape) if g is None else g) <= GRAD_TOL, n


@pytest.mark.parametrize("ops", ["gelu_mul", "ste_combine"])
def test_custom_ops_forward_and_gradients(ops):
    module = Net(ops)
    x = torch.randn(2 if ops == "gelu_mul" else 5, 8)
    jm = bridge.convert(module, (x,), dynamic="batch")
    ref, w, grads = _torch_reference(module, x)
    got = jax.jit(jm.apply)(jm.params, to_jax(x))
    for g, r in zip(jax.tree.leaves(got), ref):
        assert_close(g, r, what=ops)

    def loss(p):
        out = jax.tree.leaves(jm.apply(p, to_jax(x)))
        return sum(jnp.sum(o * to_jax(wi)) for o, wi in zip(out, w))

    jgrads = flatten(jax.jit(jax.grad(loss))(jm.params))
    _assert_grads(jgrads, grads)
    if ops == "ste_combine":   # the registered backward, not the implementation's derivative, reached `a`
        assert float(np.abs(np.asarray(jgrads["a.weight"])).max()) > 0.1


def test_untraceable_implementation_names_the_op_and_takes_a_registered_lowering():
    module, x = Net("numpy_sin"), torch.randn(3, 8)
    jm = bridge.convert(module, (x,))
    with pytest.raises(LoweringError, match=r"bridge_test::numpy_sin.*\n.*register_lowering\('bridge_test::numpy_sin'"):
        jm.apply(jm.params, to_jax(x))

    bridge.register_lowering(numpy_sin, jnp.sin)
    with pytest.raises(DuplicateLoweringError, match="bridge_test.numpy_sin.default"):
        bridge.register_lowering("bridge_test::numpy_sin", jnp.cos)
    jm = bridge.convert(module, (x,))
    ref, w, grads = _torch_reference(module, x)
    assert_close(jax.jit(jm.apply)(jm.params, to_jax(x)), ref[0])
    _assert_grads(flatten(jax.grad(lambda p: jnp.sum(jm.apply(p, to_jax(x)) * to_jax(w[0])))(jm.params)), grads)

"""User torch.autograd.Functions keep their own backward and gradient hooks forward registers still run:
JAX gradients are torch autograd's, not the derivative of the forward alone."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import bridge
from bridge.tree import flatten


class STE(torch.autograd.Function):          # straight-through rounding (quantization-aware training)
    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, g):
        return g


class GradReverse(torch.autograd.Function):  # domain-adversarial training: a non-tensor argument on ctx
    @staticmethod
    def forward(ctx, x, alpha):
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.alpha * g, None


class PairOps(torch.autograd.Function):     # two outputs, saved inputs, a scaled custom gradient
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b, a + b

    @staticmethod
    def backward(ctx, g_prod, g_sum):
        a, b = ctx.saved_tensors
        return 2 * g_prod * b + g_sum, g_prod * a


class ClipGrad(torch.autograd.Function):    # functorch style: forward without ctx, setup_context
    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mask = inputs[0] > 0                  # a tensor kept as a ctx attribute

    @staticmethod
    def backward(ctx, g):
        return g.clamp(-0.05, 0.05) * ctx.mask


class Scaled(torch.autograd.Function):      # backward gives None for a differentiable input
    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x * scale

    @staticmethod
    def backward(ctx, g):
        (scale,) = ctx.saved_tensors
        return g * scale, None


class TripleGrad(torch.autograd.Function):  # its forward calls another Function: the outer backward rules
    @staticmethod
    def forward(ctx, x):
        return STE.apply(x) + 1

    @staticmethod
    def backward(ctx, g):
        return 3 * g


class MaskedSoftmax(torch.autograd.Function):   # DeBERTa's XSoftmax: in-place ops on its own intermediates
    @staticmethod
    def forward(ctx, x, mask):
        out = x.masked_fill(~mask, torch.finfo(x.dtype).min).softmax(-1)
        out.masked_fill_(~mask, 0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        grad = out * (g - (g * out).sum(-1, keepdim=True))
        grad.mul_(2.0)   # in place in the backward too (and a scale no derivative of the forward has)
        return grad, None


class Net(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a = torch.nn.Linear(6, 5)
        self.b = torch.nn.Linear(6, 5)
        self.scale = torch.nn.Parameter(torch.full((5,), 1.5))

    def forward(self, x):
        h, k = self.a(x), self.b(x)
        if self.kind == "ste":
            y = STE.apply(h)
        elif self.kind == "grad_reverse":
            y = GradReverse.apply(h, 0.5) + k
        elif self.kind == "two_outputs":
            p, s = PairOps.apply(h, k)
            y = p + s.sin()
        elif self.kind == "nested":
            y = TripleGrad.apply(h)
        elif self.kind == "setup_context":
            y = ClipGrad.apply(h) * k
        elif self.kind == "in_place":
            y = MaskedSoftmax.apply(h, k > 0) * k
        else:
            y = Scaled.apply(h, self.scale)
        return (y * y).sum(-1)


@pytest.mark.parametrize("kind", ["ste", "grad_reverse", "two_outputs", "setup_context", "none_grad", "nested",
                                  "in_place"])
def test_custom_backward_is_kept(kind):
    torch.manual_seed(0)
    model = Net(kind)
    x = torch.randn(4, 6)
    jm = bridge.convert(model, (x,), dynamic="batch")
    for batch in (4, 7):                                    # the trace follows JAX's shapes
        xb = torch.randn(batch, 6)
        out = model(xb)
        np.testing.assert_allclose(np.asarray(jm(xb)), out.detach().numpy(), rtol=1e-5, atol=1e-6)
        model.zero_grad()
        out.sum().backward()
        grads = flatten(jax.jit(jax.grad(lambda p, v: jm.apply(p, v).sum()))(jm.params, xb.numpy()))
        for name, p in model.named_parameters():
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            np.testing.assert_allclose(np.asarray(grads[name]), want.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_derivative_of_the_forward_would_differ():
    """The check above can fail: for STE the forward's own derivative is zero almost everywhere."""
    torch.manual_seed(0)
    model = Net("ste")
    x = torch.randn(4, 6)
    jm = bridge.convert(model, (x,))
    grads = jax.grad(lambda p: jm.apply(p, x.numpy()).sum())(jm.params)
    assert np.abs(np.asarray(grads["a"]["weight"])).max() > 0.1
    assert torch.autograd.Function.apply.__func__ is not None and STE.apply(torch.ones(1)).item() == 1.0


def test_forcing_strict_export_says_the_backward_is_lost():
    with pytest.warns(UserWarning, match="strict export inlined a custom torch.autograd.Function"):
        bridge.convert(Net("ste"), (torch.randn(2, 6),), strict=True)


class HooksGradient(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 5)
        self.out = torch.nn.Linear(5, 3)

    def forward(self, x):
        y = self.lin(x)
        if y.requires_grad:
            y.register_hook(lambda g: g.clamp(-0.01, 0.01) * 10)   # changes the gradient
            y.register_hook(lambda g: None)                         # only looks at it
        z = torch.tanh(y)
        if z.requires_grad:
            z.register_hook(lambda g: g.mul_(0.5))                  # changes it in place
        return self.out(z)


def test_gradient_hooks_forward_registers_change_jax_gradients_as_torchs():
    torch.manual_seed(0)
    model, x = HooksGradient(), torch.randn(4, 6)
    jm = bridge.convert(model, (x,))
    (model(x) ** 2).sum().backward()
    grads = flatten(jax.grad(lambda p: (jm.apply(p, x.numpy()) ** 2).sum())(jm.params))
    for name, p in model.named_parameters():
        np.testing.assert_allclose(np.asarray(grads[name]), p.grad.numpy(), rtol=1e-5, atol=1e-7, err_msg=name)
    assert np.abs(model.lin.weight.grad.numpy()).max() > 0


@pytest.mark.parametrize("where", ["module", "parameter"])
def test_gradient_hooks_torch_export_drops_are_named(where):
    """Module backward hooks and hooks on parameters change torch's gradients and torch.export does not
    record them: convert says so."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 5))
    if where == "parameter":
        model[0].weight.register_hook(lambda g: g.clamp(-1, 1))
        match = "backward hooks on parameter '0.weight'"
    else:
        model[1].register_full_backward_hook(lambda mod, gi, go: (gi[0] * 0,))
        match = "backward hooks on module '1'"
    with pytest.warns(UserWarning, match=match):
        bridge.convert(model, (torch.randn(2, 6),))


def test_when_only_strict_export_works_it_is_used_with_a_warning(monkeypatch):
    """A model non-strict export cannot take still converts (strict, forward exact), and says that its
    Functions' gradients are now their forwards' derivatives."""
    import contextlib

    import converters.capture as capture

    @contextlib.contextmanager
    def failing():
        raise RuntimeError("non-strict export refused")
        yield

    monkeypatch.setattr(capture, "recording_functions", failing)
    torch.manual_seed(0)
    model, x = Net("grad_reverse"), torch.randn(3, 6)
    with pytest.warns(UserWarning, match=r"(?s)inlined a custom torch.autograd.Function.*non-strict export refused"):
        jm = bridge.convert(model, (x,))
    np.testing.assert_allclose(np.asarray(jm(x)), model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


class Recompute(torch.autograd.Function):   # gradient checkpointing by hand: closes over a module's weights
    @staticmethod
    def forward(ctx, block, x):
        ctx.block = block
        ctx.save_for_backward(x)
        with torch.no_grad():
            return block(x)

    @staticmethod
    def backward(ctx, g):   # the block's weight gradients go to .grad by autograd, not through the return
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            torch.autograd.backward(ctx.block(x), g)
        return None, x.grad


class Checkpointed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(6, 8)
        self.block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(Recompute.apply(self.block, self.inp(x)))


def test_functions_reading_weights_they_are_not_given_are_differentiated_through_their_forward():
    """Recomputation and reversible layers (Reformer) read module weights inside a Function: its backward
    cannot return their gradients, so JAX differentiates the forward, which is exact for them. Also torch.export
    would record the layers after such a Function as no-grad; the weights still train."""
    torch.manual_seed(0)
    model, x = Checkpointed(), torch.randn(4, 6)
    with pytest.warns(UserWarning, match=r"Recompute reads trainable tensors .*\(0.weight, 0.bias, 2.weight"):
        jm = bridge.convert(model, (x,), dynamic="batch")
    xb = torch.randn(5, 6)
    out = model(xb)
    np.testing.assert_allclose(np.asarray(jm(xb)), out.detach().numpy(), rtol=1e-5, atol=1e-6)
    (out ** 2).sum().backward()
    grads = flatten(jax.jit(jax.grad(lambda p, v: (jm.apply(p, v) ** 2).sum()))(jm.params, xb.numpy()))
    for name, p in model.named_parameters():
        np.testing.assert_allclose(np.asarray(grads[name]), p.grad.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


class TorchCheckpointed(Checkpointed):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.block, self.inp(x), use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [True, False])
def test_torch_checkpoint_gradients_reach_the_checkpointed_weights(reentrant):
    """torch.utils.checkpoint (reentrant: torch's own Function running the block under no_grad) is recomputation:
    the checkpointed block and what follows it get torch's gradients, not zeros."""
    torch.manual_seed(0)
    model, x = TorchCheckpointed(reentrant), torch.randn(4, 6)
    jm = bridge.convert(model, (x,))
    (model(x) ** 2).sum().backward()
    grads = flatten(jax.grad(lambda p: (jm.apply(p, x.numpy()) ** 2).sum())(jm.params))
    for name, p in model.named_parameters():
        np.testing.assert_allclose(np.asarray(grads[name]), p.grad.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)

"""bf16/fp16 matrix products with a bias (linear, addmm, baddbmm, addmv, addbmm): torch's CPU kernels accumulate
the product in fp32, add the bias in fp32 and round once; converted, the results are bit-identical to torch's,
forward under jit and op by op. Gradients against torch autograd at the dtype's tolerance; fp32 unchanged."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bridge
from converters.dtypes import to_jax
from tests.conftest import GRAD_TOL, TOL, full_only, rel_err


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def r(*shape):
    """Multiples of 1/16 in [-2, 2]: exact in bf16 and fp16, and every product's fp32 sum is exact whatever the
    summation order, so torch's and XLA's fp32 accumulations agree to the bit and only the rounding at the end
    can differ (random normals also agree in bf16, but fp16's finer grid shows accumulation-order ties)."""
    return torch.randint(-32, 33, shape).float() / 16


# name: (fn, input factories); every input is differentiated
CASES = {
    "linear_2d": (F.linear, lambda: (r(16, 64), r(48, 64), r(48))),
    "linear_1d_input": (F.linear, lambda: (r(64), r(48, 64), r(48))),
    "linear_3d": (F.linear, lambda: (r(4, 5, 64), r(48, 64), r(48))),
    "linear_4d_odd": (F.linear, lambda: (r(2, 3, 5, 37), r(29, 37), r(29))),
    "linear_no_bias": (F.linear, lambda: (r(4, 5, 64), r(48, 64))),
    "addmm": (torch.addmm, lambda: (r(48), r(16, 64), r(64, 48))),
    "addmm_2d_bias": (torch.addmm, lambda: (r(16, 48), r(16, 64), r(64, 48))),
    # dyadic alpha, beta: torch's kernels fuse beta * bias + alpha * product (an FMA), which XLA does not expose;
    # with other factors one output in a few hundred may differ by one ulp
    "addmm_alpha_beta": (lambda c, a, b: torch.addmm(c, a, b, alpha=0.25, beta=-1.5),
                         lambda: (r(48), r(16, 64), r(64, 48))),
    "addmm_beta_0": (lambda c, a, b: torch.addmm(c, a, b, beta=0), lambda: (r(48), r(16, 64), r(64, 48))),
    "baddbmm": (torch.baddbmm, lambda: (r(3, 16, 24), r(3, 16, 32), r(3, 32, 24))),
    "baddbmm_alpha_beta_bcast": (lambda c, a, b: torch.baddbmm(c, a, b, alpha=1.5, beta=-0.5),
                                 lambda: (r(24), r(3, 16, 32), r(3, 32, 24))),
    "addmv": (torch.addmv, lambda: (r(48), r(48, 64), r(64))),
    # addmv rounds alpha, beta and beta * bias to the inputs' dtype first
    "addmv_alpha_beta": (lambda c, a, b: torch.addmv(c, a, b, alpha=0.3, beta=0.7), lambda: (r(48), r(48, 64), r(64))),
    "addbmm": (torch.addbmm, lambda: (r(16, 24), r(3, 16, 32), r(3, 32, 24))),
    "addbmm_alpha_beta": (lambda c, a, b: torch.addbmm(c, a, b, alpha=0.75, beta=2.0),
                          lambda: (r(24), r(3, 16, 32), r(3, 32, 24))),
}


@pytest.mark.parametrize("dtype,data", [("bfloat16", "grid"), pytest.param("bfloat16", "normal", marks=full_only),
                                        ("float16", "grid"), pytest.param("float32", "normal", marks=full_only)])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_bit_for_bit(name, dtype, data):
    fn, make = CASES[name]
    tdt = getattr(torch, dtype)
    xs = [(x if data == "grid" else torch.randn(x.shape)).to(tdt) for x in make()]
    module = Fn(fn)
    ref = module(*xs)
    jm = bridge.convert(module, tuple(xs))
    jxs = [to_jax(x) for x in xs]
    for got in (jax.jit(jm.apply)(jm.params, *jxs), jm.apply(jm.params, *jxs)):
        assert got.dtype == to_jax(ref).dtype and tuple(got.shape) == tuple(ref.shape)
        got = np.asarray(got.astype(jnp.float32))
        if dtype == "float32":
            assert rel_err(got, ref) <= TOL["float32"], (name, rel_err(got, ref))
        else:   # torch rounds once: so does bridge
            np.testing.assert_array_equal(got, ref.float().numpy(), err_msg=f"{name} {dtype}")

    # gradients of a weighted sum, against torch autograd
    txs = [x.clone().requires_grad_(True) for x in xs]
    out = module(*txs)
    weight = torch.rand(out.shape, generator=torch.Generator().manual_seed(0)).to(tdt)
    (out * weight).float().sum().backward()
    grads = jax.jit(jax.grad(lambda *a: (jm.apply(jm.params, *a) * to_jax(weight)).astype(jnp.float32).sum(),
                             argnums=tuple(range(len(jxs)))))(*jxs)
    for i, (g, t) in enumerate(zip(grads, txs)):
        assert g.dtype == jxs[i].dtype
        tol = GRAD_TOL if dtype == "float32" else TOL[dtype]
        assert rel_err(np.asarray(g.astype(jnp.float32)), t.grad.float()) <= tol, (name, dtype, i)


def test_bf16_backward_products_stay_bf16():
    """The gradient's matrix products take bf16 operands (an fp32 cotangent would make them fp32 matmuls)."""
    x, w, b = (jnp.ones(s, jnp.bfloat16) for s in ((8, 16), (4, 16), (4,)))
    jm = bridge.convert(Fn(F.linear), tuple(torch.ones(s, dtype=torch.bfloat16) for s in ((8, 16), (4, 16), (4,))))
    jaxpr = jax.make_jaxpr(jax.grad(lambda *a: jm.apply(jm.params, *a).astype(jnp.float32).sum(),
                                    argnums=(0, 1, 2)))(x, w, b)

    def dots(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "dot_general":
                yield e
            for p in e.params.values():
                inner = getattr(p, "jaxpr", p)
                if hasattr(inner, "eqns"):
                    yield from dots(inner)

    found = list(dots(jaxpr.jaxpr))
    assert len(found) == 3, found   # forward, and the input's and the weight's gradients
    assert all(v.aval.dtype == jnp.bfloat16 for e in found for v in e.invars), found

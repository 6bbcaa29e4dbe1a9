"""Grouped matrix products (converters/ops/linalg.py): aten._grouped_mm in its four layouts and
transformers' grouped_mm_fallback custom op (its MoE layers under torch.export), forward against torch's
kernels, gradients against autograd through a per-group reference (torch has no CPU backward for
_grouped_mm). torch.export captures _grouped_mm in bfloat16 only (its meta kernel refuses float32)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import torch

import bridge
from converters.dtypes import to_jax
from tests.conftest import GRAD_TOL, TOL, assert_close, rel_err

ROWS, COLS = [3, 3, 8], [6, 6, 16]   # cumulative group ends: the middle groups are empty


def _spans(offs):
    return list(zip([0] + offs[:-1], offs))


def per_group(a, w, offs):
    """The same products as explicit loops (differentiable in torch)."""
    if offs is None:
        return a @ w
    if a.dim() == 2 and w.dim() == 3:   # rows of `a` grouped
        return torch.cat([a[s:e] @ w[g] for g, (s, e) in enumerate(_spans(offs))])
    if a.dim() == 3:                    # columns of `w` grouped
        return torch.cat([a[g] @ w[:, s:e] for g, (s, e) in enumerate(_spans(offs))], dim=1)
    return torch.stack([a[:, s:e] @ w[s:e] for s, e in _spans(offs)])   # contraction grouped


CASES = {  # name: (a shape, w shape, offs); bfloat16 rows must span multiples of 16 bytes
    "rows": ((8, 16), (3, 16, 8), ROWS),
    "cols": ((3, 8, 16), (16, 16), COLS),
    "contraction": ((8, 16), (16, 8), COLS),
    "batch": ((3, 8, 16), (3, 16, 8), None),
}


class Grouped(torch.nn.Module):
    def __init__(self, w_shape, op):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(w_shape))
        self.op = op

    def forward(self, a, offs=None):
        return self.op(a, self.w, offs=offs)


def _check(module, a, offs, dtype="float32"):
    args = (a,) if offs is None else (a, torch.tensor(offs, dtype=torch.int32))
    jm = bridge.convert(module, args)
    jargs = tuple(to_jax(x) for x in args)
    with torch.no_grad():
        assert_close(jax.jit(jm.apply)(jm.params, *jargs), module(*args), dtype, what="forward")
    weights = torch.randn(module(*args).shape)
    w = module.w.detach().float().requires_grad_(True)   # the reference in float32 on the same values
    ref = torch.autograd.grad((per_group(a.float(), w, offs) * weights).sum(), w)[0]
    got = jax.grad(lambda p: jnp.sum(jm.apply(p, *jargs).astype(jnp.float32) * to_jax(weights)))(jm.params)["w"]
    assert rel_err(got, ref) <= (GRAD_TOL if dtype == "float32" else TOL[dtype])


@pytest.mark.parametrize("case", list(CASES))
def test_grouped_mm(case):
    a_shape, w_shape, offs = CASES[case]
    module = Grouped(w_shape, torch._grouped_mm).to(torch.bfloat16)
    a = torch.randn(a_shape, dtype=torch.bfloat16)
    with torch.no_grad():   # the loops are the layouts we lower
        o = None if offs is None else torch.tensor(offs, dtype=torch.int32)
        assert_close(per_group(a, module.w, offs), torch._grouped_mm(a, module.w, offs=o), "bfloat16", "reference")
    _check(module, a, offs, "bfloat16")


def test_transformers_grouped_mm_fallback():
    pytest.importorskip("transformers.integrations.moe")
    module = Grouped((3, 8, 4), torch.ops.transformers.grouped_mm_fallback)
    _check(module, torch.randn(8, 8), ROWS)

"""EmbeddingBag with include_last_offset=True over a padded index buffer (offsets[-1] < len(indices), CSR
offsets): bag b is indices[offsets[b]:offsets[b + 1]] and the indices past the last offset are in no bag, in
every mode, with per_sample_weights and padding_idx, forward and gradients. torch documents offsets[-1] ==
len(indices); past it its CPU kernels disagree with one another (sum leaves the tail out, max takes it in, mean
divides by it), so the reference is torch on the buffer cut at the last offset."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bridge
from converters.dtypes import to_jax
from tests.conftest import GRAD_TOL, TOL, rel_err

IDS = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9, 7])
OFFSETS = torch.tensor([0, 2, 2, 5])          # bags [0:2], [2:2] (empty), [2:5]; ids[5:] in none


class Bag(torch.nn.Module):
    def __init__(self, mode, padding_idx):
        super().__init__()
        self.mode, self.padding_idx = mode, padding_idx

    def forward(self, weight, ids, offsets, psw=None):
        return F.embedding_bag(ids, weight, offsets, mode=self.mode, include_last_offset=True,
                               per_sample_weights=psw, padding_idx=self.padding_idx)


@pytest.mark.parametrize("padding_idx", [None, 4])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False), ("max", False)])
def test_indices_past_the_last_offset_are_in_no_bag(mode, weighted, padding_idx):
    module = Bag(mode, padding_idx)
    weight = torch.randn(10, 4)
    psw = torch.rand(len(IDS)) + 0.5 if weighted else None
    cut = int(OFFSETS[-1])
    w_ref = weight.clone().requires_grad_(True)
    psw_ref = psw[:cut].clone().requires_grad_(True) if weighted else None
    ref = module(w_ref, IDS[:cut], OFFSETS, psw_ref)
    gen = torch.Generator().manual_seed(0)
    cot = torch.randn(ref.shape, generator=gen)
    (ref * cot).sum().backward()

    args = (weight, IDS, OFFSETS) + ((psw,) if weighted else ())
    jm = bridge.convert(module, args)
    jargs = [to_jax(a) for a in args]
    for got in (jax.jit(jm.apply)(jm.params, *jargs), jm.apply(jm.params, *jargs)):
        assert rel_err(got, ref) <= TOL["float32"], rel_err(got, ref)
    diff = (0, 3) if weighted else (0,)
    grads = jax.grad(lambda *a: (jm.apply(jm.params, *a) * to_jax(cot)).sum(), argnums=diff)(*jargs)
    assert rel_err(grads[0], w_ref.grad) <= GRAD_TOL
    if weighted:   # the tail's weights get no gradient
        assert rel_err(grads[1][:cut], psw_ref.grad) <= GRAD_TOL
        np.testing.assert_array_equal(np.asarray(grads[1][cut:]), 0)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_last_offset_at_the_end_matches_torch_directly(mode):
    module = Bag(mode, None)
    weight, offsets = torch.randn(10, 4), torch.tensor([0, 2, 2, 5, len(IDS)])
    jm = bridge.convert(module, (weight, IDS, offsets))
    got = jax.jit(jm.apply)(jm.params, to_jax(weight), to_jax(IDS), to_jax(offsets))
    assert rel_err(got, module(weight, IDS, offsets)) <= TOL["float32"]

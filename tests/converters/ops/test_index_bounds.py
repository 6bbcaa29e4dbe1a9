"""Out-of-range indices: torch raises, JAX gathers would clamp silently. The lowerings read NaN there
(within jit nothing can raise), keep torch's values and gradients elsewhere, and wrap negatives exactly
where torch does."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import bridge

W = torch.randn(6, 4)

# name: (fn(weight, idx), index with bad entries, the same with those replaced by 0, bad output positions)
CASES = {
    "embedding": (lambda w, i: torch.nn.functional.embedding(i, w), [[5, 6, 2], [-1, 1, 2]],
                  [[5, 0, 2], [0, 1, 2]], [(0, 1), (1, 0)]),
    "index_select": (lambda w, i: torch.index_select(w, 0, i), [1, 9, -2], [1, 0, 0], [(1,), (2,)]),
    "advanced index": (lambda w, i: w[i], [[-6, -7], [6, -1]], [[-6, 0], [0, -1]], [(0, 1), (1, 0)]),
    "take": (lambda w, i: torch.take(w, i).reshape(-1, 1), [[23, 24, -25, -24]], [[23, 0, 0, -24]],
             [(1,), (2,)]),
    "gather": (lambda w, i: torch.gather(w, 0, i).reshape(-1, 1), [[0, 1, 6, 2], [-1, 0, 0, 0]],
               [[0, 1, 0, 2], [0, 0, 0, 0]], [(2,), (4,)]),
    "embedding_bag": (lambda w, i: torch.nn.functional.embedding_bag(i, w, torch.tensor([0, 2])),
                      [0, 7, 3, 1], [0, 0, 3, 1], [(0,)]),
}


class Lookup(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.weight = torch.nn.Parameter(W.clone())
        self.fn = fn

    def forward(self, idx):
        return self.fn(self.weight, idx)


@pytest.mark.parametrize("name", list(CASES))
def test_out_of_range_indices_read_nan_where_torch_raises(name):
    fn, bad, fixed, bad_rows = CASES[name]
    module = Lookup(fn)
    bad_t, fixed_t = torch.tensor(bad), torch.tensor(fixed)
    jm = bridge.convert(module, (fixed_t,))
    want = module(fixed_t).detach().numpy()
    np.testing.assert_allclose(np.asarray(jm(fixed_t)), want, rtol=1e-6)
    with pytest.raises((IndexError, RuntimeError)):
        module(bad_t)
    out = np.asarray(jm(bad_t))
    nan_rows = {tuple(int(v) for v in ix) for ix in zip(*np.nonzero(np.isnan(out).all(-1)))}
    assert nan_rows == set(bad_rows) and np.isnan(out).sum() == len(bad_rows) * out.shape[-1], nan_rows
    keep = ~np.isnan(out)
    np.testing.assert_allclose(out[keep], want[keep], rtol=1e-6)   # the in-range lookups are torch's
    # gradients: torch's for the in-range lookups; the NaN rows contribute nothing
    grads = jax.grad(lambda p: jax.numpy.nansum(jm.apply(p, bad_t.numpy()) * 1.5))(jm.params)["weight"]
    masked = Lookup(fn)
    (torch.from_numpy(keep.astype(np.float32)) * masked(fixed_t) * 1.5).sum().backward()
    np.testing.assert_allclose(np.asarray(grads), masked.weight.grad.numpy(), rtol=1e-5, atol=1e-6)

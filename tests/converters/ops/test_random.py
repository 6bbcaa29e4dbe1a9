"""Random ops (converters/ops/random.py) convert with and without `generator=`: `torch.randn(shape,
generator=None)` (diffusers' randn_tensor) selects the `.generator` overloads, and a torch.Generator made in
forward is lifted as a graph input. Draws come from `rng`; shapes and dtypes are torch's, values are checked
in distribution (mean, spread, range, permutation) within Monte-Carlo error."""
import jax
import numpy as np
import pytest
import torch

import bridge

N = 4096


DRAWS = {   # name: (draw given x of shape (N,) and a generator, check of the values)
    "randn": (lambda x, g: torch.randn(N, generator=g), "normal"),
    "rand": (lambda x, g: torch.rand(N, generator=g), "uniform"),
    "randn_like": (lambda x, g: torch.randn_like(x, generator=g), "normal"),
    "rand_like": (lambda x, g: torch.rand_like(x, generator=g), "uniform"),
    "randint": (lambda x, g: torch.randint(7, (N,), generator=g), "ints 0 7"),
    "randint_low": (lambda x, g: torch.randint(3, 9, (N,), generator=g), "ints 3 9"),
    "randint_like_low": (lambda x, g: torch.randint_like(x, 3, 9, generator=g), "ints 3 9"),
    "randperm": (lambda x, g: torch.randperm(N, generator=g), "permutation"),
}


class Draw(torch.nn.Module):
    def __init__(self, draw, seeded: bool):
        super().__init__()
        self.draw, self.seeded = draw, seeded

    def forward(self, x):
        return self.draw(x, torch.Generator().manual_seed(0) if self.seeded else None)


def _check(values: np.ndarray, kind: str):
    if kind == "normal":
        assert abs(values.mean()) < 4 / np.sqrt(N) and abs(values.std() - 1) < 0.05
    elif kind == "uniform":
        assert values.min() >= 0 and values.max() < 1 and abs(values.mean() - 0.5) < 4 * 0.29 / np.sqrt(N)
    elif kind == "permutation":
        np.testing.assert_array_equal(np.sort(values), np.arange(N))
    else:
        low, high = map(int, kind.split()[1:])
        assert set(np.unique(values)) == set(range(low, high))


@pytest.mark.parametrize("seeded", [False, True], ids=["generator=None", "seeded_generator"])
@pytest.mark.parametrize("name", list(DRAWS))
def test_draws_with_a_generator_argument(name, seeded):
    draw, kind = DRAWS[name]
    x = torch.zeros(N)
    module = Draw(draw, seeded)
    ref = module(x)
    jm = bridge.convert(module, (x,))
    assert any("generator" in str(n.target) for n in jm.program.nodes)   # the `.generator` overloads
    run = jax.jit(lambda key: jm.apply(jm.params, x.numpy(), rng=key))
    a, b = np.asarray(run(jax.random.key(0))), np.asarray(run(jax.random.key(1)))
    assert a.shape == tuple(ref.shape)
    assert np.dtype(a.dtype).kind == {torch.float32: "f", torch.int64: "i"}[ref.dtype]
    _check(a, kind)
    assert not np.array_equal(a, b)   # another key, other numbers
    np.testing.assert_array_equal(a, np.asarray(run(jax.random.key(0))))   # same key, same numbers

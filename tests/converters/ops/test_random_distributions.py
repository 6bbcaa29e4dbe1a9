"""torch.distributions draws convert (Gamma, Chi2, Beta, Dirichlet, Poisson, Binomial): the converted model's
draws have the distribution's moments, and reparameterised draws (rsample) the analytic gradient of their mean,
as torch's rsample gives it. Different generators: compared in distribution, within Monte-Carlo error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.distributions as D

import bridge
from converters.dtypes import to_jax
from tests.conftest import full_only

N = 20000
A, B = np.array([0.7, 2.0, 5.0]), np.array([1.5, 0.5, 3.0])


class Draws(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a = torch.nn.Parameter(torch.tensor(A, dtype=torch.float32))
        self.b = torch.nn.Parameter(torch.tensor(B, dtype=torch.float32))

    def forward(self, x):
        a, b = self.a.expand(x.shape[0], 3), self.b.expand(x.shape[0], 3)
        return {"gamma": lambda: D.Gamma(a, b).rsample(),
                "chi2": lambda: D.Chi2(2 * a).rsample(),
                "beta": lambda: D.Beta(a, b).rsample(),
                "dirichlet": lambda: D.Dirichlet(a).rsample(),
                "poisson": lambda: D.Poisson(3 * a).sample(),
                "binomial": lambda: D.Binomial(10, probs=torch.sigmoid(b)).sample()}[self.kind]()


S = A.sum()
P = 1 / (1 + np.exp(-B))
# mean, variance per component; d mean / d a (per component) where the draw is reparameterised
MOMENTS = {
    "gamma": (A / B, A / B**2, 1 / B),
    "chi2": (2 * A, 4 * A, np.full(3, 2.0)),
    "beta": (A / (A + B), A * B / ((A + B) ** 2 * (A + B + 1)), B / (A + B) ** 2),
    "dirichlet": (A / S, A * (S - A) / (S**2 * (S + 1)), (S - A) / S**2),
    "poisson": (3 * A, 3 * A, None),
    "binomial": (10 * P, 10 * P * (1 - P), None),
}


@pytest.mark.parametrize("kind", [pytest.param(k, marks=full_only) if k in ("beta", "chi2") else k for k in MOMENTS])
def test_draws_have_the_distribution_and_its_reparameterised_gradient(kind):
    model = Draws(kind)
    x = torch.zeros(N, 1)
    jm = bridge.convert(model, (x,), train=True)

    def draw(params, key):
        return jm.apply(params, to_jax(x), rng=key)

    jitted = jax.jit(draw)
    got = np.asarray(jitted(jm.params, jax.random.key(0)), dtype=np.float64)
    mean, var, dmean = MOMENTS[kind]
    assert got.shape == (N, 3)
    assert np.all(np.abs(got.mean(0) - mean) <= 5 * np.sqrt(var / N)), (got.mean(0), mean)
    assert np.allclose(got.var(0), var, rtol=0.1), (got.var(0), var)
    assert not np.array_equal(got, np.asarray(jitted(jm.params, jax.random.key(1))))   # the key decides the draw
    if dmean is None:
        return
    # d/da_i of the mean of component i: the pathwise (implicit reparameterisation) gradient torch's rsample has
    jacobian = jax.jit(jax.jacrev(lambda p: jnp.mean(draw(p, jax.random.key(2)), axis=0)))(jm.params)["a"]
    grads = np.diag(np.asarray(jacobian))
    assert np.allclose(grads, dmean, rtol=0.05), (grads, dmean)
    ref = Draws(kind)
    ref.load_state_dict(model.state_dict())
    torch.manual_seed(0)
    ref(x)[:, 0].mean().backward()   # torch's own estimate of the same derivative
    assert abs(float(ref.a.grad[0]) - dmean[0]) <= 0.05 * abs(dmean[0])

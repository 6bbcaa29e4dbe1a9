"""Random ops. Each node draws from `fold_in(rng, node_index)`: same key, same numbers."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from converters.ops.common import aten, default_float, dt, size_
from converters.registry import lowering


def _with_generator(packet, *names) -> list:
    """The overloads `names` and their `generator=` twins (`torch.randn(shape, generator=g)`, even g=None, as
    diffusers' randn_tensor calls it, selects randn.generator); the draw comes from the rng either way."""
    twins = {"default": "generator", "low": "low_generator", "Tensor": "Tensor_generator",
             "low_dtype": "low_generator_dtype"}
    return [getattr(packet, n) for name in names for n in (name, twins[name]) if n in packet.overloads()]


def _dropout_active(node) -> bool:
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return bool(p) and train is not False


def _dropout(key, x, p):
    if key is None:
        return x, jnp.ones(x.shape, jnp.bool_)
    if p >= 1:
        return jnp.zeros_like(x), jnp.zeros(x.shape, jnp.bool_)
    keep = jax.random.bernoulli(key, 1 - p, x.shape)
    return jnp.where(keep, x / (1 - p), jnp.zeros((), x.dtype)).astype(x.dtype), keep


@lowering(aten.native_dropout.default, random=_dropout_active)
def native_dropout(key, x, p, train):
    return _dropout(key, x, p)


@lowering(aten.dropout.default, random=_dropout_active)
def dropout(key, x, p, train):
    return _dropout(key, x, p)[0]


@lowering(*_with_generator(aten.rand, "default"), random=True)
def rand(key, size, *, dtype=None, layout=None, device=None, pin_memory=None, generator=None):
    return jax.random.uniform(key, size_(size), dt(dtype, default_float()))


@lowering(*_with_generator(aten.randn, "default"), random=True)
def randn(key, size, *, dtype=None, layout=None, device=None, pin_memory=None, generator=None):
    return jax.random.normal(key, size_(size), dt(dtype, default_float()))


@lowering(*_with_generator(aten.rand_like, "default"), random=True)
def rand_like(key, x, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None,
              generator=None):
    return jax.random.uniform(key, x.shape, dt(dtype, x.dtype))


@lowering(*_with_generator(aten.randn_like, "default"), random=True)
def randn_like(key, x, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None,
               generator=None):
    return jax.random.normal(key, x.shape, dt(dtype, x.dtype))


@lowering(aten.bernoulli.default, random=True)
def bernoulli(key, p, *, generator=None):
    return jax.random.bernoulli(key, p).astype(p.dtype)


@lowering(aten.bernoulli.p, random=True)
def bernoulli_p(key, x, p=0.5, *, generator=None):
    return jax.random.bernoulli(key, p, x.shape).astype(x.dtype)


def _ints(key, shape, low, high, dtype):
    """Integers in [low, high) in torch's `dtype` (float dtypes allowed, as torch's randint does)."""
    idt = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
    bound = jnp.iinfo(idt).max
    return jax.random.randint(key, shape, min(low, bound), min(high, bound), dtype=idt).astype(dtype)


@lowering(*_with_generator(aten.randint, "low"), random=True)
def randint_low(key, low, high, size, *, dtype=None, layout=None, device=None, pin_memory=None, generator=None):
    return _ints(key, size_(size), low, high, dt(dtype, jnp.int32))


@lowering(*_with_generator(aten.randint, "default"), random=True)
def randint(key, high, size, *, dtype=None, layout=None, device=None, pin_memory=None, generator=None):
    return _ints(key, size_(size), 0, high, dt(dtype, jnp.int32))


@lowering(*_with_generator(aten.randint_like, "default", "Tensor"), random=True)
def randint_like(key, x, high, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None,
                 generator=None):
    if hasattr(high, "shape"):
        return jax.random.randint(key, x.shape, 0, high).astype(dt(dtype, x.dtype))
    return _ints(key, x.shape, 0, high, dt(dtype, x.dtype))


@lowering(*_with_generator(aten.randint_like, "low_dtype"), random=True)
def randint_like_low(key, x, low, high, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None,
                     generator=None):
    return _ints(key, x.shape, low, high, dt(dtype, x.dtype))


def _random_high(x):
    """random_()'s exclusive bound: every integer a float's mantissa holds exactly, or the int dtype's range."""
    if jnp.issubdtype(x.dtype, jnp.floating):
        return 2 ** (jnp.finfo(x.dtype).nmant + 1) + 1
    return 2 if x.dtype == jnp.bool_ else int(jnp.iinfo(x.dtype).max) + 1


@lowering(aten.random.default, random=True)
def random_all(key, x, *, generator=None):
    return _ints(key, x.shape, 0, _random_high(x), x.dtype)


@lowering(aten.random.to, random=True)
def random_to(key, x, to, *, generator=None):
    return _ints(key, x.shape, 0, to, x.dtype)


@lowering(getattr(aten.random, "from"), random=True)
def random_from(key, x, low, high=None, *, generator=None):
    return _ints(key, x.shape, low, _random_high(x) if high is None else high, x.dtype)


@lowering(*_with_generator(aten.randperm, "default"), random=True)
def randperm(key, n, *, dtype=None, layout=None, device=None, pin_memory=None, generator=None):
    return jax.random.permutation(key, n).astype(dt(dtype, jnp.int32))


def _float_like(x):
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else default_float()


@lowering(aten.uniform.default, random=True)
def uniform(key, x, low=0.0, high=1.0, *, generator=None):
    return jax.random.uniform(key, x.shape, _float_like(x), low, high)


@lowering(aten.normal.Tensor_float, aten.normal.float_Tensor, aten.normal.Tensor_Tensor, random=True)
def normal(key, mean, std=1.0, *, generator=None):
    shape = jnp.broadcast_shapes(jnp.shape(mean), jnp.shape(std))
    dtype = jnp.result_type(mean, std) if hasattr(mean, "dtype") or hasattr(std, "dtype") else default_float()
    return mean + std * jax.random.normal(key, shape, dtype)


@lowering(aten.normal_functional.default, random=True)
def normal_like(key, x, mean=0.0, std=1.0, *, generator=None):
    return mean + std * jax.random.normal(key, x.shape, _float_like(x))


@lowering(aten.normal.float_float, random=True)
def normal_sized(key, mean, std, size, *, generator=None, dtype=None, layout=None, device=None, pin_memory=None):
    return mean + std * jax.random.normal(key, size_(size), dt(dtype, default_float()))


@lowering(aten.log_normal.default, random=True)
def log_normal(key, x, mean=1.0, std=2.0, *, generator=None):
    return jnp.exp(mean + std * jax.random.normal(key, x.shape, _float_like(x)))


@lowering(aten.exponential.default, random=True)
def exponential(key, x, lambd=1.0, *, generator=None):
    return jax.random.exponential(key, x.shape, _float_like(x)) / lambd


@lowering(aten.cauchy.default, random=True)
def cauchy(key, x, median=0.0, sigma=1.0, *, generator=None):
    return median + sigma * jax.random.cauchy(key, x.shape, _float_like(x))


@lowering(aten.geometric.default, random=True)
def geometric(key, x, p, *, generator=None):
    """Trials until the first success (>= 1), in x's dtype."""
    return jax.random.geometric(key, p, x.shape).astype(x.dtype)


@lowering(aten.bernoulli.Tensor, random=True)
def bernoulli_tensor(key, x, p, *, generator=None):
    return jax.random.bernoulli(key, p, x.shape).astype(x.dtype)


@lowering(aten.multinomial.default, random=True)
def multinomial(key, probs_BC, num_samples, replacement=False, *, generator=None):
    """Categorical draws per row (with replacement), or Gumbel top-k (without)."""
    logits_BC = jnp.log(probs_BC.astype(jnp.float32))
    if replacement:
        out_SB = jax.random.categorical(key, logits_BC, axis=-1, shape=(num_samples,) + probs_BC.shape[:-1])
        return jnp.moveaxis(out_SB, 0, -1)
    gumbel_BC = jax.random.gumbel(key, probs_BC.shape, jnp.float32)
    return jax.lax.top_k(logits_BC + gumbel_BC, num_samples)[1]


@lowering(aten.poisson.default, random=True)
def poisson(key, rates, generator=None):
    """Poisson draws with the given rates, in the rates' dtype (counts as floats, as torch returns them)."""
    return jax.random.poisson(key, rates.astype(jnp.float32)).astype(rates.dtype)


@lowering(aten.binomial.default, random=True)
def binomial(key, count, prob, generator=None):
    return jax.random.binomial(key, count.astype(jnp.float32), prob.astype(jnp.float32)).astype(count.dtype)


@lowering(aten._standard_gamma.default, random=True)
def standard_gamma(key, alpha, generator=None):
    """Gamma(alpha, 1) draws; JAX differentiates them in alpha by implicit reparameterisation, as torch's
    rsample does (Gamma, Beta, Dirichlet, Chi2, StudentT latents train)."""
    return jax.random.gamma(key, alpha, dtype=_float_like(alpha))


@lowering(aten._sample_dirichlet.default, random=True)
def sample_dirichlet(key, alpha, generator=None):
    """Dirichlet draws over the last dim (differentiable in alpha, like torch's Dirichlet.rsample)."""
    return jax.random.dirichlet(key, alpha, dtype=_float_like(alpha))


def _rrelu_training(node) -> bool:
    return bool(node.args[4] if len(node.args) > 4 else node.kwargs.get("training", False))


@lowering(aten.rrelu_with_noise_functional.default, random=_rrelu_training)
def rrelu_with_noise(key, x, noise, lower=0.125, upper=1 / 3, training=False, generator=None):
    """Negative inputs scaled by a slope drawn from U(lower, upper) in training, (lower + upper) / 2 in eval;
    the drawn slopes (1 for positive inputs) are the new noise."""
    if key is None:
        return jnp.where(x > 0, x, x * ((lower + upper) / 2)), noise
    slope = jnp.where(x > 0, jnp.ones((), x.dtype), jax.random.uniform(key, x.shape, x.dtype, lower, upper))
    return x * slope, slope.astype(noise.dtype)

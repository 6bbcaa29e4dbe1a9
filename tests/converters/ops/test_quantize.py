"""Fake-quantization lowerings (converters/ops/quantize.py) against torch's CPU kernels on the same
values: outputs bit for bit (within an ulp with floating zero points, which torch multiplies in double),
the same masks (the straight-through gradient), pass-through when disabled."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters import ops  # noqa: F401  (registers every lowering)
from converters.dtypes import to_jax
from converters.registry import lookup
from tests.conftest import assert_close

aten = torch.ops.aten


def _x(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, generator=g) * 4
    x[0, 0, :3] = torch.tensor([0.25, 0.35, -0.45])   # exact halves of the scale below: round half to even
    return x.to(dtype)


def lowered(op, *args):
    return lookup(op).fn(*[to_jax(a) if isinstance(a, torch.Tensor) else a for a in args])


def _check(got, ref, exact=True):
    (out, mask), (r_out, r_mask) = got, ref
    assert out.dtype == to_jax(r_out).dtype
    if exact:
        np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), r_out.float().numpy())
    else:
        assert_close(np.asarray(out), r_out, what="fake-quantized values")
    np.testing.assert_array_equal(np.asarray(mask), r_mask.numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qrange", [(-128, 127), (0, 255), (0, 15)])
def test_per_tensor(dtype, qrange):
    x = _x(dtype)
    args = (x, 0.1, 3, *qrange)
    _check(lowered(aten.fake_quantize_per_tensor_affine_cachemask.default, *args),
           aten.fake_quantize_per_tensor_affine_cachemask.default(*args))


@pytest.mark.parametrize("enabled", [1, 0])
def test_per_tensor_tensor_qparams(enabled):
    x = _x(torch.float32)
    args = (x, torch.tensor([0.07]), torch.tensor([-5], dtype=torch.int32), torch.tensor([enabled], dtype=torch.uint8),
            -8, 7)
    op = aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams.default
    _check(lowered(op, *args), op(*args))


@pytest.mark.parametrize("zp_dtype", [torch.int32, torch.float32])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_per_channel(axis, zp_dtype):
    x = _x(torch.float32)
    g = torch.Generator().manual_seed(1)
    n = x.shape[axis]
    scale = torch.rand(n, generator=g) * 0.2 + 0.01
    zp = (torch.randn(n, generator=g) * 3).to(zp_dtype)
    args = (x, scale, zp, axis, -8, 7)
    op = aten.fake_quantize_per_channel_affine_cachemask.default
    _check(lowered(op, *args), op(*args), exact=zp_dtype == torch.int32)


def test_gradient_is_the_mask():
    import jax
    x = _x(torch.float32)
    op = aten.fake_quantize_per_tensor_affine_cachemask.default
    g = jax.grad(lambda a: jnp.sum(lowered(op, a, 0.1, 0, -8, 7)[0] * 3.0))(to_jax(x))
    t = x.clone().requires_grad_(True)
    (torch.fake_quantize_per_tensor_affine(t, 0.1, 0, -8, 7) * 3.0).sum().backward()
    np.testing.assert_array_equal(np.asarray(g), t.grad.numpy())


FUSED_INPUTS = {
    "mixed": lambda g: torch.randn(6, 5, generator=g) * 3,
    "all_zero": lambda g: torch.zeros(6, 5),                            # scale 0 -> 0.1
    "tiny_range": lambda g: torch.randn(6, 5, generator=g) * 1e-4,      # below the small-scale cutoff
    "positive": lambda g: torch.rand(6, 5, generator=g) + 1,
    "negative": lambda g: -torch.rand(6, 5, generator=g) * 1e-3,
}


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("flags", [(1, 1), (0, 1), (1, 0)])
@pytest.mark.parametrize("kind", list(FUSED_INPUTS))
def test_fused_moving_average_observer(kind, flags, per_row, symmetric):
    """torch.ao's fused observer + fake quantizer: outputs, masks and the updated observer state."""
    g = torch.Generator().manual_seed(2)
    x = FUSED_INPUTS[kind](g)
    n = x.shape[0] if per_row else 1
    state = [torch.randn(n, generator=g) - 2, torch.randn(n, generator=g) + 2,    # running min / max
             torch.ones(n), torch.zeros(n, dtype=torch.int32)]                  # scale / zero point
    if kind == "all_zero":
        state[:2] = [torch.full((n,), float("inf")), torch.full((n,), float("-inf"))]   # first observation
    on = [torch.tensor([f], dtype=torch.long) for f in flags]
    qmin, qmax = (-128, 127) if symmetric else (0, 255)
    args = (0.01, qmin, qmax, 0, per_row, symmetric)
    ref_state = [t.clone() for t in state]
    ref = aten._fused_moving_avg_obs_fq_helper(x, *on, *ref_state, *args)
    got = lowered(aten._fused_moving_avg_obs_fq_helper_functional.default, x, *on, *state, *args)
    assert_close(np.asarray(got[0]), ref[0], what="output")
    np.testing.assert_array_equal(np.asarray(got[1]), ref[1].numpy())
    for name, new, want in zip(("running_min", "running_max", "scale"), got[2:5], ref_state[:3]):
        np.testing.assert_allclose(np.asarray(new), want.numpy(), rtol=2e-7, atol=0, err_msg=name)
    np.testing.assert_array_equal(np.asarray(got[5]), ref_state[3].numpy())

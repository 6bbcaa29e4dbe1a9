"""Low-precision models, dtype fidelity of integer/bool/float results (x64 on and off), and 64-bit
values that x32 cannot hold."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch

import bridge
from bridge.errors import CheckpointError, InputError, LoweringError, StateError
from bridge.tree import flatten
from converters.dtypes import jax_dtype, to_jax, to_torch
from tests.conftest import TOL, full_only, rel_err
from tests.models import MODELS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "cnn", "mlp"])
def test_low_precision_forward(name, dtype):
    torch.manual_seed(0)
    case = MODELS[name]()
    module = case.module.eval().to(dtype)
    args, kwargs = case.inputs(2, 8)
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    jm = bridge.convert(module, args, kwargs)
    for leaf in jax.tree.leaves(jm.params):
        assert leaf.dtype == jax_dtype(dtype)       # no fp32 detour
    with torch.no_grad():
        ref = module(*args, **kwargs)
        ref32 = case.module.float()(*[a.float() if a.is_floating_point() else a for a in args], **kwargs)
    out = jax.jit(jm.apply)(jm.params, *[to_jax(a) for a in args], **{k: to_jax(v) for k, v in kwargs.items()})
    pick = (lambda o: o[case.output_key]) if case.output_key else (lambda o: o)
    got, ref, ref32 = pick(out), pick(ref), pick(ref32)
    assert got.dtype == jax_dtype(dtype)
    key = str(dtype).split(".")[-1]
    # both low-precision results sit within the dtype's tolerance of each other and of fp32
    assert rel_err(got, ref) <= TOL[key], rel_err(got, ref)
    assert rel_err(got, ref32) <= max(2 * rel_err(ref, ref32), TOL[key])


@pytest.mark.parametrize("name", [pytest.param("gpt2", marks=full_only), "llama", pytest.param("cnn", marks=full_only)])
def test_compute_dtype_runs_the_bf16_graph_from_fp32_weights(name):
    """convert(compute_dtype=bf16): params stay the module's fp32 tensors, outputs equal torch's bf16 model,
    and gradients reach the fp32 params through the cast."""
    torch.manual_seed(0)
    case = MODELS[name]()
    module = case.module.eval()
    args, kwargs = case.inputs(2, 8)
    jm = bridge.convert(module, args, kwargs, compute_dtype=torch.bfloat16)
    for (n, p) in module.named_parameters():
        leaf = jm.params
        for part in n.split("."):
            leaf = leaf[part] if part in leaf else None
            if leaf is None:
                break
        if leaf is not None:
            assert leaf.dtype == jnp.float32 and np.array_equal(np.asarray(leaf), p.detach().numpy()), n
    low = __import__("copy").deepcopy(module).to(torch.bfloat16)
    with torch.no_grad():
        ref = low(*[a.to(torch.bfloat16) if a.is_floating_point() else a for a in args], **kwargs)
    jargs, jkw = [to_jax(a) for a in args], {k: to_jax(v) for k, v in kwargs.items()}
    out = jax.jit(jm.apply)(jm.params, *jargs, **jkw)
    pick = (lambda o: o[case.output_key]) if case.output_key else (lambda o: o)
    assert pick(out).dtype == jnp.bfloat16
    assert rel_err(pick(out), pick(ref)) <= TOL["bfloat16"], rel_err(pick(out), pick(ref))
    grads = jax.grad(lambda p: pick(jm.apply(p, *jargs, **jkw)).astype(jnp.float32).sum())(jm.params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


class IntOps(torch.nn.Module):
    def forward(self, x, ids):
        return {
            "argmax": x.argmax(-1), "mask": x > 0, "count": (x > 0).sum(-1), "ids": ids * 2 + 1,
            "cumsum": ids.cumsum(-1), "floordiv": ids // 3, "where": torch.where(x > 0, ids, -ids),
            "float": ids / 2, "half": x.half(), "any": (ids == 3).any(-1), "pos": torch.arange(x.shape[-1]),
            # out-of-range floats wrap through int64 as torch's CPU casts do (XLA alone saturates)
            "uint8": (x * 300).to(torch.uint8), "int8": (x * 300).to(torch.int8), "int16": (x * 1e5).short(),
            "shifts": (ids << 2) + (ids >> 1) + (ids >> ids.abs() % 3) + (ids & 5),
            "sign_nan": torch.sign(torch.where(x > 1, torch.nan, x)),   # 0 for NaN, as torch
        }


@pytest.mark.parametrize("x64", [False, True])
def test_integer_and_bool_results_keep_torch_dtypes(x64):
    x, ids = torch.randn(3, 5), torch.randint(-7, 7, (3, 5))
    with torch.no_grad():
        ref = IntOps()(x, ids)
    with jax.enable_x64(x64):
        jm = bridge.convert(IntOps(), (x, ids))
        got = jax.jit(jm.apply)(jm.params, to_jax(x), to_jax(ids))
        for k, r in ref.items():
            want = np.dtype(jax_dtype(r.dtype))
            assert got[k].dtype == want, (k, got[k].dtype, want)
            if x64:  # with x64 every dtype is torch's own
                assert to_torch(got[k]).dtype == r.dtype, k
            np.testing.assert_array_equal(np.asarray(got[k]).astype(np.float64), r.double().numpy(), err_msg=k)


def test_dtype_mapping_round_trips_bits():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int32, torch.bool):
        t = (torch.randn(17) * 100).to(dtype)
        back = to_torch(np.asarray(to_jax(t)), dtype=dtype)
        assert back.dtype == dtype and torch.equal(back, t), dtype
    assert jnp.dtype(jax_dtype(torch.int64)) in (jnp.int32, jnp.int64)


class _BigIds(torch.nn.Module):
    def __init__(self, big: int):
        super().__init__()
        self.register_buffer("ids", torch.tensor([1, big]))

    def forward(self, x):
        return x + self.ids


@pytest.mark.parametrize("big", [2**31, -2**31 - 1, 2**40])
def test_64_bit_integers_that_do_not_fit_raise_instead_of_wrapping(tmp_path, big):
    """x32 narrows int64 to int32: a value that would wrap names its tensor; with x64 it is kept exactly."""
    x = torch.tensor([3, 4])
    with pytest.raises(StateError, match=r"'ids' of the module: int64 values .* do not fit int32.*jax_enable_x64"):
        bridge.convert(_BigIds(big), (x,))
    safetensors.torch.save_file({"ids": torch.tensor([1, big])}, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"w.safetensors: 'ids': int64 values"):
        bridge.load_weights(tmp_path / "w.safetensors")
    jm = bridge.convert(_BigIds(7), (x,))
    with pytest.raises(InputError, match="an input: int64 values"):
        jm(torch.tensor([3, big]))
    np.testing.assert_array_equal(np.asarray(jm(torch.tensor([3, 2**31 - 8]))), [4, 2**31 - 1])
    with jax.enable_x64(True):
        jm = bridge.convert(_BigIds(big), (x,))
        assert np.asarray(jm(to_jax(x))).tolist() == [4, big + 4]
        assert int(flatten(bridge.load_weights(tmp_path / "w.safetensors"))["ids"][1]) == big


class _Hash(torch.nn.Module):
    def forward(self, ids):
        return (ids * 2654435761 + 97) % 1000003


def test_64_bit_graph_arithmetic_names_the_op_and_x64():
    """A Python int past int32 in the graph (a multiplicative hash) fails naming op, line and the x64 switch;
    with x64 the hash equals torch's."""
    ids = torch.randint(0, 10**6, (6,))
    jm = bridge.convert(_Hash(), (ids,))
    with pytest.raises(LoweringError, match=r"(?s)aten.mul.Tensor failed at .*test_dtypes.py.*jax_enable_x64"):
        jm(to_jax(ids))
    with jax.enable_x64(True):
        jm = bridge.convert(_Hash(), (ids,))
        np.testing.assert_array_equal(np.asarray(jm(to_jax(ids))), _Hash()(ids).numpy())

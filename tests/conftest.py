"""Strict test configuration: 8 simulated CPU devices, fp32 matmuls at full precision,
rank promotion raises and dtype promotion is strict outside the converter, tolerances per dtype.

XLA's LLVM backend compiles without its expensive optimisations: the tests' programs are tiny and compiling
dominates (the HLO passes are unchanged; results can differ in the last bits). make test-full sets
BRIDGE_TEST_XLA_OPT=1: XLA's default pipeline, as users get it.
"""
import os

_FAST_COMPILE = "" if os.environ.get("BRIDGE_TEST_XLA_OPT") == "1" else \
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           + _FAST_COMPILE).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
torch.set_num_threads(2)

# make test runs a representative subset; make test-full (BRIDGE_TEST_FULL=1) adds these
FULL = os.environ.get("BRIDGE_TEST_FULL") == "1"
full_only = pytest.mark.skipif(not FULL, reason="make test-full (BRIDGE_TEST_FULL=1) only")

# relative to the reference's scale (max |ref|); grads per tensor
TOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-3}
GRAD_TOL = 1e-4


def rel_err(got, ref) -> float:
    """max |got - ref| / max(max |ref|, tiny): the error relative to the output's scale."""
    got, ref = (np.asarray(a.detach().to(torch.float64) if isinstance(a, torch.Tensor) else a, dtype=np.float64)
                for a in (got, ref))
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if got.size == 0:
        return 0.0
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-12))


def assert_close(got, ref, dtype="float32", what=""):
    err = rel_err(got, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]} ({dtype})"
    return err


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


def pytest_report_header(config):
    return f"jax {jax.__version__} devices={jax.device_count()} torch {torch.__version__}"

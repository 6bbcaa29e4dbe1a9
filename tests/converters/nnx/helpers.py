"""Helpers for the NNX structural-path tests: layout moves, parity against torch eager, round trips.

Every parity check records its error; the run ends with the max relative error per layer family.
"""
from collections import defaultdict

import jax.numpy as jnp
import numpy as np
import torch

import bridge
from tests.conftest import rel_err

PARITY_TOL = 1e-6           # fp32 forward, relative to the output's scale (the bar for single layers)
_ERRORS: dict[str, float] = defaultdict(float)


def to_cl(x: torch.Tensor):
    """torch (N, C, *S) → channels-last jax array (N, *S, C)."""
    return jnp.asarray(np.moveaxis(x.detach().numpy(), 1, -1))


def from_cl(y) -> np.ndarray:
    return np.moveaxis(np.asarray(y), -1, 1)


def check_parity(family: str, got, ref, tol: float = PARITY_TOL) -> float:
    err = rel_err(np.asarray(got), ref)
    _ERRORS[family] = max(_ERRORS[family], err)
    assert err <= tol, f"{family}: relative error {err:.3g} > {tol}"
    return err


def assert_round_trip(module: torch.nn.Module, fm=None):
    """from_flax(to_flax(module)) equals module.state_dict(): keys, order, dtypes, bits."""
    fm = bridge.to_flax(module) if fm is None else fm
    got, ref = bridge.from_flax(fm), module.state_dict()
    assert list(got) == list(ref)
    for k, t in ref.items():
        assert got[k].dtype == t.dtype, (k, got[k].dtype, t.dtype)
        assert torch.equal(got[k], t), k
    return fm

"""dtype mapping between torch and JAX, and array conversion without an fp32 detour.

Policy for 64-bit types: with `jax_enable_x64` on, every torch dtype maps to the same
JAX dtype. With it off (JAX's default), int64/float64/complex128 narrow to their 32-bit kin
exactly as JAX canonicalizes them; the kind (int, bool, float) is always kept, and the
torch dtype is recorded so exports restore it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch

_TORCH_TO_NP = {
    torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
    torch.float16: np.dtype(np.float16), torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
    torch.int8: np.dtype(np.int8), torch.int16: np.dtype(np.int16), torch.int32: np.dtype(np.int32),
    torch.int64: np.dtype(np.int64), torch.uint8: np.dtype(np.uint8), torch.bool: np.dtype(np.bool_),
    torch.complex64: np.dtype(np.complex64), torch.complex128: np.dtype(np.complex128),
    torch.uint16: np.dtype(np.uint16), torch.uint32: np.dtype(np.uint32), torch.uint64: np.dtype(np.uint64),
    torch.float8_e4m3fn: np.dtype(ml_dtypes.float8_e4m3fn), torch.float8_e5m2: np.dtype(ml_dtypes.float8_e5m2),
    torch.float8_e4m3fnuz: np.dtype(ml_dtypes.float8_e4m3fnuz), torch.float8_e5m2fnuz: np.dtype(ml_dtypes.float8_e5m2fnuz),
    torch.float8_e8m0fnu: np.dtype(ml_dtypes.float8_e8m0fnu),   # MX block scales
}
_NP_TO_TORCH = {v: k for k, v in _TORCH_TO_NP.items()}
# same-width integer views used to move dtypes numpy lacks through torch.Tensor.numpy()
_VIEW_AS = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.int8, torch.float8_e5m2: torch.int8,
            torch.float8_e4m3fnuz: torch.int8, torch.float8_e5m2fnuz: torch.int8, torch.float8_e8m0fnu: torch.uint8,
            torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The exact numpy dtype of a torch dtype (bf16 → ml_dtypes.bfloat16)."""
    try:
        return _TORCH_TO_NP[dtype]
    except KeyError:
        raise TypeError(f"torch dtype {dtype} has no JAX equivalent") from None


def jax_dtype(dtype: torch.dtype | None) -> np.dtype:
    """The JAX dtype arrays of this torch dtype get under the current x64 setting."""
    if dtype is None:
        dtype = torch.get_default_dtype()
    return jax.dtypes.canonicalize_dtype(numpy_dtype(dtype))


def torch_dtype(dtype) -> torch.dtype:
    try:
        return _NP_TO_TORCH[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"dtype {dtype} has no torch equivalent") from None


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Exact host copy (or view) of a torch tensor as numpy, keeping bf16/fp8 bits."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj() or t.is_neg():   # lazy views (`z.conj().imag`): numpy sees the raw bits
        t = t.resolve_conj().resolve_neg()
    if t.dtype in _VIEW_AS:
        return t.contiguous().view(_VIEW_AS[t.dtype]).numpy().view(numpy_dtype(t.dtype))
    return t.numpy()


def narrow(arr: np.ndarray, want, what: str = "a tensor", error: type[Exception] | None = OverflowError) -> np.ndarray:
    """`arr` cast to `want` (the x32 narrowing of 64-bit types). Integers that do not fit raise `error`
    naming `what` instead of wrapping around: a value narrowing cannot keep is never lost silently.
    error=None saturates them instead (for sentinels such as a graph constant's int64 max).

    Example:
        >>> narrow(np.array([2**40]), np.int32, "buffer 'ids'")   # OverflowError: ... jax_enable_x64
    """
    want = np.dtype(want)
    if arr.dtype == want:
        return arr
    if arr.size and arr.dtype.kind in "iu" and want.kind in "iu":
        lo, hi, info = arr.min(), arr.max(), np.iinfo(want)
        if lo < info.min or hi > info.max:
            if error is None:
                return np.clip(arr, info.min, info.max).astype(want)
            raise error(f"{what}: {arr.dtype} values in [{lo}, {hi}] do not fit {want}, which JAX holds them "
                        f"in while jax_enable_x64 is off; call jax.config.update('jax_enable_x64', True) at "
                        "start-up to keep them exactly")
    return arr.astype(want)


def to_jax(t: torch.Tensor, what: str = "a tensor", error: type[Exception] | None = OverflowError) -> jax.Array:
    """torch tensor → jax.Array (dtype per the module policy). Never aliases torch's memory:
    torch may later update the tensor in place (BatchNorm stats, optimizers)."""
    arr = to_numpy(t)
    return jnp.array(narrow(arr, jax.dtypes.canonicalize_dtype(arr.dtype), what, error), copy=True)


def to_torch(x, dtype: torch.dtype | None = None) -> torch.Tensor:
    """jax/numpy array → torch tensor, bit-exact; `dtype` restores a recorded torch dtype."""
    arr = np.asarray(x)
    target = dtype or torch_dtype(arr.dtype)
    if arr.dtype != numpy_dtype(target):
        arr = arr.astype(numpy_dtype(target))
    if target in _VIEW_AS:
        return torch.from_numpy(np.array(arr, copy=True).view(numpy_dtype(_VIEW_AS[target]))).view(target)
    return torch.from_numpy(np.array(arr, copy=True))


def is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating)

"""Parity report: a converted model against its torch original, forward and gradients.

Example:
    >>> report = bridge.parity_report(model, jm, kwargs={"input_ids": ids})
    >>> print(format_report(report))
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bridge.tree import as_torch_grads, flatten
from converters.dtypes import to_jax
from converters.programs import reference_module


def _leaves(out):
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):
        return {k: out[k] for k in out.keys()}
    if isinstance(out, dict):
        return out
    if isinstance(out, (tuple, list)):
        return {str(i): v for i, v in enumerate(out)}
    return {"output": out}


def _wide(a) -> np.ndarray:
    """float64 (complex128 for complex) numpy copy of an array or tensor."""
    if isinstance(a, torch.Tensor):
        a = a.detach().resolve_conj()
        a = a.to(torch.complex128 if a.is_complex() else torch.float64).numpy()
    a = np.asarray(a)
    return a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)


def rel_err(got, ref) -> float:
    """max |got - ref| / max |ref|: the error relative to the output's scale (arrays or tensors)."""
    got, ref = _wide(got), _wide(ref)
    return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-12)) if ref.size else 0.0


def _rel(got, ref) -> tuple[float, float]:
    got, ref = _wide(got), _wide(ref)
    err = float(np.max(np.abs(got - ref))) if got.size else 0.0
    return err, err / max(float(np.max(np.abs(ref))) if ref.size else 0.0, 1e-12)


def parity_report(module: torch.nn.Module | torch.export.ExportedProgram, jm, args=(), kwargs=None, *,
                  grads: bool = True) -> dict:
    """Forward errors per output (under jax.jit) and the worst per-parameter gradient error.

    Gradients are of sum(output * fixed random weights) over the first floating output.
    """
    kwargs = kwargs or {}
    jargs = [to_jax(a) if isinstance(a, torch.Tensor) else a for a in args]
    jkw = {k: to_jax(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    if isinstance(module, torch.export.ExportedProgram):   # runs as exported (its mode is part of it)
        module = reference_module(module)
    else:
        module.eval()
    with torch.no_grad():
        ref = _leaves(module(*args, **kwargs))
    fwd = jax.jit(jm.apply)
    t0 = time.perf_counter()
    got = fwd(jm.params, *jargs, **jkw)
    jax.block_until_ready(got)
    compile_s = time.perf_counter() - t0
    got = _leaves(got)
    report = {"outputs": {}, "compile_s": compile_s}
    for k, r in ref.items():
        if isinstance(r, torch.Tensor) and k in got:
            abs_err, rel_err = _rel(got[k], r)
            report["outputs"][k] = {"shape": tuple(r.shape), "dtype": str(r.dtype).replace("torch.", ""),
                                    "max_abs_err": abs_err, "rel_err": rel_err}
    if grads:
        key = next(k for k, r in ref.items() if isinstance(r, torch.Tensor) and r.is_floating_point())
        module.zero_grad()
        out = _leaves(module(*args, **kwargs))[key]
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
        (out * w).sum().backward()
        wj = to_jax(w)
        g = as_torch_grads(jax.jit(jax.grad(lambda p: jnp.sum(_leaves(jm.apply(p, *jargs, **jkw))[key] * wj)))(
            jm.params))
        worst, worst_name = 0.0, None
        with_grad = [(n, p) for n, p in module.named_parameters() if p.grad is not None]
        scale = max((float(p.grad.abs().max()) for _, p in with_grad), default=0.0)
        for name, p in with_grad:
            # a gradient that is zero in exact arithmetic (e.g. attention key biases) is rounding noise
            # in both frameworks: measure it against 1e-2 of the largest gradient instead of itself
            abs_err, _ = _rel(flatten(g)[name], p.grad)
            rel = abs_err / max(float(p.grad.abs().max()), 1e-2 * scale, 1e-30)
            if rel > worst:
                worst, worst_name = rel, name
        report["grad_rel_err"] = worst
        report["grad_worst_param"] = worst_name
        module.zero_grad()
    return report


def format_report(report: dict) -> str:
    lines = [f"{'output':<22} {'shape':<18} {'dtype':<9} {'max abs err':>12} {'rel err':>10}"]
    for k, r in report["outputs"].items():
        lines.append(f"{k:<22} {str(r['shape']):<18} {r['dtype']:<9} {r['max_abs_err']:>12.3e} {r['rel_err']:>10.3e}")
    if "grad_rel_err" in report:
        lines.append(f"gradients: worst relative error {report['grad_rel_err']:.3e} ({report['grad_worst_param']})")
    lines.append(f"jit compile + first run: {report['compile_s']:.2f}s")
    return "\n".join(lines)


__all__ = ["parity_report", "format_report"]

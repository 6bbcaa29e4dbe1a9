"""Parity report: a converted model against its torch original, forward and gradients.

Every leaf of the output tree is compared (nested dicts, lists, tuples and ModelOutputs included), named by
its path: 'logits', '1.logits', 'hidden_states.0'; a bare tensor output is 'output'.

Example:
    >>> report = bridge.parity_report(model, jm, kwargs={"input_ids": ids})
    >>> print(format_report(report))
    >>> failures(report)          # [] when every output is within its dtype's tolerance
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bridge.tree import as_torch_grads, flatten
from converters.dtypes import to_jax
from converters.programs import reference_module
from converters.structure import as_jax_inputs

# default relative tolerances of half-precision outputs: a few units in their last place (bf16 keeps 8
# significant bits, fp16 11); every other dtype (float32/64, complex, integers) gets the caller's fp32 default
HALF_RTOL = {"bfloat16": 2e-2, "float16": 5e-3}
_ABSENT = object()


def default_rtol(dtype, fp32: float = 1e-4) -> float:
    """The relative tolerance an output (or graph node) of `dtype` is judged by when none is given:
    `fp32` for float32/float64, complex and integer tensors, HALF_RTOL for bfloat16 / float16."""
    return HALF_RTOL.get(str(dtype).replace("torch.", ""), fp32)


def output_leaves(out, prefix: str = "") -> dict:
    """Every leaf of an output tree by its '.'-joined path (Mappings and ModelOutputs by key, dataclasses by
    field, tuples/lists/NamedTuples by index); a bare leaf is 'output'."""
    leaves: dict = {}

    def walk(x, path):
        if isinstance(x, Mapping):
            items = [(str(k), v) for k, v in x.items()]
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            items = [(f.name, getattr(x, f.name)) for f in dataclasses.fields(x)]
        elif isinstance(x, (tuple, list)):
            items = [(str(i), v) for i, v in enumerate(x)]
        else:
            leaves[path or "output"] = x
            return
        for k, v in items:
            walk(v, f"{path}.{k}" if path else k)

    walk(out, prefix)
    return leaves


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


def _same_value(got, ref) -> bool:
    """A Python output value (int, str, None...) of JAX against torch's."""
    if got is _ABSENT:
        return ref is None   # a None field that the JAX side leaves out
    if hasattr(got, "shape") and not isinstance(ref, str):
        try:
            return bool(np.asarray(got).tolist() == ref)
        except (TypeError, ValueError):
            return False
    return type(got) is type(ref) and got == ref


def parity_report(module: torch.nn.Module | torch.export.ExportedProgram, jm, args=(), kwargs=None, *,
                  grads: bool = True, rng=None) -> dict:
    """Forward errors per output leaf (under jax.jit, over the array leaves) and the worst per-parameter
    gradient error.

    report["outputs"]: {path: shape, dtype, max_abs_err, rel_err} for every tensor leaf; report["values"]:
    {path: torch, jax, equal} for every other leaf (Python ints, strings, None), compared for equality;
    report["missing"]: tensor paths the JAX output lacks (or holds with another shape). `failures(report)`
    judges them.
    Gradients are of sum(output * fixed random weights) over the first floating output; where there is none,
    no parameter reaches it, or `rng` is given, they are skipped and report["grad_note"] says why.
    `rng`: the PRNG key of a model that draws random numbers; torch and JAX draw different streams, so the
    outputs that depend on the draws are not expected to match.
    """
    kwargs = kwargs or {}
    jargs, jkw = as_jax_inputs((tuple(args), dict(kwargs)))
    if isinstance(module, torch.export.ExportedProgram):   # runs as exported (its mode is part of it)
        module = reference_module(module)
    else:
        module.eval()
    with torch.no_grad():
        ref = output_leaves(module(*args, **kwargs))
    t0 = time.perf_counter()
    got = jm(*args, rng=rng, **kwargs)   # compiled over the array inputs and outputs; Python values kept
    jax.block_until_ready([x for x in jax.tree.leaves(got) if isinstance(x, jax.Array)])
    compile_s = time.perf_counter() - t0
    got = output_leaves(got)
    report = {"outputs": {}, "values": {}, "missing": [], "compile_s": compile_s}
    for k, r in ref.items():
        g = got.get(k, _ABSENT)
        if isinstance(r, torch.Tensor):
            if not hasattr(g, "shape") or tuple(g.shape) != tuple(r.shape):
                report["missing"].append(k if g is _ABSENT else f"{k} (JAX: {getattr(g, 'shape', type(g).__name__)})")
                continue
            abs_err, rel_err = _rel(g, r)
            report["outputs"][k] = {"shape": tuple(r.shape), "dtype": str(r.dtype).replace("torch.", ""),
                                    "max_abs_err": abs_err, "rel_err": rel_err}
        else:
            report["values"][k] = {"torch": repr(r), "jax": "(absent)" if g is _ABSENT else repr(g),
                                   "equal": _same_value(g, r)}
    if grads:
        _grad_check(report, module, jm, ref, args, kwargs, jargs, jkw, rng)
    return report


def _grad_check(report, module, jm, ref, args, kwargs, jargs, jkw, rng) -> None:
    key = next((k for k, r in ref.items() if isinstance(r, torch.Tensor) and r.is_floating_point()
                and k in report["outputs"]), None)
    if key is None:
        report["grad_note"] = "gradient check skipped: no floating-point output"
        return
    if rng is not None:
        report["grad_note"] = "gradient check skipped: the model draws random numbers (torch's and JAX's differ)"
        return
    module.zero_grad()
    with torch.enable_grad():
        out = output_leaves(module(*args, **kwargs))[key]
        if not out.requires_grad:
            report["grad_note"] = f"gradient check skipped: no parameter's gradient reaches output {key!r}"
            return
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
        (out * w).sum().backward()
    wj = to_jax(w)
    g = as_torch_grads(jax.jit(jax.grad(lambda p: jnp.sum(output_leaves(jm.apply(p, *jargs, **jkw))[key] * wj)))(
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
    report["grad_output"] = key
    module.zero_grad()


def failures(report: dict, rtol: float | None = None, *, fp32: float = 1e-4) -> list[str]:
    """What fails in a parity report: outputs whose relative error exceeds `rtol` (default: by dtype,
    `default_rtol(dtype, fp32)`), Python values that differ, tensor outputs JAX lacks. [] when all agree."""
    bad = [f"output {k}: relative error {r['rel_err']:.3g} > {tol:g} ({r['dtype']})"
           for k, r in report["outputs"].items()
           if not r["rel_err"] <= (tol := rtol if rtol is not None else default_rtol(r["dtype"], fp32))]
    bad += [f"output {k}: JAX gives {v['jax']}, torch {v['torch']}" for k, v in report["values"].items()
            if not v["equal"]]
    bad += [f"output {k}: torch returns a tensor here, JAX does not" for k in report["missing"]]
    return bad


def tolerances(report: dict, rtol: float | None = None, *, fp32: float = 1e-4) -> str:
    """The tolerance(s) the report's outputs are judged by, e.g. '1e-05' or 'bfloat16 0.02, float32 1e-05'."""
    if rtol is not None:
        return f"{rtol:g}"
    by_dtype = {r["dtype"]: default_rtol(r["dtype"], fp32) for r in report["outputs"].values()}
    if len(set(by_dtype.values())) <= 1:
        return f"{next(iter(by_dtype.values()), fp32):g}"
    return ", ".join(f"{d} {t:g}" for d, t in sorted(by_dtype.items()))


def format_report(report: dict) -> str:
    width = max([22, *(len(k) for k in report["outputs"])])
    lines = [f"{'output':<{width}} {'shape':<18} {'dtype':<9} {'max abs err':>12} {'rel err':>10}"]
    for k, r in report["outputs"].items():
        lines.append(f"{k:<{width}} {str(r['shape']):<18} {r['dtype']:<9} {r['max_abs_err']:>12.3e} "
                     f"{r['rel_err']:>10.3e}")
    for k, v in report.get("values", {}).items():
        lines.append(f"{k:<{width}} {'value':<18} {'':<9} {'equal' if v['equal'] else 'DIFFERS':>12} "
                     f"torch {v['torch']}, JAX {v['jax']}")
    for k in report.get("missing", ()):
        lines.append(f"{k:<{width}} missing from the JAX output")
    if "grad_rel_err" in report:
        lines.append(f"gradients: worst relative error {report['grad_rel_err']:.3e} ({report['grad_worst_param']})")
    elif "grad_note" in report:
        lines.append(report["grad_note"])
    lines.append(f"jit compile + first run: {report['compile_s']:.2f}s")
    return "\n".join(lines)


__all__ = ["parity_report", "format_report", "failures", "default_rtol", "output_leaves"]

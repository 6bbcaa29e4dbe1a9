"""How fast a train step could be on this machine: its matmul FLOPs at the machine's measured matmul rate.

A step cannot run faster than its dots and convolutions at the best rate either library reaches on
one large fp32 matmul here; everything else (softmax passes over the logits, the optimizer, layer
norms) only adds. The benchmark reports this floor next to the measured steps, so a ratio target can
be checked against what the hardware allows.

The floor assumes both libraries multiply at one rate. `dot_seconds` checks that at the step's own
shapes: it runs every distinct dot of the step alone, in jax and in torch, and adds up each library's
times, so a gap in GEMM speed shows apart from everything else the step does.

Example:
    >>> jaxpr = jax.jit(step).trace(*args).jaxpr
    >>> floor_ms = 1e3 * dot_gflop(jaxpr) / matmul_peak_gflops()["best"]
    >>> jax_s, torch_s = (dot_seconds(dot_shapes(jaxpr), lib) for lib in ("jax", "torch"))
"""
from __future__ import annotations

import math
import string
import time
from collections import Counter

import jax
from jax.extend import core as jex_core
import numpy as np
import torch


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (_, rc), (_, rb) = eqn.params["dimension_numbers"]
    rhs_free = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
    return 2.0 * math.prod(lhs) * math.prod(rhs_free)


def _conv_flops(eqn) -> float:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    out_features = rhs[dn.rhs_spec[0]]
    return 2.0 * math.prod(out) * math.prod(rhs) / out_features


_COUNTERS = {"dot_general": _dot_flops, "conv_general_dilated": _conv_flops}


def _subjaxprs(params):
    for v in params.values():
        for item in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def dot_gflop(jaxpr) -> float:
    """GFLOP of every dot_general and conv_general_dilated in `jaxpr` (nested calls included; a scan's
    body counts `length` times, a while body once). The traced program is counted as written, before
    XLA's dead-code elimination: fine for train steps, which need every forward value."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        count = _COUNTERS.get(eqn.primitive.name)
        if count is not None:
            total += count(eqn) / 1e9
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        total += times * sum(dot_gflop(sub) for sub in _subjaxprs(eqn.params))
    return total


def _best_rate(fn, flop: float, repeats: int = 5) -> float:
    fn()
    best = min(_timed(fn) for _ in range(repeats))
    return flop / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_peak_gflops(n: int = 2048) -> dict:
    """Best fp32 GFLOP/s of an n×n×n matmul in torch and in jax (full precision) on this machine."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ja, jb = jax.device_put(a), jax.device_put(b)
    mm = jax.jit(lambda x, y: jax.numpy.matmul(x, y, precision="highest"))
    flop = 2.0 * n ** 3
    rates = {"torch": _best_rate(lambda: torch.mm(ta, tb), flop),
             "jax": _best_rate(lambda: mm(ja, jb).block_until_ready(), flop)}
    return {**rates, "best": max(rates.values()), "n": n}


def dot_shapes(jaxpr) -> Counter:
    """How often each distinct fp32 dot (lhs shape, rhs shape, dimension numbers) runs in `jaxpr`,
    nested calls included (a scan's body `length` times, as `dot_gflop` counts)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    found: Counter = Counter()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs, rhs = (v.aval for v in eqn.invars[:2])
            if lhs.dtype == rhs.dtype == np.float32:
                found[(lhs.shape, rhs.shape, eqn.params["dimension_numbers"])] += 1
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in _subjaxprs(eqn.params):
            for key, n in dot_shapes(sub).items():
                found[key] += times * n
    return found


def _einsum_spec(lhs_nd: int, rhs_nd: int, dims) -> str:
    """lax.dot_general's dimension numbers as an einsum string (output: batch, lhs free, rhs free)."""
    (lc, rc), (lb, rb) = dims
    letters = iter(string.ascii_letters)
    lhs, rhs = [None] * lhs_nd, [None] * rhs_nd
    for pair in (*zip(lb, rb), *zip(lc, rc)):
        lhs[pair[0]] = rhs[pair[1]] = next(letters)
    lhs = [c or next(letters) for c in lhs]
    rhs = [c or next(letters) for c in rhs]
    out = [lhs[i] for i in lb] + [c for i, c in enumerate(lhs) if i not in lb and i not in lc] + \
        [c for i, c in enumerate(rhs) if i not in rb and i not in rc]
    return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"


def dot_seconds(shapes: Counter, lib: str, repeats: int = 3) -> float:
    """Seconds the dots in `shapes` (from `dot_shapes`) take run one at a time in `lib` ("jax": one
    jitted lax.dot_general each, fp32 "highest"; "torch": torch.einsum), best of `repeats` per shape."""
    rng = np.random.default_rng(0)
    total = 0.0
    for (ls, rs, dims), count in shapes.items():
        a, b = rng.standard_normal(ls, dtype=np.float32), rng.standard_normal(rs, dtype=np.float32)
        if lib == "jax":
            ja, jb = jax.device_put(a), jax.device_put(b)
            f = jax.jit(lambda x, y, dims=dims: jax.lax.dot_general(x, y, dims, precision="highest"))
            fn = lambda f=f, ja=ja, jb=jb: f(ja, jb).block_until_ready()  # noqa: E731
        else:
            spec, ta, tb = _einsum_spec(len(ls), len(rs), dims), torch.from_numpy(a), torch.from_numpy(b)
            fn = lambda spec=spec, ta=ta, tb=tb: torch.einsum(spec, ta, tb)  # noqa: E731
        fn()
        total += count * min(_timed(fn) for _ in range(repeats))
    return total

"""OpInfo sweep shared by tests/converters/ops/test_opinfo.py and scripts/op_coverage.py.

For one OpInfo entry (`op.name` + `.variant_test_name`, e.g. "max.reduction_with_dim"):

* forward: the first samples (`MAX_SAMPLES` per dtype, or all with BRIDGE_OPINFO_ALL=1 / BRIDGE_TEST_FULL=1)
  in float32 (integer/bool/complex only where the op has no float32 CPU kernel) and in bfloat16 where
  the op supports it. Each sample's tensors (sample.input + tensor args/kwargs, flattened with torch's
  pytree) become inputs of a `torch.nn.Module`; everything else is closed over as a constant. The module
  is exported with `bridge.convert(module, tensors, strict=False)`, run under `jax.jit(jm.apply)` and
  compared with torch eager per sample and output: values (float32 rtol = atol = 1e-5, bfloat16 2e-2,
  integer/bool exactly, or the op's entry in TOLERANCES) and dtypes (`jax_dtype(torch_out.dtype)`).
  Where torch itself disagrees, torch run on the same values in a wider dtype (float64 for float32,
  float32 for bfloat16) is accepted as the reference instead.
* grad: d/dx sum(out * w) (fixed random w per floating output) w.r.t. every floating input of the
  float32 samples (those the sample marks requires_grad where torch cannot differentiate all of them),
  `jax.jit(jax.grad(...))` against torch autograd: max|err| / max|ref| <= 1e-4 per input (conftest's
  GRAD_TOL), float64 torch accepted as above.

Speed: every sample of an op (all dtypes) goes into ONE module, so an op costs one export (~0.2-0.3 s
however small the graph) and one XLA compile per kind, and the grad test reuses the forward test's
conversion (`CACHE`, keyed by shapes, dtypes and constants, so equal samples are never exported twice).
Only when the combined conversion fails for another reason than missing lowerings are the samples
converted one by one, so each sample is still classified on its own: "export-fail" (torch.export cannot
capture it), "unsupported" (`UnsupportedOpsError`: missing ATen ops), "lowering-error", "mismatch", "pass".

Random ops (RANDOM_OPS, uninitialized-memory ops, samples whose torch output changes with the seed, and
samples whose outputs depend on a node of the program that draws random numbers) are checked for shape
and dtype only.

An op "passes" a kind when every captured sample passes; an op none of whose samples torch.export can
capture is "export-fail" and does not count in the denominators.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import os
import time
import traceback
import warnings
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.utils._pytree as pytree

import bridge
from bridge.errors import CaptureError, UnsupportedOpsError
from converters.dtypes import jax_dtype, to_jax
from converters.registry import registered

ALL_SAMPLES = os.environ.get("BRIDGE_OPINFO_ALL") == "1" or os.environ.get("BRIDGE_TEST_FULL") == "1"
MAX_SAMPLES = 3              # per op and dtype in the default (CI) mode
EXPORT_STRICT = False        # torch.export's own default; strict (dynamo) capture is 2x slower here

FWD_TOL = {"float32": (1e-5, 1e-5), "bfloat16": (2e-2, 2e-2)}   # (rtol, atol), elementwise
GRAD_TOL = 1e-4                                                  # max|got-ref| / max|ref| per input

# Ops whose values come from a RNG (or from uninitialized memory): compared on shape and dtype only.
RANDOM_OPS = frozenset({
    "bernoulli", "cauchy", "exponential", "geometric", "log_normal", "normal", "normal.in_place",
    "normal.number_mean", "uniform", "multinomial", "rand_like", "randint", "randint_like", "randn",
    "randn_like", "nn.functional.dropout", "nn.functional.dropout2d", "nn.functional.dropout3d",
    "nn.functional.alpha_dropout", "nn.functional.feature_alpha_dropout.with_train", "nn.functional.rrelu",
    "nn.functional.fractional_max_pool2d", "nn.functional.fractional_max_pool3d", "svd_lowrank", "pca_lowrank",
})
UNINITIALIZED_OPS = frozenset({
    "empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided", "empty_permuted",
})
# Ops whose torch backward is nondeterministic on their samples: gradients compared on shape and dtype.
NONDETERMINISTIC_GRAD_OPS = {
    op: "duplicate unpooling indices make torch's backward nondeterministic; OpInfo checks these "
        "gradients in the '.grad' variants, whose samples have unique indices"
    for op in ("nn.functional.max_unpool1d", "nn.functional.max_unpool2d", "nn.functional.max_unpool3d")
}

# Ops whose index outputs torch leaves implementation-defined for ties (the default sort is unstable,
# topk uses nth_element): an index output passes when it selects elements equal to torch's selection.
TIE_ORDER_OPS = {
    op: "torch's unstable sort / nth_element orders tied elements in an implementation-defined way; "
        "we return the stable order (torch's stable=True)"
    for op in ("sort", "argsort", "topk", "mode", "msort")
}

# Per-op tolerances, each with its reason: {op: {"fwd": (rtol, atol), "grad": rel, "why": "..."}}.
# Add an entry only with the numbers that justify it; everything else uses FWD_TOL / GRAD_TOL.
TOLERANCES: dict[str, dict[str, Any]] = {
    "matrix_exp": {"fwd": (1e-5, 0.1), "why": (
        "sample matrices have 1-norm 28: exp entries reach 9.3e4 and small entries come from cancellation; "
        "fp32 Pade (JAX) vs Taylor-18 (torch) both err ~3e-7 of the output scale (ours 3.4e-7, torch fp32 "
        "5.4e-7 vs float64), i.e. up to 0.03-0.07 absolute on entries near 20")},
    "nn.functional.conv2d": {"fwd": (1e-5, 5e-5), "why": (
        "fp32 accumulation: sample 23 (depthwise 3x3, inputs in [-9, 9]) sums 9 products with partial sums "
        "near 100 (ulp 7.6e-6) into 0.27; ours is 1.65e-5 off float64, torch's own fp32 1.65e-5")},
    "nn.functional.conv_transpose3d": {"fwd": (1e-5, 3e-4), "why": (
        "fp32 accumulation: sample 8 sums 108 products into outputs up to 890 (ulp 6.1e-5); ours is "
        "1.43e-4 off float64 on a small entry, torch's own fp32 9.9e-5")},
}

STATUSES = ("pass", "mismatch", "lowering-error", "unsupported", "export-fail", "n/a")
_RANK = {"unsupported": 4, "lowering-error": 3, "mismatch": 2, "pass": 1, "export-fail": 0, "n/a": -1}


# ------------------------------------------------------------------------------------------ ops
def op_key(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


@functools.lru_cache(maxsize=None)
def op_list() -> tuple:
    from torch.testing._internal.common_methods_invocations import op_db
    return tuple(op_db)


@functools.lru_cache(maxsize=None)
def op_by_key() -> dict:
    return {op_key(op): op for op in op_list()}


def primary_dtype(op) -> torch.dtype | None:
    """float32, or the op's most common CPU dtype where it has no float32 kernel (bitwise, gcd, ...)."""
    supported = op.supported_dtypes("cpu")
    for d in (torch.float32, torch.int64, torch.int32, torch.bool, torch.complex64):
        if d in supported:
            return d
    return None


def forward_dtypes(op) -> list[torch.dtype]:
    prim = primary_dtype(op)
    if prim is None:
        return []
    out = [prim]
    if prim == torch.float32 and torch.bfloat16 in op.supported_dtypes("cpu"):
        out.append(torch.bfloat16)
    return out


def is_differentiable(op) -> bool:
    return bool(op.supports_autograd) and primary_dtype(op) == torch.float32


def is_random(op) -> bool:
    key = op_key(op)
    return key in RANDOM_OPS or key in UNINITIALIZED_OPS or bool(getattr(op, "nondeterministic_seeded", False))


def tolerance(key: str, kind: str, dtype: str = "float32"):
    entry = TOLERANCES.get(key, {})
    if kind == "grad":
        return entry.get("grad", GRAD_TOL)
    if dtype == "float32" and "fwd" in entry:
        return entry["fwd"]
    if dtype == "bfloat16" and "bf16" in entry:
        return entry["bf16"]
    return FWD_TOL.get(dtype, FWD_TOL["float32"])


def _dname(d) -> str:
    return str(d).replace("torch.", "")


# -------------------------------------------------------------------------------------- samples
@dataclasses.dataclass
class Prepared:
    """One sample: its pytree with the tensor leaves cut out, and the tensors themselves."""
    dtype: str                   # the dtype the sample was generated in ("float32", "bfloat16", ...)
    index: int
    spec: Any
    consts: list                 # leaves with tensors replaced by None
    tensor_pos: list[int]        # where the tensors go back
    tensors: list[torch.Tensor]  # detached inputs
    requires_grad: list[bool]    # what the sample asked for, per tensor
    process: Callable            # sample.output_process_fn_grad (identity for most samples)
    fn: Callable

    @property
    def id(self) -> tuple[str, int]:
        return self.dtype, self.index

    def call(self, tensors):
        leaves = list(self.consts)
        for pos, t in zip(self.tensor_pos, tensors):
            leaves[pos] = t
        inp, args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return self.process(self.fn(inp, *args, **kwargs))


def _prepare(op, dtype: str, index: int, sample) -> Prepared:
    leaves, spec = pytree.tree_flatten((sample.input, tuple(sample.args), dict(sample.kwargs)))
    pos = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    consts = [None if i in pos else leaf for i, leaf in enumerate(leaves)]
    process = getattr(sample, "output_process_fn_grad", None) or (lambda x: x)
    return Prepared(dtype, index, spec, consts, pos, [leaves[i].detach() for i in pos],
                    [leaves[i].requires_grad for i in pos], process, op.op)


def samples(op, dtype: torch.dtype, requires_grad: bool, limit: int | None) -> list[Prepared]:
    torch.manual_seed(zlib.crc32(op_key(op).encode()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = op.sample_inputs("cpu", dtype, requires_grad=requires_grad)
        try:
            return [_prepare(op, _dname(dtype), i, s) for i, s in enumerate(itertools.islice(gen, limit))]
        finally:  # finish the generator now, not when it is collected in the middle of an export
            close = getattr(gen, "close", None)
            if close is not None:
                close()


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def _run_eager(p: Prepared, cast: torch.dtype | None = None, seed: int | None = None):
    tensors = [_clone(t) for t in p.tensors]
    if cast is not None:
        tensors = [t.to(cast) if t.is_floating_point() else t for t in tensors]
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = p.call(tensors)
    return [(_clone(x) if isinstance(x, torch.Tensor) else x) for x in pytree.tree_leaves(out)]


def _same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.layout != torch.strided or y.layout != torch.strided:
                x, y = x.to_dense(), y.to_dense()
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            if not torch.equal(torch.nan_to_num(x) if x.is_floating_point() else x,
                               torch.nan_to_num(y) if y.is_floating_point() else y):
                return False
        elif not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor):
            if not (x == y or (x != x and y != y)):
                return False
        else:
            return False
    return True


@dataclasses.dataclass
class OpSamples:
    """Everything both tests of an op need: the samples of every dtype and torch's outputs for them."""
    prepared: list[Prepared]                 # samples torch eager runs, float32 first
    refs: dict[tuple[str, int], list]        # id -> torch's flat outputs
    random: set[tuple[str, int]]             # ids whose outputs change with the seed: shape/dtype only
    failed: list["SampleOutcome"]            # samples torch itself cannot run (n/a)
    dtypes: list[str]


_SAMPLES: collections.OrderedDict = collections.OrderedDict()


def op_samples(op, all_samples: bool) -> OpSamples:
    """The op's samples in each forward dtype, with torch eager outputs; memoized (LRU of 4)."""
    memo = (op_key(op), all_samples)
    if memo in _SAMPLES:
        _SAMPLES.move_to_end(memo)
        return _SAMPLES[memo]
    limit = None if all_samples else MAX_SAMPLES
    prepared, refs, random, failed = [], {}, set(), []
    for dtype in forward_dtypes(op):
        dn = _dname(dtype)
        # float32 samples carry requires_grad like the grad test's: one export serves both tests
        rg = dtype == torch.float32 and is_differentiable(op)
        try:
            batch = samples(op, dtype, rg, limit)
        except Exception as e:
            failed.append(SampleOutcome(-1, dn, "n/a", "sample_inputs failed: " + _short(e)))
            continue
        for p in batch:
            try:
                refs[p.id] = _run_eager(p, seed=0)
                if not _same(refs[p.id], _run_eager(p, seed=1)):
                    random.add(p.id)
                prepared.append(p)
            except Exception as e:
                failed.append(SampleOutcome(p.index, dn, "n/a", "torch eager failed: " + _short(e)))
    out = OpSamples(prepared, refs, random, failed, [_dname(d) for d in forward_dtypes(op)])
    _SAMPLES[memo] = out
    if len(_SAMPLES) > 4:
        _SAMPLES.popitem(last=False)
    return out


# ----------------------------------------------------------------------------------- the module
class SampleBatch(torch.nn.Module):
    """forward(*all tensors of all samples) -> tuple of each sample's output."""

    def __init__(self, prepared: list[Prepared]):
        super().__init__()
        self._prepared = prepared
        self._counts = [len(p.tensors) for p in prepared]

    def forward(self, *tensors):
        outs, i = [], 0
        for p, n in zip(self._prepared, self._counts):
            outs.append(p.call(tensors[i:i + n]))
            i += n
        return tuple(outs)


def _signature(prepared: list[Prepared]):
    """Hashable description of what the export depends on: shapes/dtypes and the constants."""
    parts = []
    for p in prepared:
        metas = tuple((tuple(t.shape), t.dtype, t.layout, t.stride() if t.layout == torch.strided else None)
                      for t in p.tensors)
        try:
            consts = repr(p.consts)
        except Exception:  # a constant without a repr: never share
            consts = object()
        parts.append((str(p.spec), consts, metas))
    return tuple(parts)


class _ExportCache:
    """Small LRU of conversions keyed by (op, signature): the forward and grad tests of one op share
    one export, and samples with equal shapes, dtypes and constants are never exported twice."""

    def __init__(self, size: int = 16):
        self.size = size
        self.data: collections.OrderedDict = collections.OrderedDict()
        self.hits = self.misses = 0

    def convert(self, key: str, prepared: list[Prepared]):
        sig = (key, _signature(prepared))
        if sig in self.data:
            self.hits += 1
            self.data.move_to_end(sig)
            res = self.data[sig]
        else:
            self.misses += 1
            res = _convert(prepared)
            self.data[sig] = res
            if len(self.data) > self.size:
                self.data.popitem(last=False)
        if isinstance(res, BaseException):
            raise res
        return res


@contextlib.contextmanager
def fast_decompositions():
    """Memoize two pure, per-call setup costs of an export (~0.6 s of its ~0.8 s for a small graph) while
    the sweep converts: torch's walk over every CompositeImplicitAutograd op (twice per
    run_decompositions) and bridge's decomposition table. Both only change when ops or lowerings are
    registered, which the key of the table memo tracks and the sweep never does for the CIA walk.
    Scoped to the sweep's own conversions; every other caller sees torch and bridge unchanged."""
    import torch._export.utils as export_utils
    import torch.export.decomp_utils as decomp_utils
    import torch.export.exported_program as exported_program
    from converters import capture as capture_mod

    orig_cia = export_utils._collect_all_valid_cia_ops
    orig_table = capture_mod.decomposition_table

    def cia_ops():
        if "cia" not in _MEMO:
            _MEMO["cia"] = frozenset(orig_cia())
        return set(_MEMO["cia"])

    def table():
        key = frozenset(registered())
        if _MEMO.get("table_key") != key:
            _MEMO["table"], _MEMO["table_key"] = dict(orig_table()), key
        return dict(_MEMO["table"])

    patched = [(exported_program, "_collect_all_valid_cia_ops", cia_ops),
               (decomp_utils, "_collect_all_valid_cia_ops", cia_ops),
               (capture_mod, "decomposition_table", table)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patched]
    for mod, name, fn in patched:
        setattr(mod, name, fn)
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


_MEMO: dict = {}


def _convert(prepared: list[Prepared]):
    tensors = tuple(t for p in prepared for t in p.tensors)
    try:
        with warnings.catch_warnings(), fast_decompositions():
            warnings.simplefilter("ignore")
            return bridge.convert(SampleBatch(prepared), tensors, strict=EXPORT_STRICT)
    except Exception as e:  # cached as well: a failing export fails the same way for the grad test
        e.__traceback__ = None
        return e


CACHE = _ExportCache()


# ---------------------------------------------------------------------------------- comparison
def _short(e: BaseException, n: int = 300) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return msg if len(msg) <= n else msg[:n] + "..."


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, (float, np.floating)) else str(v)


def compare_values(got, ref, rtol: float, atol: float, *, check_dtype: bool = True) -> str | None:
    """None if `got` (JAX) matches `ref` (torch tensor / Python scalar), else what differs."""
    got = np.asarray(got)
    if isinstance(ref, torch.Tensor):
        if check_dtype and got.dtype != jax_dtype(ref.dtype):
            return f"dtype {got.dtype} != {jax_dtype(ref.dtype)} (torch {_dname(ref.dtype)})"
        if tuple(got.shape) != tuple(ref.shape):
            return f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
        r = ref.detach().resolve_conj().resolve_neg()
        exact = not (r.is_floating_point() or r.is_complex())
        r = r.to(torch.complex128 if r.is_complex() else (torch.float64 if not exact else r.dtype)).numpy()
    else:
        r = np.asarray(ref)
        exact = not np.issubdtype(r.dtype, np.inexact)
        if got.shape != r.shape:
            got = got.reshape(r.shape) if got.size == r.size else got
    if exact:
        g = (got.astype(r.dtype) if got.dtype != r.dtype else got).reshape(-1)
        bad = g != r.reshape(-1)
        if not bad.any():
            return None
        i = int(np.argmax(bad))
        where = tuple(int(x) for x in np.unravel_index(i, r.shape)) if r.shape else ()
        return f"{int(bad.sum())}/{bad.size} elements differ, e.g. at {where}: got {g[i]} vs {r.reshape(-1)[i]}"
    shape = r.shape
    g = got.astype(np.complex128 if np.iscomplexobj(got) or np.iscomplexobj(r) else np.float64).reshape(-1)
    r = r.astype(g.dtype).reshape(-1)

    def at(flat_i):
        return tuple(int(x) for x in np.unravel_index(int(flat_i), shape)) if shape else ()

    gn, rn = np.isnan(g), np.isnan(r)
    if (gn != rn).any():
        i = int(np.argmax(gn != rn))
        return f"NaN pattern differs ({int((gn != rn).sum())} elements), e.g. at {at(i)}: got {g[i]} vs {r[i]}"
    gi, ri = np.isinf(g), np.isinf(r)
    bad = (gi != ri) | (ri & (g != r))
    if bad.any():
        i = int(np.argmax(bad))
        return f"inf pattern differs ({int(bad.sum())} elements), e.g. at {at(i)}: got {g[i]} vs {r[i]}"
    fin = ~(rn | ri)
    if not fin.any():
        return None
    diff = np.where(fin, np.abs(g - r), 0.0)
    lim = atol + rtol * np.abs(r)
    bad = fin & (diff > lim)
    if not bad.any():
        return None
    i = int(np.argmax(np.where(fin, diff - lim, -np.inf)))
    rel = np.max(diff[fin] / np.maximum(np.abs(r[fin]), 1e-30))
    return (f"{int(bad.sum())}/{bad.size} elements off; max abs err {_fmt(np.max(diff))}, max rel err {_fmt(rel)}; "
            f"worst at {at(i)}: got {_fmt(g[i])} vs {_fmt(r[i])}")


def rel_err(got, ref) -> tuple[float, str | None]:
    """conftest's scale-relative error max|got-ref| / max|ref| (finite entries) + NaN/inf pattern check."""
    g = np.asarray(got, np.float64)
    r = ref.detach().to(torch.float64).numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref, np.float64)
    if g.shape != r.shape:
        return np.inf, f"shape {g.shape} != {r.shape}"
    g, r = g.reshape(-1), r.reshape(-1)
    if g.size == 0:
        return 0.0, None
    gf, rf = np.isfinite(g), np.isfinite(r)
    bad = (gf != rf) | (~rf & ~((np.isnan(g) & np.isnan(r)) | (g == r)))
    if bad.any():
        i = int(np.argmax(bad))
        return np.inf, f"non-finite pattern differs ({int(bad.sum())} elements), e.g. flat {i}: got {g[i]} vs {r[i]}"
    if not rf.any():
        return 0.0, None
    d = np.abs(g - r)[rf]
    scale = max(float(np.max(np.abs(r[rf]))), 1e-12)
    return float(np.max(d) / scale), None


# ------------------------------------------------------------------------------------ outcomes
@dataclasses.dataclass
class SampleOutcome:
    index: int
    dtype: str
    status: str
    detail: str = ""
    missing: tuple = ()


@dataclasses.dataclass
class Outcome:
    op: str
    kind: str                       # "forward" | "grad"
    status: str                     # one of STATUSES (+ "skipped"/"crash"/"timeout" from the script)
    detail: str = ""
    missing: list = dataclasses.field(default_factory=list)
    dtypes: list = dataclasses.field(default_factory=list)
    samples: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def exportable(self) -> bool:
        return self.status not in ("export-fail", "n/a")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["samples"] = [dataclasses.asdict(s) for s in self.samples]
        return d


def summarize(op: str, kind: str, samples: list[SampleOutcome], dtypes: list[str], t0: float,
              empty_reason: str = "no samples") -> Outcome:
    if not samples:
        return Outcome(op, kind, "n/a", empty_reason, dtypes=dtypes, seconds=time.perf_counter() - t0)
    captured = [s for s in samples if s.status not in ("export-fail", "n/a")]
    missing = sorted({m for s in samples for m in s.missing})
    if not captured:
        if all(s.status == "n/a" for s in samples):
            status, first = "n/a", samples[0]
        else:
            status, first = "export-fail", next(s for s in samples if s.status == "export-fail")
    else:
        first = max(captured, key=lambda s: _RANK[s.status])
        status = first.status
    detail = "" if status == "pass" else f"[{first.dtype} sample {first.index}] {first.detail}"
    tested = sorted({s.dtype for s in captured}, key=lambda d: dtypes.index(d) if d in dtypes else 99)
    return Outcome(op, kind, status, detail, missing, tested, samples, time.perf_counter() - t0)


def _classify_convert_error(e: BaseException) -> tuple[str, str, tuple]:
    if isinstance(e, CaptureError):
        lines = [ln for ln in str(e).splitlines()[1:] if ln.strip()]
        return "export-fail", (lines[0] if lines else str(e))[:300], ()
    if isinstance(e, UnsupportedOpsError):
        return "unsupported", "missing lowerings: " + ", ".join(sorted(e.missing)), tuple(sorted(e.missing))
    return "lowering-error", "conversion: " + _short(e), ()


def _convert_groups(key: str, prepared: list[Prepared], split: bool = False):
    """[(group, jm or None, (status, detail, missing) or None)]: all samples as one program, or one
    program per sample when they cannot be converted together (or `split`)."""
    if not split:
        try:
            return [(prepared, CACHE.convert(key, prepared), None)]
        except Exception as e:
            status, detail, missing = _classify_convert_error(e)
            # missing lowerings are the op's own; any other failure may come from putting the samples
            # together (torch asserts on some combined input mutations): look at each sample alone
            if status == "unsupported" or len(prepared) == 1:
                return [(prepared, None, (status, detail, missing))]
    out = []
    for p in prepared:
        try:
            out.append(([p], CACHE.convert(key, [p]), None))
        except Exception as e:
            out.append(([p], None, _classify_convert_error(e)))
    return out


def _evaluate(key, prepared, check, detailed):
    """Convert `prepared` as one program and `check(group, jm)` it; with `detailed`, a lowering error in a
    combined program is attributed by converting each sample alone."""
    results = []
    for group, jm, err in _convert_groups(key, prepared):
        if err is not None:
            results.extend(SampleOutcome(p.index, p.dtype, *err) for p in group)
            continue
        res = check(group, jm)
        if detailed and len(group) > 1 and any(r.status == "lowering-error" for r in res):
            res = []
            for one, jm1, err1 in _convert_groups(key, group, split=True):
                res.extend(check(one, jm1) if err1 is None else [SampleOutcome(one[0].index, one[0].dtype, *err1)])
        results.extend(res)
    return results


def _jax_inputs(group: list[Prepared]):
    return [to_jax(t) for p in group for t in p.tensors]


def _rng_kwargs(jm):
    return {"rng": jax.random.key(0)} if jm.needs_rng else {}


def _draws_random(jm, group: list[Prepared], outs) -> set:
    """Ids of the samples whose outputs depend on a node that draws random numbers in the program
    (OpInfo seeds torch inside the op for dropout samples, so torch eager alone looks deterministic)."""
    prog = jm.program
    if not prog.random_nodes:
        return set()
    tainted = set(prog.random_nodes)
    for n in prog.graph.nodes:
        if n.op == "call_function" and any(a.name in tainted for a in n.all_input_nodes):
            tainted.add(n.name)
    out_node = next(n for n in reversed(prog.graph.nodes) if n.op == "output")
    flags = [isinstance(a, torch.fx.Node) and a.name in tainted
             for a, m in zip(out_node.args[0], prog.mutations) if m is None]
    ids, i = set(), 0
    for p, out in zip(group, outs):
        n = len(jax.tree.leaves(out))
        if any(flags[i:i + n]):
            ids.add(p.id)
        i += n
    return ids


def _check_meta(g, r) -> str | None:
    g = np.asarray(g)
    if isinstance(r, torch.Tensor):
        if g.dtype != jax_dtype(r.dtype):
            return f"dtype {g.dtype} != {jax_dtype(r.dtype)}"
        if tuple(g.shape) != tuple(r.shape):
            return f"shape {tuple(g.shape)} != {tuple(r.shape)}"
    return None


_WIDER = {"float32": torch.float64, "bfloat16": torch.float32}


def _wider(op, dn: str):
    wider = _WIDER.get(dn)
    return wider if wider is not None and wider in op.supported_dtypes("cpu") else None


# ------------------------------------------------------------------------------------- forward
def run_forward(op, all_samples: bool = ALL_SAMPLES, detailed: bool = False) -> Outcome:
    """Every sample of every forward dtype as one program under jax.jit, against torch eager."""
    t0 = time.perf_counter()
    key = op_key(op)
    if not forward_dtypes(op):
        return Outcome(key, "forward", "n/a", "no CPU dtype among float32/int64/int32/bool/complex64")
    s = op_samples(op, all_samples)
    results = list(s.failed)
    if s.prepared:
        results += _evaluate(key, s.prepared, lambda g, jm: _check_forward_group(key, op, s, g, jm), detailed)
    return summarize(key, "forward", results, s.dtypes, t0)


def _check_forward_group(key, op, s: OpSamples, group, jm) -> list[SampleOutcome]:
    try:
        outs = jax.device_get(jax.jit(jm.apply)(jm.params, *_jax_inputs(group), **_rng_kwargs(jm)))
    except Exception as e:
        return [SampleOutcome(p.index, p.dtype, "lowering-error", _short(e)) for p in group]
    drawn = _draws_random(jm, group, outs)
    res = []
    for p, out in zip(group, outs):
        got, ref = jax.tree.leaves(out), s.refs[p.id]
        if len(got) != len(ref):
            res.append(SampleOutcome(p.index, p.dtype, "lowering-error", f"{len(got)} outputs, torch gives {len(ref)}"))
            continue
        shape_only = is_random(op) or p.id in s.random or p.id in drawn
        rtol, atol = tolerance(key, "forward", p.dtype)
        problem = None
        for j, (g, r) in enumerate(zip(got, ref)):
            if shape_only:
                problem = _check_meta(g, r)
            else:
                problem = compare_values(g, r, rtol, atol)
                if problem and key in TIE_ORDER_OPS and problem.endswith(tuple("0123456789")):
                    problem = _same_elements(p, g, r, problem)
                if problem and not problem.startswith(("dtype", "shape")):
                    problem = _retry_wider(op, p, j, g, rtol, atol, problem)
            if problem:
                problem = f"output {j}: {problem}"
                break
        res.append(SampleOutcome(p.index, p.dtype, "mismatch" if problem else "pass", problem or ""))
    return res


def _same_elements(p, g, r, problem):
    """Index outputs of TIE_ORDER_OPS: accept indices that select elements equal to torch's selection
    along some dim of the sample's input (ties may be ordered differently; the values must not differ)."""
    x = p.tensors[0].detach()
    if x.is_floating_point():
        x = x.float()
    x = np.asarray(x.numpy())
    g, r = np.asarray(g).astype(np.int64), r.numpy().astype(np.int64) if isinstance(r, torch.Tensor) else None
    if r is None or g.shape != r.shape or g.ndim not in (x.ndim, x.ndim - 1):
        return problem
    for d in range(max(x.ndim, 1)):
        try:   # a reduced dim (keepdim=False) comes back as size 1
            a, b = (np.take_along_axis(x, i if i.ndim == x.ndim else np.expand_dims(i, d), d) if x.ndim
                    else x[()] for i in (g, r))
        except (IndexError, ValueError):
            continue
        if np.array_equal(a, b, equal_nan=True):
            return None
    return problem


def _retry_wider(op, p, j, g, rtol, atol, problem):
    """Accept a result that matches torch run on the same values in a wider dtype (float64 for float32,
    float32 for bfloat16) where torch's own result in the narrow dtype disagrees: torch rounds its
    intermediates (bf16 products, fp32 sums) differently, and the wider result is the better one."""
    wider = _wider(op, p.dtype)
    if wider is None:
        return problem
    try:
        ref = _run_eager(p, wider, seed=0)[j]
    except Exception:
        return problem
    wide = compare_values(g, ref, rtol, atol, check_dtype=False)
    if wide is None:
        return None
    return f"{problem} (vs torch in {_dname(wider)}: {wide.split('; worst')[0]})"


# ---------------------------------------------------------------------------------------- grad
def _weights(key: str, index: int, outs: list) -> list:
    """Fixed random weights per floating output leaf (None for the others)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{key}/{index}".encode()))
    ws = []
    for o in outs:
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            ws.append(torch.randn(o.shape, generator=g, dtype=torch.float32))
        elif isinstance(o, torch.Tensor) and o.is_complex():
            ws.append(torch.randn(tuple(o.shape) + (2,), generator=g, dtype=torch.float32))
        else:
            ws.append(None)
    return ws


def _torch_loss(outs, ws):
    total = 0
    for o, w in zip(outs, ws):
        if w is None or not isinstance(o, torch.Tensor):
            continue
        if o.is_complex():
            o = torch.view_as_real(o.resolve_conj())
        total = total + (o * w.to(o.dtype)).sum()
    return total


def _torch_grads(p: Prepared, idx: list[int], ws, cast=None):
    """Gradients of sum(out * w) w.r.t. tensors `idx` of the sample (zeros where unused)."""
    tensors = [_clone(t) for t in p.tensors]
    if cast is not None:
        tensors = [t.to(cast) if t.is_floating_point() else t for t in tensors]
    for i in idx:
        tensors[i].requires_grad_(True)
    torch.manual_seed(0)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = pytree.tree_leaves(p.call(tensors))
        loss = _torch_loss(outs, ws)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return None
        grads = torch.autograd.grad(loss, [tensors[i] for i in idx], allow_unused=True)
    # None (unused input) and torch's ZeroTensor (a known-zero gradient, e.g. sgn's) become real zeros
    return [torch.zeros_like(tensors[i]) if gr is None or gr._is_zerotensor() else gr.detach()
            for i, gr in zip(idx, grads)]


def run_grad(op, all_samples: bool = ALL_SAMPLES, detailed: bool = False) -> Outcome:
    """d/dx sum(out * w) for the float32 samples, with the forward test's program (one export)."""
    t0 = time.perf_counter()
    key = op_key(op)
    if not is_differentiable(op):
        return Outcome(key, "grad", "n/a", "not differentiable in float32")
    s = op_samples(op, all_samples)
    results = [r for r in s.failed if r.dtype == "float32"]
    plan = {}   # sample id -> (input positions, weights, torch grads)
    for p in s.prepared:
        if p.dtype != "float32":
            continue
        ws = _weights(key, p.index, s.refs[p.id])
        floats = [i for i, t in enumerate(p.tensors) if t.is_floating_point()]
        grads, idx = None, floats
        for idx in (floats, [i for i in floats if p.requires_grad[i]]):
            if not idx:
                continue
            try:
                grads = _torch_grads(p, idx, ws)
                break
            except Exception:
                grads = None
        if not grads:
            results.append(SampleOutcome(p.index, p.dtype, "n/a", "no differentiable floating input/output"))
            continue
        plan[p.id] = (idx, ws, grads)
    if plan:
        # convert exactly what the forward test converts (cache hit); only the planned samples are checked
        results += [r for r in _evaluate(key, s.prepared, lambda g, jm: _check_grad_group(key, op, s, g, jm, plan),
                                         detailed) if (r.dtype, r.index) in plan]
    return summarize(key, "grad", results, ["float32"], t0, "no differentiable samples")


def _check_grad_group(key, op, s: OpSamples, group, jm, plan) -> list[SampleOutcome]:
    inputs = _jax_inputs(group)
    wrt, jws, o = [], {}, 0
    for p in group:
        if p.id in plan:
            wrt += [o + i for i in plan[p.id][0]]
            jws[p.id] = [None if w is None else to_jax(w) for w in plan[p.id][1]]
        o += len(p.tensors)
    if not wrt:
        return []
    rng = _rng_kwargs(jm)

    def loss(diff):
        xs = list(inputs)
        for pos, x in zip(wrt, diff):
            xs[pos] = x
        outs = jm.apply(jm.params, *xs, **rng)
        total = jnp.zeros((), jnp.float32)
        for p, out in zip(group, outs):
            if p.id not in jws:
                continue
            for leaf, w in zip(jax.tree.leaves(out), jws[p.id]):
                if w is None:
                    continue
                if jnp.iscomplexobj(leaf):
                    leaf = jnp.stack([jnp.real(leaf), jnp.imag(leaf)], axis=-1)
                total = total + jnp.sum(leaf.astype(jnp.float32) * w)
        return total

    planned = [p for p in group if p.id in plan]
    try:
        grads = jax.device_get(jax.jit(jax.grad(loss))([inputs[i] for i in wrt]))
        drawn = _draws_random(jm, group, jax.eval_shape(lambda: jm.apply(jm.params, *inputs, **rng))) \
            if jm.needs_rng else set()
    except Exception as e:
        return [SampleOutcome(p.index, p.dtype, "lowering-error", "jax.grad: " + _short(e)) for p in planned]
    tol = tolerance(key, "grad")
    res, k = [], 0
    for p in planned:
        idx, ws, ref = plan[p.id]
        got = grads[k:k + len(idx)]
        k += len(idx)
        shape_only = is_random(op) or p.id in s.random or p.id in drawn or key in NONDETERMINISTIC_GRAD_OPS
        problem = None
        # scale of the sample's whole gradient: an input whose true gradient is ~0 next to inputs with O(1)
        # gradients (layer_norm over one element, cosine similarity of parallel vectors) is judged against
        # that scale, not against its own rounding noise
        refs64 = [np.asarray(r, np.float64) for r in ref]
        scale = max((float(np.max(np.abs(r))) for r in refs64 if r.size and np.all(np.isfinite(r))), default=0.0)
        for i, g, r in zip(idx, got, ref):
            if shape_only:
                problem = _check_meta(g, r)
            else:
                err, pattern = rel_err(g, r)
                if not pattern and err > tol and scale > 0 and np.shape(g) == np.shape(r):
                    absolute = float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(r, np.float64)), initial=0))
                    err = absolute / scale if absolute <= tol * scale else err
                if pattern or err > tol:
                    problem = _grad_retry_float64(op, p, idx, ws, i, g, tol, pattern or f"rel err {err:.3g} > {tol}")
            if problem:
                problem = f"grad of input {i} {tuple(p.tensors[i].shape)}: {problem}"
                break
        res.append(SampleOutcome(p.index, p.dtype, "mismatch" if problem else "pass", problem or ""))
    return res


def _grad_retry_float64(op, p, idx, ws, i, g, tol, problem):
    if _wider(op, "float32") is None:
        return problem
    try:
        ref64 = _torch_grads(p, idx, ws, torch.float64)[idx.index(i)]
    except Exception:
        return problem
    err, pattern = rel_err(g, ref64)
    if not pattern and err <= tol:
        return None
    return problem + f" (vs float64 torch: {pattern or f'{err:.3g}'})"


# ------------------------------------------------------------------------------------- helpers
def run(op, kind: str, all_samples: bool = ALL_SAMPLES, detailed: bool = False) -> Outcome:
    """Run one kind of check; a harness error is reported as an outcome, never raised."""
    fn = run_forward if kind == "forward" else run_grad
    try:
        return fn(op, all_samples, detailed)
    except Exception as e:  # a harness bug must not hide the rest of the sweep
        return Outcome(op_key(op), kind, "lowering-error", "harness: " + _short(e) + " " +
                       traceback.format_exc(limit=-2).replace("\n", " | ")[:300])


def configure_jax():
    """Outside pytest: the same numerics as tests/conftest.py."""
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    torch.set_num_threads(int(os.environ.get("BRIDGE_TORCH_THREADS", "1")))

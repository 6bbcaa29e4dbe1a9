"""Op coverage on PyTorch's own OpInfo database, under jax.jit and jax.grad.

One test per OpInfo entry and kind: `test_forward[<op>]` (float32 + bfloat16 samples; integer dtypes
for ops without a float32 kernel) and `test_grad[<op>]` (differentiable ops, float32). The harness,
tolerances and the random-op list live in `opinfo_harness.py` (shared with scripts/op_coverage.py).

Default: at most 3 samples per op and dtype; BRIDGE_OPINFO_ALL=1 (or make test-full's
BRIDGE_TEST_FULL=1) runs all of them. Known failures are xfail (not strict) through the named lists in
converters/ops/skips.py, each with its reason; ops torch.export cannot capture are skipped through
skips.NOT_EXPORTABLE. Regenerate the lists with `scripts/op_coverage.py --all --write-skips`.
"""
from __future__ import annotations

import pytest

from converters.ops import skips
from tests.converters.ops import opinfo_harness as H


def _params(kind: str):
    xfails = skips.XFAIL_FORWARD if kind == "forward" else skips.XFAIL_GRAD
    out = []
    for op in H.op_list():
        if kind == "forward" and not H.forward_dtypes(op):
            continue      # no CPU dtype bridge can test (float8-only, CUDA-only kernels)
        if kind == "grad" and not H.is_differentiable(op):
            continue
        key = H.op_key(op)
        marks = []
        if key in skips.SKIPS:
            marks.append(pytest.mark.skip(reason=f"skips.SKIPS: {skips.SKIPS[key]}"))
        elif key in skips.NOT_EXPORTABLE:
            marks.append(pytest.mark.skip(reason=f"not exportable: {skips.NOT_EXPORTABLE[key]}"))
        elif key in xfails:
            marks.append(pytest.mark.xfail(reason=xfails[key], strict=False))
        out.append(pytest.param(key, id=key, marks=marks))
    return out


def _check(key: str, kind: str):
    op = H.op_by_key()[key]
    out = H.run(op, kind)
    if out.status == "export-fail" and not H.ALL_SAMPLES:
        out = H.run(op, kind, all_samples=True)   # capturable only in later samples: look at all of them
    if out.status == "pass":
        return
    if out.status == "n/a":
        pytest.skip(f"{kind}: {out.detail}")
    if out.status == "export-fail":
        pytest.fail(f"torch.export captures no sample of {key}; list it in converters/ops/skips.py "
                    f"NOT_EXPORTABLE with the reason: {out.detail}", pytrace=False)
    pytest.fail(f"{key} {kind}: {out.status}: {out.detail}", pytrace=False)


@pytest.mark.parametrize("key", _params("forward"))
def test_forward(key):
    _check(key, "forward")


@pytest.mark.parametrize("key", _params("grad"))
def test_grad(key):
    _check(key, "grad")


def test_skip_lists_name_real_ops():
    keys = {H.op_key(op) for op in H.op_list()}
    for name in ("SKIPS", "NOT_EXPORTABLE", "XFAIL_FORWARD", "XFAIL_GRAD"):
        table = getattr(skips, name)
        unknown = sorted(set(table) - keys)
        assert not unknown, f"skips.{name} names ops OpInfo does not have: {unknown}"
        empty = sorted(k for k, why in table.items() if not str(why).strip())
        assert not empty, f"skips.{name} entries need a reason: {empty}"

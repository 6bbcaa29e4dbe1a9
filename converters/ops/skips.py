"""Named skip lists of the OpInfo sweep (tests/converters/ops/test_opinfo.py, scripts/op_coverage.py).

Keys are OpInfo names plus variant ("max.reduction_with_dim"); every value says why.

SKIPS is kept by hand: ops the test suite does not run at all (a crash, a hang). They count as failures
in docs/op_coverage.md unless torch.export cannot capture them.
NOT_EXPORTABLE, XFAIL_FORWARD and XFAIL_GRAD are regenerated from a full sweep by
`python scripts/op_coverage.py --all --write-skips` (NOT_EXPORTABLE: torch.export captures no sample,
so the op is outside the coverage denominators; XFAIL_*: known failures, marked xfail, not strict).
"""

SKIPS: dict[str, str] = {}

NOT_EXPORTABLE: dict[str, str] = {}

XFAIL_FORWARD: dict[str, str] = {}

XFAIL_GRAD: dict[str, str] = {}

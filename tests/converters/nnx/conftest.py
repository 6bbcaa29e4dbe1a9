"""Prints the max relative error per layer family measured by the NNX structural-path tests."""
from tests.converters.nnx.helpers import _ERRORS


def pytest_terminal_summary(terminalreporter):
    if _ERRORS:
        terminalreporter.write_sep("-", "NNX structural path: max relative error per layer family (fp32)")
        for family, err in sorted(_ERRORS.items()):
            terminalreporter.write_line(f"{family:<24s} {err:.2e}")

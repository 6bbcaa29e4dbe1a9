"""Shared by the benchmarks: atomic result files."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_results(out: Path, name: str, title: str, results: dict, table: str) -> None:
    """<out>/<name>.json and <out>/<name>.md, each written atomically; prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{name}.json", json.dumps(results, indent=2) + "\n")
    write_atomic(out / f"{name}.md", f"# {title}\n\n" + table)
    print(table + f"Total runtime: {results['total_seconds']:.0f} s")

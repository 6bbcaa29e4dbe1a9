"""Run every benchmark (what `make bench` calls) and collect the tables into <out>/README.md.

Run:
    .venv/bin/python -m benchmarks.run [--quick] [--out benchmarks/results]

Each benchmark runs in its own subprocess (train_step, then checkpoint_io at 2.0 GB, 0.5 GB with --quick)
and writes its own JSON + markdown under --out; this script only concatenates the markdown.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import write_atomic

ROOT = Path(__file__).resolve().parent.parent



def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke versions of every benchmark")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    out = args.out if args.out.is_absolute() else ROOT / args.out
    quick = ["--quick"] if args.quick else []
    runs = [("train_step", ["-m", "benchmarks.train_step", "--out", str(out), *quick]),
            ("checkpoint_io", ["-m", "benchmarks.checkpoint_io", "--out", str(out),
                               "--size-gb", "0.5" if args.quick else "2.0"])]
    start = time.perf_counter()
    for name, cmd in runs:
        print(f"== {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)
    machine = json.loads((out / "train_step.json").read_text())["machine"]
    header = (f"# Benchmark results\n\nMachine: {machine['cpu_count']} × {machine['processor']}, "
              f"{machine['platform']}, Python {machine['python']}, jax {machine['jax_version']}, "
              f"torch {machine['torch_version']}; {machine['date']}"
              f"{' (--quick smoke run)' if args.quick else ''}. Regenerate with `make bench`.\n")
    parts = [header] + [(out / f"{name}.md").read_text().replace("\n# ", "\n## ").replace("# ", "## ", 1)
                        for name, _ in runs]
    write_atomic(out / "README.md", "\n".join(parts))
    print(f"wrote {out / 'README.md'} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()

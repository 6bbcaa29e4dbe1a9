"""Op coverage on PyTorch's OpInfo database: forward and grad under jit, written to docs/op_coverage.md.

Runs the sweep of tests/converters/ops/opinfo_harness.py over every OpInfo entry (in worker processes,
so a crash or a hang costs one op, not the run), then writes

* the two headline rates: forward pass rate over exportable OpInfo ops, grad pass rate over
  exportable differentiable ops;
* the missing ATen ops, sorted by how many OpInfo ops they block;
* the core ATen overloads (`torch.Tag.core`) without a lowering;
* a table per op: forward, grad, dtypes tested, reason when failing.

Usage:
    PYTHONPATH=. .venv/bin/python scripts/op_coverage.py            # CI sample count (3 per op and dtype)
    PYTHONPATH=. .venv/bin/python scripts/op_coverage.py --all      # every sample (as make test-full)
    ... --jobs 4 --ops add,sum --json /tmp/op_coverage.json --write-skips
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import multiprocessing as mp
import os
import queue
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FAILING = ("mismatch", "lowering-error", "unsupported", "skipped", "crash", "timeout")


# ------------------------------------------------------------------------------------ workers
def _worker(tasks, results, all_samples: bool):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    import warnings
    warnings.filterwarnings("ignore")
    from tests.converters.ops import opinfo_harness as H
    H.configure_jax()
    ops = H.op_by_key()
    parent = os.getppid()
    while True:
        try:
            key = tasks.get(timeout=10)
        except queue.Empty:
            if os.getppid() != parent:   # the sweep was killed: do not linger
                return
            continue
        if key is None:
            return
        results.put(("start", key, os.getpid()))
        outs = [H.run(ops[key], kind, all_samples, detailed=True).as_dict() for kind in ("forward", "grad")]
        results.put(("done", key, outs))


def sweep(keys: list[str], jobs: int, all_samples: bool, timeout: float, log=print) -> dict[str, list[dict]]:
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for k in keys:
        tasks.put(k)
    workers: dict[int, object] = {}
    inflight: dict[int, tuple[str, float]] = {}
    done: dict[str, list[dict]] = {}

    def start():
        p = ctx.Process(target=_worker, args=(tasks, results, all_samples), daemon=True)
        p.start()
        workers[p.pid] = p

    for _ in range(min(jobs, len(keys))):
        start()
    t0 = time.perf_counter()
    while len(done) < len(keys):
        try:
            msg = results.get(timeout=5)
        except queue.Empty:
            msg = None
        if msg is not None:
            tag, key, payload = msg
            if tag == "start":
                inflight[payload] = (key, time.perf_counter())
            else:
                done[key] = payload
                for pid, (k, _) in list(inflight.items()):
                    if k == key:
                        del inflight[pid]
                f, g = payload
                log(f"[{len(done):4d}/{len(keys)} {time.perf_counter() - t0:7.1f}s] {key:50s} "
                    f"forward={f['status']:14s} grad={g['status']:14s} ({f['seconds'] + g['seconds']:.1f}s)")
        now = time.perf_counter()
        for pid, p in list(workers.items()):
            key, since = inflight.get(pid, (None, now))
            dead = not p.is_alive()
            late = key is not None and now - since > timeout
            if not (dead or late):
                continue
            if late:
                p.kill()
                p.join()
            status = "timeout" if late else "crash"
            if key is not None and key not in done:
                why = f"{status} after {now - since:.0f}s" + ("" if late else f" (exit code {p.exitcode})")
                done[key] = [_outcome(key, kind, status, why) for kind in ("forward", "grad")]
                log(f"[{len(done):4d}/{len(keys)}] {key}: {why}")
            inflight.pop(pid, None)
            del workers[pid]
            if len(done) < len(keys):
                start()
    for _ in workers:
        tasks.put(None)
    for p in workers.values():
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    return done


def _outcome(key, kind, status, detail):
    return {"op": key, "kind": kind, "status": status, "detail": detail, "missing": [], "dtypes": [],
            "samples": [], "seconds": 0.0}


# ------------------------------------------------------------------------------------ analysis
def core_aten_without_lowering() -> tuple[list[str], list[str]]:
    """(all core ATen overloads, those with no registered lowering), by iterating torch.ops.aten."""
    import torch
    from converters import ops as _ops  # noqa: F401  (registers every lowering)
    from converters.registry import registered
    have = {str(t) for t in registered()}
    core = set()
    # packets torch has not loaded yet are missing from dir(); the dispatcher knows every aten name
    names = set(dir(torch.ops.aten)) | {n[6:].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                                        if n.startswith("aten::")}
    for name in sorted(names):
        try:
            packet = getattr(torch.ops.aten, name)
            overloads = packet.overloads()
        except Exception:
            continue
        for ov in overloads:
            try:
                op = getattr(packet, ov)
            except Exception:
                continue
            if torch.Tag.core in op.tags:
                core.add(str(op))
    return sorted(core), sorted(c for c in core if c not in have)


def apply_skips(results: dict[str, list[dict]]) -> None:
    """Ops in skips.SKIPS count as failures unless torch.export cannot capture them."""
    from converters.ops.skips import SKIPS
    for key, outs in results.items():
        if key in SKIPS:
            for o in outs:
                if o["status"] == "pass":
                    o["status"], o["detail"] = "skipped", f"skips.SKIPS: {SKIPS[key]}"


def rates(results):
    fwd = [r[0] for r in results.values()]
    grad = [r[1] for r in results.values()]
    f_den = [o for o in fwd if o["status"] not in ("export-fail", "n/a")]
    g_den = [o for o in grad if o["status"] not in ("export-fail", "n/a")]
    return (sum(o["status"] == "pass" for o in f_den), len(f_den),
            sum(o["status"] == "pass" for o in g_den), len(g_den))


def missing_ops(results) -> list[tuple[str, int, list[str]]]:
    """Missing ATen op -> OpInfo ops it blocks (forward or grad)."""
    blocked = collections.defaultdict(set)
    for key, outs in results.items():
        for o in outs:
            for m in o["missing"]:
                blocked[m].add(key)
    return sorted(((m, len(v), sorted(v)) for m, v in blocked.items()), key=lambda t: (-t[1], t[0]))


_PATH = re.compile(r" failed at \S+:\d+ in \w+: .*?\(input shapes")


def reason(o: dict, n: int = 220) -> str:
    """One line: what failed, without file paths."""
    if o["status"] in ("pass", "n/a") and not o["detail"]:
        return ""
    d = _PATH.sub(" failed (input shapes", o["detail"]).replace("|", "/").replace("\n", " ")
    d = f"{o['status']}: {d}" if o["status"] not in ("pass",) else d
    return d if len(d) <= n else d[:n] + "…"


def _mark(o: dict) -> str:
    return {"pass": "pass", "n/a": "—", "export-fail": "not exportable"}.get(o["status"], "**" + o["status"] + "**")


def write_markdown(path, results, core, core_missing, meta):
    fp, fn, gp, gn = rates(results)
    lines = [
        "# Op coverage on PyTorch's OpInfo database",
        "",
        f"Generated by `scripts/op_coverage.py` ({meta['mode']}) on {meta['date']} in {meta['seconds']:.0f} s "
        f"with {meta['jobs']} worker(s): torch {meta['torch']}, jax {meta['jax']}. "
        "Harness: `tests/converters/ops/opinfo_harness.py` (the same code as `tests/converters/ops/test_opinfo.py`).",
        "",
        "Every OpInfo entry's sample inputs are exported with `bridge.convert`, run under `jax.jit(jm.apply)` and "
        "compared with torch eager (float32: rtol = atol = 1e-5, bfloat16: 2e-2, integer/bool exactly, output dtypes "
        "exactly); gradients of `sum(out * w)` w.r.t. every floating input are compared with torch autograd "
        "(max |err| / max |ref| <= 1e-4 per input). Ops with no float32 CPU kernel are tested in int64/int32/bool. "
        "Random ops are checked for shape and dtype only.",
        "",
        "## Headline",
        "",
        f"* **Forward: {fp}/{fn} = {100 * fp / max(fn, 1):.1f}%** of the OpInfo ops torch.export can capture pass.",
        f"* **Grad: {gp}/{gn} = {100 * gp / max(gn, 1):.1f}%** of the exportable differentiable OpInfo ops pass.",
        f"* {len(results)} OpInfo entries; {fn} exportable; "
        f"{sum(r[0]['status'] == 'export-fail' for r in results.values())} not capturable by torch.export; "
        f"{sum(r[0]['status'] == 'n/a' for r in results.values())} without a testable CPU dtype.",
        "",
        "| status | forward | grad |",
        "|---|---:|---:|",
    ]
    for st in ("pass", "mismatch", "lowering-error", "unsupported", "skipped", "crash", "timeout", "export-fail", "n/a"):
        f = sum(r[0]["status"] == st for r in results.values())
        g = sum(r[1]["status"] == st for r in results.values())
        if f or g:
            lines.append(f"| {st} | {f} | {g} |")
    miss = missing_ops(results)
    lines += ["", "## Missing ATen ops", "",
              "Sorted by the number of OpInfo ops (forward or grad) each blocks.", "",
              "| ATen op | blocks | OpInfo ops |", "|---|---:|---|"]
    for m, n, keys in miss:
        shown = ", ".join(keys[:8]) + (f", … (+{len(keys) - 8})" if len(keys) > 8 else "")
        lines.append(f"| `{m}` | {n} | {shown} |")
    lines += ["", "## Core ATen opset", "",
              f"{len(core) - len(core_missing)}/{len(core)} overloads tagged `torch.Tag.core` have a lowering; "
              f"{len(core_missing)} do not:", ""]
    lines.append(", ".join(f"`{c}`" for c in core_missing) or "(none)")
    lines += ["", "## Per op", "", "| op | forward | grad | dtypes tested | reason if failing |", "|---|---|---|---|---|"]
    from converters.ops import skips
    known = getattr(skips, "REASONS", {})
    for key in sorted(results):
        f, g = results[key]
        why = "; ".join(x for x in (reason(f) if f["status"] in FAILING else "",
                                    ("grad " + reason(g)) if g["status"] in FAILING else "") if x)
        if not why and f["status"] == "export-fail":
            why = reason(f, 160)
        if why and key in known:
            why = f"{known[key]} [{why}]"
        lines.append(f"| `{key}` | {_mark(f)} | {_mark(g)} | {', '.join(f['dtypes'])} | {why.replace('|', '/')} |")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def write_skips(path, results):
    """Regenerate NOT_EXPORTABLE / XFAIL_FORWARD / XFAIL_GRAD in converters/ops/skips.py (SKIPS kept)."""
    from converters.ops import skips
    header = (skips.__doc__ or "").strip()

    def block(name, entries, comment):
        out = [f"# {comment}", f"{name}: dict[str, str] = {{"]
        out += [f"    {k!r}: {v!r}," for k, v in sorted(entries.items())]
        out.append("}")
        return "\n".join(out)

    known = getattr(skips, "REASONS", {})

    def why(k, o, n):   # the hand-written explanation first, then what the sweep saw
        return f"{known[k]} [{reason(o, n)}]" if k in known else reason(o, n)

    not_exp = {k: why(k, r[0], 160) for k, r in results.items() if r[0]["status"] == "export-fail"}
    xf = {k: why(k, r[0], 200) for k, r in results.items() if r[0]["status"] in FAILING and k not in skips.SKIPS}
    xg = {k: why(k, r[1], 200) for k, r in results.items() if r[1]["status"] in FAILING and k not in skips.SKIPS}
    text = "\n\n".join([
        f'"""{header}\n"""',
        block("SKIPS", skips.SKIPS, "kept by hand"),
        block("REASONS", known, "kept by hand: why an op cannot pass (prefixed to its generated entries)"),
        block("NOT_EXPORTABLE", not_exp, "generated: torch.export captures none of the samples"),
        block("XFAIL_FORWARD", xf, "generated: forward fails (xfail, not strict)"),
        block("XFAIL_GRAD", xg, "generated: grad fails (xfail, not strict)"),
    ])
    with open(path, "w") as fh:
        fh.write(text + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--all", action="store_true", help="every sample (default: 3 per op and dtype, as CI)")
    ap.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 8)))
    ap.add_argument("--ops", default="", help="comma-separated OpInfo names (default: all)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per op before its worker is killed")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "op_coverage.md"))
    ap.add_argument("--json", default="", help="also write the raw per-sample results here")
    ap.add_argument("--write-skips", action="store_true", help="regenerate converters/ops/skips.py")
    ap.add_argument("--from-json", default="", help="report from a --json file of an earlier sweep instead of running")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    os.environ["BRIDGE_OPINFO_ALL"] = "1" if args.all else "0"
    from tests.converters.ops import opinfo_harness as H
    keys = [H.op_key(op) for op in H.op_list()]
    if args.ops:
        want = [k.strip() for k in args.ops.split(",") if k.strip()]
        unknown = sorted(set(want) - set(keys))
        if unknown:
            ap.error(f"unknown OpInfo names: {unknown}")
        keys = [k for k in keys if k in want]
    import jax
    import torch
    if args.from_json:
        with open(args.from_json) as fh:
            saved = json.load(fh)
        results, meta = saved["results"], saved["meta"]
        results = {k: results[k] for k in keys if k in results}
        seconds, args.jobs = meta["seconds"], meta["jobs"]
    else:
        t0 = time.perf_counter()
        log = (lambda *_: None) if args.quiet else (lambda s: print(s, flush=True))
        results = sweep(keys, args.jobs, args.all, args.timeout, log)
        seconds = time.perf_counter() - t0
        results = {k: results[k] for k in keys}
        meta = {"mode": "all samples" if args.all else f"CI mode, at most {H.MAX_SAMPLES} samples per op and dtype",
                "date": datetime.date.today().isoformat(), "seconds": seconds, "jobs": args.jobs,
                "torch": torch.__version__, "jax": jax.__version__}
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"meta": meta, "results": results}, fh, indent=1)
    if args.write_skips:
        write_skips(os.path.join(ROOT, "converters", "ops", "skips.py"), results)
    apply_skips(results)
    core, core_missing = core_aten_without_lowering()
    write_markdown(args.out, results, core, core_missing, meta)
    fp, fn, gp, gn = rates(results)
    print(f"\nforward {fp}/{fn} = {100 * fp / max(fn, 1):.1f}% of exportable OpInfo ops; "
          f"grad {gp}/{gn} = {100 * gp / max(gn, 1):.1f}% of exportable differentiable ops "
          f"({seconds:.0f} s, {args.jobs} jobs)")
    print(f"core ATen overloads without a lowering ({len(core_missing)}/{len(core)}):")
    print("  " + "\n  ".join(core_missing))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Checkpoint I/O benchmark: streaming load and export of a synthetic sharded bf16 safetensors
checkpoint, side by side with a plain raw read of the same bytes, with peak RSS per measurement.

Run:
    .venv/bin/python -m benchmarks.checkpoint_io [--size-gb 2.0] [--out benchmarks/results] [--workdir /tmp]

A transformer-like checkpoint (HF-style ~500 MB shards + index) is written tensor by tensor into a
temp dir by bridge's writer (64-byte-aligned tensors), and copied shard by shard through the reference
`safetensors` writer (unaligned). The raw reads run once to warm the page cache, then each row runs
`--repeats` times, each in a fresh subprocess, so all numbers are warm-cache and peak RSS is per
measurement (the high-water mark is reset after imports via /proc/self/clear_refs).
Reported: median GB/s, worst peak-RSS overhead. GB = 1e9 bytes. Rows:
  raw read                 64 MiB positioned reads into one reused buffer (the goal's reference)
  retained buffers         the same reads into fresh anonymous memory that is kept: the floor for
                           any load that copies (faulting in new pages is slow on some VMs)
  load_weights             the default: aligned tensors adopted from a copy-on-write map of each
                           shard, made resident (MADV_POPULATE_READ) before the call returns
  load_weights(mmap=False) every tensor copied into fresh memory
  reference-writer shards  load_weights on the unaligned files: tensors are copied
  iter_weights / export    streaming passes: peak RSS must stay under largest tensor + 10%
Results go to <out>/checkpoint_io.json and <out>/checkpoint_io.md; the table is printed.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import json
import mmap
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_results

GB, MB = 10**9, 10**6
CHUNK = 64 * 2**20
SHARD_BYTES = 500 * MB
MARK = "@@RESULT "
HIDDEN, INTER, VOCAB, KV = 2048, 5632, 32000, 256


# ---- memory accounting (Linux) -------------------------------------------------------------
def rss_bytes() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak() -> bool:
    """Reset this process's RSS high-water mark (so ru_maxrss measures only what follows)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ---- synthetic checkpoint ------------------------------------------------------------------
def layout(size_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Llama-like names/shapes (GQA attention, SwiGLU MLP), layer count chosen to hit size_bytes in bf16."""
    per_layer = [("self_attn.q_proj.weight", (HIDDEN, HIDDEN)), ("self_attn.k_proj.weight", (KV, HIDDEN)),
                 ("self_attn.v_proj.weight", (KV, HIDDEN)), ("self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                 ("mlp.gate_proj.weight", (INTER, HIDDEN)), ("mlp.up_proj.weight", (INTER, HIDDEN)),
                 ("mlp.down_proj.weight", (HIDDEN, INTER)), ("input_layernorm.weight", (HIDDEN,)),
                 ("post_attention_layernorm.weight", (HIDDEN,))]
    layer_bytes = sum(2 * _numel(s) for _, s in per_layer)
    fixed = 2 * (2 * VOCAB * HIDDEN + HIDDEN)
    n_layers = max(1, round((size_bytes - fixed) / layer_bytes))
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    out += [(f"model.layers.{i}.{n}", s) for i in range(n_layers) for n, s in per_layer]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_checkpoint(folder: Path, size_gb: float) -> dict:
    """Write HF-style shards + index, generating one tensor at a time; returns sizes."""
    import ml_dtypes
    import numpy as np
    import safetensors.torch
    import torch
    from bridge.safetensors_io import write_file

    rng = np.random.default_rng(0)
    tensors, shards, cur, cur_bytes = layout(int(size_gb * GB)), [], [], 0
    for name, shape in tensors:
        if cur and cur_bytes + 2 * _numel(shape) > SHARD_BYTES:
            shards, cur, cur_bytes = shards + [cur], [], 0
        cur.append((name, shape))
        cur_bytes += 2 * _numel(shape)
    shards.append(cur)

    def producer(shape):
        return lambda: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_file(folder / fname, [(n, torch.bfloat16, s, producer(s)) for n, s in shard], {"format": "pt"})
        weight_map.update({n: fname for n, _ in shard})
    total = sum(2 * _numel(s) for _, s in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    ref = folder / "reference_writer"  # the same shards as the `safetensors` library lays them out (unaligned)
    ref.mkdir()
    for fname in sorted(set(weight_map.values())):
        safetensors.torch.save_file(safetensors.torch.load_file(folder / fname), ref / fname, {"format": "pt"})
    (ref / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"tensor_bytes": total, "file_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
            "largest_tensor_bytes": max(2 * _numel(s) for _, s in tensors), "tensors": len(tensors),
            "shards": len(shards)}


# ---- measurements, each run in a fresh child process ----------------------------------------
def child(what: str, index: Path) -> dict:
    if what == "make":
        return make_checkpoint(index.parent, float(os.environ["BENCH_SIZE_GB"]))
    import jax
    import numpy as np
    from bridge.checkpoint import iter_weights, load_weights
    from bridge.exporter import export

    baseline, reset = rss_bytes(), reset_peak()
    t0, res = time.perf_counter(), {"baseline_rss_bytes": baseline, "peak_reset": reset}
    if what == "raw":
        buf, nbytes = bytearray(CHUNK), 0
        for shard in sorted(index.parent.glob("*.safetensors")):
            with open(shard, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    nbytes += n
        res.update(bytes=nbytes, overhead_bytes=peak_bytes() - baseline)
    elif what == "retained":  # same reads, each chunk into fresh untouched memory that is kept
        kept, nbytes = [], 0
        for shard in sorted(index.parent.glob("*.safetensors")):
            with open(shard, "rb", buffering=0) as f:
                while n := f.readinto(buf := mmap.mmap(-1, CHUNK)):  # anonymous, no THP madvise
                    kept.append(buf)
                    nbytes += n
        res.update(bytes=nbytes, overhead_bytes=peak_bytes() - baseline - nbytes)
    elif what in ("load", "load_copy", "load_ref"):
        src = index.parent / "reference_writer" / index.name if what == "load_ref" else index
        leaves = jax.tree_util.tree_leaves(load_weights(src, mmap=what != "load_copy"))
        jax.block_until_ready(leaves)
        nbytes = sum(x.nbytes for x in leaves)
        res.update(bytes=nbytes, overhead_bytes=peak_bytes() - baseline - nbytes)
    elif what == "stream":
        nbytes, check = 0, 0
        for _, arr, _ in iter_weights(index):
            check += int(arr.view(np.uint16).reshape(-1)[::4096].sum())  # touch it, then drop it
            nbytes += arr.nbytes
            del arr
        res.update(bytes=nbytes, overhead_bytes=peak_bytes() - baseline, checksum=check)
    elif what == "export":
        params = load_weights(index)
        jax.block_until_ready(params)
        load_s = time.perf_counter() - t0
        (index.parent / "export").mkdir(exist_ok=True)
        gc.collect()
        reset_peak()
        before = rss_bytes()
        t0 = time.perf_counter()
        out = export(params, index.parent / "export" / "model.safetensors", max_shard_size="500MB")
        nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
        res.update(bytes=nbytes, overhead_bytes=peak_bytes() - before, rss_before_export_bytes=before,
                   load_seconds=load_s, exported_files=len(list(out.parent.glob("*.safetensors"))))
    else:
        raise SystemExit(f"unknown child {what!r}")
    res["seconds"] = time.perf_counter() - t0
    res["gbps"] = res["bytes"] / GB / res["seconds"]
    res["peak_rss_bytes"] = peak_bytes()
    return res


def run_child(what: str, index: Path, size_gb: float = 0.0) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "BENCH_SIZE_GB": str(size_gb)}
    cmd = [sys.executable, "-m", "benchmarks.checkpoint_io", "--child", what, "--index", str(index)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode or not lines:
        raise SystemExit(f"child {what!r} failed (exit {proc.returncode}):\n{proc.stdout}")
    return json.loads(lines[-1][len(MARK):])


# ---- report ---------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    raw, budget = res["measurements"]["raw"]["gbps"], res["goals"]["rss_budget_bytes"]
    rows = {"raw": ("raw read (64 MiB chunks)", "—", None),
            "retained": ("raw read into retained buffers", "— (reference: floor for a full load)", None),
            "load": ("load_weights → jax (CPU)", "≥ 50% of raw GB/s", res["goals"]["load_throughput"]),
            "load_copy": ("load_weights(mmap=False): copies into fresh memory", "—", None),
            "load_ref": ("load_weights, shards from the `safetensors` writer (unaligned: copies)", "—", None),
            "stream": ("iter_weights streaming pass", f"overhead ≤ {budget / MB:.0f} MB", res["goals"]["stream_rss"]),
            "export": ("export (500MB shards, fsync)", f"overhead ≤ {budget / MB:.0f} MB", res["goals"]["export_rss"])}
    lines = ["| measurement | GB/s | vs raw | peak RSS overhead MB | goal | pass |", "|---|---|---|---|---|---|"]
    for key, m in res["measurements"].items():
        name, goal, ok = rows[key]
        lines.append(f"| {name} | {m['gbps']:.2f} | {m['gbps'] / raw:.0%} | {round(m['overhead_bytes'] / MB)} "
                    f"| {goal} | {'—' if ok is None else 'PASS' if ok else 'FAIL'} |")
    s = res["checkpoint"]
    return "\n".join(lines) + (
        f"\n\nWarm page cache. Checkpoint: {s['tensor_bytes'] / GB:.2f} GB bf16, {s['tensors']} tensors in "
        f"{s['shards']} shards, largest tensor {s['largest_tensor_bytes'] / MB:.0f} MB. Median of "
        f"{res['repeats']} fresh processes per row (GB/s), worst peak RSS overhead. "
        f"{res['machine']['cpu_count']} CPUs, {res['machine']['platform']}.\n")



def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--workdir", type=Path, default=None, help="where to create the temp checkpoint")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(MARK + json.dumps(child(args.child, args.index)), flush=True)
        return
    start, tmp = time.perf_counter(), Path(tempfile.mkdtemp(prefix="ckpt_io_bench.", dir=args.workdir))
    try:
        index = tmp / "model.safetensors.index.json"
        ckpt = run_child("make", index, args.size_gb)
        print(f"checkpoint: {ckpt['tensor_bytes'] / GB:.2f} GB in {ckpt['shards']} shards "
              f"({time.perf_counter() - start:.0f} s); warming the page cache", file=sys.stderr)
        run_child("raw", index)
        run_child("raw", index.parent / "reference_writer" / index.name)
        runs = {w: [] for w in ("raw", "retained", "load", "load_copy", "load_ref", "stream", "export")}
        for _ in range(args.repeats):  # interleaved, so drifting machine state hits every row alike
            for what, got in runs.items():
                got.append(run_child(what, index))
                shutil.rmtree(tmp / "export", ignore_errors=True)
                print(f"{what}: {got[-1]['gbps']:.2f} GB/s", file=sys.stderr)
        meas = {w: {"gbps": statistics.median(r["gbps"] for r in got),
                    "overhead_bytes": max(r["overhead_bytes"] for r in got), "runs": got}
                for w, got in runs.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    budget = ckpt["largest_tensor_bytes"] + 0.1 * ckpt["tensor_bytes"]
    res = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "python": platform.python_version(),
                       **{f"{p}_version": md.version(p) for p in ("jax", "jaxlib", "torch", "numpy")}},
           "size_gb_requested": args.size_gb, "checkpoint": ckpt, "cache": "warm", "repeats": args.repeats,
           "measurements": meas,
           "goals": {"rss_budget_bytes": budget,
                     "load_throughput": meas["load"]["gbps"] >= 0.5 * meas["raw"]["gbps"],
                     "stream_rss": meas["stream"]["overhead_bytes"] <= budget,
                     "export_rss": meas["export"]["overhead_bytes"] <= budget},
           "total_seconds": time.perf_counter() - start}
    write_results(args.out, "checkpoint_io", "Checkpoint I/O benchmark", res, markdown(res))


if __name__ == "__main__":
    main()

"""Train-step benchmark: torch eager vs torch.compile vs the converted (bridge) step vs trainers.Trainer,
for a GPT-2, a Llama and the test CNN, all in one process on one machine, measured interleaved.

Run:
    .venv/bin/python -m benchmarks.train_step [--quick] [--out benchmarks/results]

--quick is a smoke run: vocabularies 8192 instead of 50257/32000, one warmup call, 2 timed steps.
On a shared machine torch's OpenMP threads suffer far more than XLA's from other processes' load (a
parallel region waits for a descheduled thread): the JSON records, per step, the CPU share other
processes used meanwhile, and the table's footnote says how busy the machine was.

Per model, four train steps (fp32, AdamW lr 1e-3, weight decay 0.01, betas 0.9/0.999, eps 1e-8):
  torch eager     forward + backward + torch.optim.AdamW.step() + zero_grad
  torch.compile   the same with `torch.compile(model)` (inductor; on failure aot_eager, reason recorded)
  bridge          `bridge.convert(model, train=True)` + one `jax.jit` pure step (value_and_grad of the
                  model's own HF loss, or cross-entropy for the CNN, then optax.adamw), donated state
  trainer         `trainers.Trainer(...).train_step(state, batch)` on a 1-device mesh, same optax.adamw
and two eval forwards (torch eager under no_grad, jitted bridge forward of an eval-mode conversion).
After warmup (compiles), `--rounds` rounds each run `--steps` timed steps of every variant in turn, so
machine drift hits all alike; each step is timed on its own (JAX: block_until_ready) and the median is
reported. Compile time = first call - median step. Dropout is off in the transformers (identical work on
both sides: no RNG); the CNN trains with dropout + BatchNorm batch statistics on both sides.
Matmul floor (benchmarks/roofline.py): the bridge step's dot/convolution FLOPs at the best fp32 matmul
rate torch or jax reaches on this machine, the time no implementation of the step can beat; and the
step's own dots run alone in jax and in torch (`dot_seconds`), which shows a GEMM-speed gap by itself.
Results: <out>/train_step.json and <out>/train_step.md (written atomically); the table is printed.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata as md
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import write_results
from benchmarks.roofline import dot_gflop, dot_seconds, dot_shapes, matmul_peak_gflops

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

import bridge
from trainers import TrainConfig, Trainer, classification_cross_entropy, model_loss

LR, WD = 1e-3, 0.01
TARGET_EAGER, TARGET_COMPILE = 0.6, 0.9
STEPS_TARGET_S, MAX_STEPS = 0.25, 40   # timed steps per variant per round, unless --steps


# ---- models -----------------------------------------------------------------------------------
def gpt2_case(vocab: int):
    cfg = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=8, vocab_size=vocab, n_positions=128,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, vocab, (8, 128))
    model = transformers.GPT2LMHeadModel(cfg)
    model.loss_type = "ForCausalLM"  # HF can't infer it from the class name and logs a warning: a torch.compile graph break
    return model, {"input_ids": ids, "labels": ids.clone()}, \
        f"GPT-2 4L d256 8h vocab {vocab}, batch 8x128"


def llama_case(vocab: int):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                                   use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    ids = torch.randint(0, vocab, (8, 128))
    return transformers.LlamaForCausalLM(cfg), {"input_ids": ids, "labels": ids.clone()}, \
        f"Llama 4L d256 8h/4kv ffn688 vocab {vocab}, batch 8x128"


def cnn_case():
    from tests.models import CNN
    return CNN(), {"x": torch.randn(64, 3, 32, 32), "y": torch.randint(0, 10, (64,))}, \
        "tests.models.CNN, batch 64x3x32x32, 10 classes"


def is_lm(batch: dict) -> bool:
    return "input_ids" in batch


def torch_loss(model, batch):
    if is_lm(batch):
        return model(**batch).loss
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def torch_forward(model, batch):
    return model(input_ids=batch["input_ids"]).logits if is_lm(batch) else model(batch["x"])


# ---- timing helpers ---------------------------------------------------------------------------
class Timed:
    """A step function plus its per-call wall times (seconds). `first` holds the first call's."""

    def __init__(self, name: str, fn):
        self.name, self.fn, self.first, self.times, self.cpu, self.others = name, fn, None, [], 0.0, []

    def call(self, record=True):
        b0, c0, t0 = cpu_busy_s(), time.process_time(), time.perf_counter()
        out = self.fn()
        dt = time.perf_counter() - t0
        if self.first is None:
            self.first = dt
        elif record:
            own = time.process_time() - c0
            self.times.append(dt)
            self.cpu += own
            self.others.append(max(0.0, cpu_busy_s() - b0 - own) / (dt * os.cpu_count()))
        return out

    def cpu_per_wall(self):
        """Process CPU seconds per wall second over the timed steps: ~cores kept busy (threading check)."""
        return self.cpu / sum(self.times) if self.times else None

    def median_ms(self):
        return 1e3 * statistics.median(self.times) if self.times else None

    def clean_median_ms(self, limit=0.1, need=3):
        """Median over steps during which other processes used < `limit` of the machine (None if < `need`).
        /proc/stat counts in 10 ms ticks, too coarse for short steps: under 100 ms every step counts."""
        if self.times and statistics.median(self.times) < 0.1:
            return self.median_ms()
        clean = [t for t, o in zip(self.times, self.others) if o < limit]
        return 1e3 * statistics.median(clean) if len(clean) >= need else None


def torch_train_variant(name, model, batch):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    losses = []

    def step():
        loss = torch_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return Timed(name, step), losses


def jax_batch(batch):
    return {k: jnp.asarray(v.numpy().astype(np.int32) if v.dtype == torch.int64 else v.numpy())
            for k, v in batch.items()}


def fresh(tree):
    return jax.tree.map(jnp.copy, tree)


def bridge_variant(jm, batch_j):
    """Plain jitted step: (params, opt_state, buffers, batch, key, i) -> (params, opt_state, buffers, loss, i + 1)."""
    opt = optax.adamw(LR, weight_decay=WD)
    lm = is_lm(batch_j)

    def loss_fn(params, buffers, batch, key):
        kw = dict(rng=key if jm.needs_rng else None, return_buffers=True, buffers=buffers)
        if lm:
            out, new_buffers = jm.apply(params, **batch, **kw)
            return out["loss"], new_buffers
        logits, new_buffers = jm.apply(params, batch["x"], **kw)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), new_buffers

    def train_step(params, opt_state, buffers, batch, key, i):
        # the step's key is derived inside the jitted step: a host-side fold_in is a dispatch per step
        key = jax.random.fold_in(key, i)
        (loss, buffers), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, buffers, batch, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, buffers, loss, i + 1

    jitted = jax.jit(train_step, donate_argnums=(0, 1, 2, 5))
    params, buffers = fresh(jm.params), fresh(jm.buffers)
    st = {"params": params, "opt": opt.init(params), "buffers": buffers, "i": jnp.zeros((), jnp.int32)}
    base, losses = jax.random.key(0), []

    def step():
        st["params"], st["opt"], st["buffers"], loss, st["i"] = jitted(st["params"], st["opt"], st["buffers"],
                                                                       batch_j, base, st["i"])
        jax.block_until_ready((st["params"], loss))
        losses.append(float(loss))

    def traced():  # for diagnostics, on the current (live) state: .jaxpr, .lower()
        return jitted.trace(st["params"], st["opt"], st["buffers"], batch_j, base, st["i"])
    return Timed("bridge", step), losses, traced


def trainer_variant(jm, batch_j, run_dir):
    lm = is_lm(batch_j)
    batch = batch_j if lm else (batch_j["x"], batch_j["y"])
    cfg = TrainConfig(num_devices=1, progress=False, plot=False, run_dir=str(run_dir), async_checkpoints=False)
    trainer = Trainer(jm.replace(params=fresh(jm.params), buffers=fresh(jm.buffers)), optax.adamw(LR, weight_decay=WD),
                      loss_fn=model_loss if lm else classification_cross_entropy(1), config=cfg)
    st = {"state": trainer.init_state()}
    placed = trainer._convert(batch)
    losses = []

    def step():
        st["state"], metrics = trainer.train_step(st["state"], placed)
        jax.block_until_ready((st["state"].params, metrics))
        losses.append(float(metrics["loss"]))
    return Timed("trainer", step), losses, trainer


def bridge_forward_variant(jm_eval, batch_j):
    lm = is_lm(batch_j)
    fwd = jax.jit(lambda p, b, batch: jm_eval.apply(p, input_ids=batch["input_ids"], buffers=b)["logits"] if lm
                  else jm_eval.apply(p, batch["x"], buffers=b))
    params, buffers = fresh(jm_eval.params), fresh(jm_eval.buffers)
    return Timed("fwd_bridge", lambda: jax.block_until_ready(fwd(params, buffers, batch_j)))


def torch_forward_variant(model, batch):
    def step():
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return torch_forward(model, batch)
        finally:
            model.train(was)
    return Timed("fwd_eager", step)


# ---- one model --------------------------------------------------------------------------------
def bench_model(key: str, case, *, warmup: int, rounds: int, steps: int | None, run_dir: Path) -> dict:
    model, batch, desc = case
    torch.manual_seed(0)
    res = {"description": desc, "params": sum(p.numel() for p in model.parameters())}
    lm = is_lm(batch)
    args, kwargs = ((), batch) if lm else ((batch["x"],), {})
    fargs, fkwargs = ((), {"input_ids": batch["input_ids"]}) if lm else ((batch["x"],), {})

    t0 = time.perf_counter()
    jm = bridge.convert(model, args, kwargs, train=True)
    res["convert_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    jm_eval = bridge.convert(model, fargs, fkwargs, train=False)
    res["convert_eval_s"] = time.perf_counter() - t0
    res["graph_ops"] = len(jm.program.nodes)
    res["graph_op_counts"] = dict(jm.program.op_counts().most_common())
    res["needs_rng"], res["mutates_buffers"] = jm.needs_rng, jm.mutates_buffers

    batch_j = jax_batch(batch)
    m_eager, m_comp = copy.deepcopy(model), copy.deepcopy(model)
    eager, eager_losses = torch_train_variant("torch_eager", m_eager, batch)
    compiled, comp_losses = torch_train_variant("torch_compile", torch.compile(m_comp), batch)
    res["torch_compile_backend"] = "inductor"
    brg, brg_losses, traced = bridge_variant(jm, batch_j)
    trn, trn_losses, trainer = trainer_variant(jm, batch_j, run_dir / key)
    fwd_e, fwd_b = torch_forward_variant(model, batch), bridge_forward_variant(jm_eval, batch_j)

    variants = [eager, compiled, brg, trn, fwd_e, fwd_b]
    counters = torch._dynamo.utils.counters
    counters.clear()
    # warmup: first call (compile) + a few more, not recorded
    for v in variants:
        try:
            for _ in range(warmup):
                v.call(record=False)
        except Exception as e:
            if v is not compiled:
                raise
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            print(f"  torch.compile (inductor) failed: {reason}; falling back to aot_eager", file=sys.stderr)
            res["torch_compile_backend"] = "aot_eager"
            res["torch_compile_inductor_error"] = reason
            res["torch_compile_traceback_tail"] = traceback.format_exc()[-2000:]
            torch._dynamo.reset()
            m_comp = copy.deepcopy(model)
            compiled2, comp_losses = torch_train_variant("torch_compile", torch.compile(m_comp, backend="aot_eager"), batch)
            compiled.fn, compiled.first = compiled2.fn, None
            for _ in range(warmup):
                compiled.call(record=False)
        print(f"  {key} {v.name}: first call {v.first:.2f} s", file=sys.stderr)
    res["torch_compile_graphs"] = {"unique_graphs": counters["stats"].get("unique_graphs", 0),
                                   "graph_breaks": sum(counters["graph_break"].values()),
                                   "graph_break_reasons": sorted(counters["graph_break"])[:10]}
    if steps is None:   # short steps (the CNN's ~10 ms) get several per round: ~0.25 s of torch eager each
        t0 = time.perf_counter()
        eager.fn()
        steps = max(1, min(MAX_STEPS, round(STEPS_TARGET_S / (time.perf_counter() - t0))))
    res["steps_per_round"] = steps
    busy0, own0, wall0 = cpu_busy_s(), time.process_time(), time.perf_counter()
    for _ in range(rounds):
        for v in variants:
            for _ in range(steps):
                v.call()
    wall = time.perf_counter() - wall0
    # share of the machine's CPU used by *other* processes while we measured (shared-machine check)
    res["other_processes_cpu_share"] = max(0.0, (cpu_busy_s() - busy0) - (time.process_time() - own0)) / (
        wall * os.cpu_count())
    trainer.close()
    try:  # size of the optimized XLA program of the plain step (after timing: compiling here could warm caches)
        hlo = traced().lower().compile().as_text()
        res["bridge_hlo"] = {"lines": hlo.count("\n"), "fusions": hlo.count(" fusion("),
                             "dots": hlo.count(" dot("), "convolutions": hlo.count(" convolution("),
                             "custom_calls": hlo.count(" custom-call(")}
    except Exception as e:  # diagnostics only
        res["bridge_hlo_error"] = f"{type(e).__name__}: {e}"

    ms = {v.name: v.median_ms() for v in variants}
    res["median_ms"] = ms
    jaxpr = traced().jaxpr
    res["dot_gflop"] = dot_gflop(jaxpr)
    # the step's own dots run one at a time in each library: the GEMM time of the step at each one's speed
    shapes = dot_shapes(jaxpr)
    res["dots_ms"] = {lib: 1e3 * dot_seconds(shapes, lib) for lib in ("jax", "torch")}
    res["dots_count"] = {"distinct": len(shapes), "total": sum(shapes.values())}
    res["min_ms"] = {v.name: 1e3 * min(v.times) for v in variants}
    res["clean_median_ms"] = {v.name: v.clean_median_ms() for v in variants}
    c = res["clean_median_ms"]
    res["clean_ratios"] = {f"bridge/{n}": c["bridge"] / c[n] if c["bridge"] and c[n] else None
                           for n in ("torch_eager", "torch_compile")}
    res["steps_ms"] = {v.name: [1e3 * t for t in v.times] for v in variants}
    # per step: share of the machine's CPU that other processes used meanwhile (1/100 s resolution)
    res["steps_other_cpu_share"] = {v.name: [round(o, 2) for o in v.others] for v in variants}
    res["cpu_per_wall"] = {v.name: v.cpu_per_wall() for v in variants}
    res["first_call_s"] = {v.name: v.first for v in variants}
    res["jax_compile_s"] = {n: res["first_call_s"][n] - ms[n] / 1e3 for n in ("bridge", "trainer", "fwd_bridge")}
    res["torch_compile_s"] = res["first_call_s"]["torch_compile"] - ms["torch_compile"] / 1e3
    res["first_loss"] = {"torch_eager": eager_losses[0], "torch_compile": comp_losses[0],
                         "bridge": brg_losses[0], "trainer": trn_losses[0]}
    ref = eager_losses[0]
    res["first_loss_max_rel_diff"] = max(abs(v - ref) / abs(ref) for v in res["first_loss"].values())
    res["ratios"] = {"bridge/torch_eager": ms["bridge"] / ms["torch_eager"],
                     "bridge/torch_compile": ms["bridge"] / ms["torch_compile"],
                     "trainer/bridge": ms["trainer"] / ms["bridge"],
                     "fwd_bridge/fwd_eager": ms["fwd_bridge"] / ms["fwd_eager"]}
    res["targets_met"] = {f"bridge <= {TARGET_EAGER} x torch_eager": res["ratios"]["bridge/torch_eager"] <= TARGET_EAGER,
                          f"bridge <= {TARGET_COMPILE} x torch_compile":
                              res["ratios"]["bridge/torch_compile"] <= TARGET_COMPILE}
    del jm, jm_eval, m_eager, m_comp, trainer, variants
    torch._dynamo.reset()
    return res


# ---- report -----------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    lines = ["| model | torch eager ms | torch.compile ms | bridge ms | trainer ms | bridge/eager | bridge/compile "
             "| matmul floor ms | dots jax / torch ms | fwd eager ms | fwd bridge ms | compile s | convert s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in res["models"].items():
        m, q = r["median_ms"], r["ratios"]
        backend = "" if r["torch_compile_backend"] == "inductor" else f" ({r['torch_compile_backend']})"
        lines.append(f"| {key} | {m['torch_eager']:.1f} | {m['torch_compile']:.1f}{backend} | {m['bridge']:.1f} "
                     f"| {m['trainer']:.1f} | {q['bridge/torch_eager']:.2f} | {q['bridge/torch_compile']:.2f} "
                     f"| {r['roofline']['floor_ms']:.1f} | {r['dots_ms']['jax']:.0f} / {r['dots_ms']['torch']:.0f} "
                     f"| {m['fwd_eager']:.1f} | {m['fwd_bridge']:.1f} "
                     f"| {r['jax_compile_s']['bridge']:.1f} "
                     f"| {r['convert_s']:.1f} |")
    mach = res["machine"]
    pk = mach["matmul_peak_gflops"]
    shared = any(r["other_processes_cpu_share"] > 0.1 for r in res["models"].values())
    others = ", ".join(f"{k} {r['other_processes_cpu_share']:.0%}" for k, r in res["models"].items())
    notes = [f"Targets: bridge ≤ {TARGET_EAGER}× torch eager and ≤ {TARGET_COMPILE}× torch.compile "
             "(train step, lower is better)."]
    for key, r in res["models"].items():
        m_eager = r["median_ms"]["torch_eager"]
        met = ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in r["targets_met"].items())
        notes.append(f"- {key}: {r['description']}, {r['params']:,} params. {met}. "
                     f"trainer/bridge {r['ratios']['trainer/bridge']:.2f}; torch.compile compile "
                     f"{r['torch_compile_s']:.1f} s. Matmul floor {r['roofline']['floor_ms']:.0f} ms "
                     f"= {r['roofline']['floor/torch_eager']:.2f}× torch eager "
                     f"({r['dot_gflop']:.1f} GFLOP of dots/convolutions per step). Its {r['dots_count']['total']} dots "
                     f"run alone take {r['dots_ms']['jax']:.0f} ms in jax and {r['dots_ms']['torch']:.0f} ms in "
                     f"torch: {r['dots_ms']['jax'] / m_eager:.2f}× and {r['dots_ms']['torch'] / m_eager:.2f}× "
                     f"the torch eager step.")
    if shared:
        clean = "; ".join(f"{k} " + ", ".join(f"{n} {'n/a' if q is None else f'{q:.2f}'}" for n, q in r["clean_ratios"].items())
                          for k, r in res["models"].items())
        notes.append(f"- Over only the steps during which other processes used < 10% of the CPU (steps under "
                     f"100 ms: all steps): {clean}.")
    per_round = ", ".join(f"{k} {r.get('steps_per_round', res['settings']['steps'])}" for k, r in res["models"].items())
    notes.append(f"\nMedian of {res['settings']['rounds']} rounds × steps per round ({per_round}) of interleaved "
                 f"timed steps per variant after {res['settings']['warmup']} warmup calls; fp32, AdamW. compile s = JAX "
                 f"first call − median step of the bridge train step; convert s = `bridge.convert` wall time; "
                 f"matmul floor = the step's dot and convolution FLOPs at the best fp32 matmul rate measured in "
                 f"this run ({pk['best']:.0f} GFLOP/s: torch {pk['torch']:.0f}, jax {pk['jax']:.0f} on a {pk['n']}³ "
                 f"matmul, best of {len(mach['matmul_peak_gflops_samples'])} measurements); no step can be faster. "
                 f"dots jax / torch = the step's fp32 dots (shapes from its jaxpr, convolutions not counted) run one "
                 f"at a time, best of 3 each, as jitted `lax.dot_general` and as `torch.einsum`. "
                 f"{mach['cpu_count']} CPUs ({mach['processor']}), {mach['platform']}, jax {mach['jax_version']}, "
                 f"torch {mach['torch_version']}, {mach['date']}. Other processes used "
                 f"{others} "
                 "of the machine's CPU during the timed steps"
                 f"{' (shared machine: absolute times are inflated; rows were interleaved, compare within a row)' if shared else ''}."
                 "\n")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def cpu_busy_s() -> float:
    """Machine-wide busy CPU seconds so far (all cores, all processes), from /proc/stat; 0 elsewhere."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = f[3] + (f[4] if len(f) > 4 else 0)  # idle + iowait
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")



def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer steps (about a minute)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--models", default="gpt2,llama,cnn")
    ap.add_argument("--gpt2-vocab", type=int, default=None, help="default 50257 (8192 with --quick)")
    ap.add_argument("--llama-vocab", type=int, default=None, help="default 32000 (8192 with --quick)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per variant per round (default: ~0.25 s of torch eager, 1 to 40)")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 6)
    steps = args.steps
    warmup = 1 if args.quick else 2
    torch.set_num_threads(os.cpu_count())
    start, load_start = time.perf_counter(), os.getloadavg()
    gpt2_vocab = args.gpt2_vocab or (8192 if args.quick else 50257)
    llama_vocab = args.llama_vocab or (8192 if args.quick else 32000)
    cases = {"gpt2": lambda: gpt2_case(gpt2_vocab), "llama": lambda: llama_case(llama_vocab),
             "cnn": cnn_case}
    run_dir = Path(tempfile.mkdtemp(prefix="train_step_bench."))
    peaks, models = [matmul_peak_gflops()], {}
    try:
        for key in args.models.split(","):
            t0 = time.perf_counter()
            torch.manual_seed(0)
            models[key] = bench_model(key, cases[key](), warmup=warmup, rounds=rounds, steps=steps, run_dir=run_dir)
            r = models[key]
            peaks.append(matmul_peak_gflops())
            print(f"{key}: eager {r['median_ms']['torch_eager']:.1f} ms, compile {r['median_ms']['torch_compile']:.1f} "
                  f"ms, bridge {r['median_ms']['bridge']:.1f} ms, trainer {r['median_ms']['trainer']:.1f} ms "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    peak = max(peaks, key=lambda p: p["best"])  # a busy machine lowers a measurement, never raises it
    for r in models.values():
        floor = 1e3 * r["dot_gflop"] / peak["best"]
        r["roofline"] = {"floor_ms": floor, "floor/torch_eager": floor / r["median_ms"]["torch_eager"]}
    res = {"machine": {"platform": platform.platform(), "processor": cpu_name(), "cpu_count": os.cpu_count(),
                       "python": platform.python_version(), "jax_backend": jax.default_backend(),
                       "torch_threads": torch.get_num_threads(), "matmul_peak_gflops": peak,
                       "matmul_peak_gflops_samples": [p["best"] for p in peaks],
                       "loadavg_1_5_15_start": load_start, "loadavg_1_5_15_end": os.getloadavg(),
                       **{f"{p}_version": md.version(p) for p in ("jax", "jaxlib", "torch", "transformers", "optax")},
                       "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
           "settings": {"quick": args.quick, "warmup": warmup, "rounds": rounds, "steps": steps, "lr": LR,
                        "weight_decay": WD, "dtype": "float32",
                        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision},
           "targets": {"bridge/torch_eager": TARGET_EAGER, "bridge/torch_compile": TARGET_COMPILE},
           "models": models, "total_seconds": time.perf_counter() - start}
    write_results(args.out, "train_step", "Train-step benchmark", res, markdown(res))


if __name__ == "__main__":
    main()

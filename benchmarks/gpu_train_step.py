"""GPU train-step benchmark: GPT-2 124M in bf16, bridge vs torch eager vs torch.compile on one GPU, one run.

Run (on a machine with a GPU; jax[cuda] and torch with CUDA):
    PYTHONPATH=. python -m benchmarks.gpu_train_step [--batch 16] [--seq 1024] [--out benchmarks/results]

Model: HF GPT2LMHeadModel, 12 layers, d=768, 12 heads, vocab 50257, context 1024, dropout 0, tied
embeddings (124M parameters). Each variant keeps fp32 master weights and AdamW (lr 3e-4, wd 0.1) and
computes in bf16:
  torch eager     torch.autocast(bf16), fused AdamW, SDPA attention (flash)
  torch.compile   the same model wrapped in torch.compile (inductor)
  bridge          `bridge.convert(model, compute_dtype=torch.bfloat16)`: the graph as torch runs the
                  bf16 model, fp32 masters cast on the way in; one jitted, donated step (optax.adamw);
                  attention lowers to cuDNN fused attention
  trainer         `trainers.Trainer` with compute_dtype="bfloat16" on a 1-device mesh
Loss: the model's own (HF upcasts the logits to fp32 for the cross-entropy on both sides).
MFU = model FLOPs/s / the GPU's dense bf16 peak, with model FLOPs per token = 6·N + 12·L·d·T
(N = parameters without the position embedding; the tied LM head counts once, as the matmul it is;
12·L·d·T is attention's QK^T and AV, forward + backward, without causal savings — nanoGPT/PaLM).
Results: <out>/gpu_train_step.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # torch and JAX share the GPU in one process
# cuBLAS instead of XLA's Triton GEMMs: 42 vs 49 ms for GPT-2 124M fwd+bwd on an H100 (measured, jax 0.11)
GPU_FLAGS = "--xla_gpu_enable_triton_gemm=false"
if "--smoke" not in sys.argv and "xla_gpu_enable_triton_gemm" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + GPU_FLAGS).strip()
import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

import bridge
from benchmarks.common import write_results
from trainers import TrainConfig, Trainer, model_loss

LR, WD = 3e-4, 0.1
# dense bf16 peak FLOP/s by device name (NVIDIA datasheets, without sparsity)
PEAK_BF16 = {"H100 SXM": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.5e12, "H100 NVL": 835.5e12,
             "H200": 989.4e12, "A100": 312e12, "L4": 121e12}


def peak_flops(name: str) -> float | None:
    for key, value in PEAK_BF16.items():
        if key.lower() in name.lower():
            return value
    if "h100" in name.lower():
        return PEAK_BF16["H100 SXM"]
    return None


def build(seq: int, small: bool = False):
    size = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512) if small else \
        dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    cfg = transformers.GPT2Config(**size, n_positions=seq,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.loss_type = "ForCausalLM"
    return model, cfg


def flops_per_token(model, cfg, seq: int) -> float:
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq


def time_steps(step, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def torch_variant(model, batch, compile_: bool):
    model = copy.deepcopy(model).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, fused=True)
    fwd = torch.compile(model) if compile_ else model
    losses = []

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        losses.append(loss.detach())
    return step, losses


def bridge_variant(jm, batch_j):
    opt = optax.adamw(LR, weight_decay=WD)

    def loss_fn(params, batch):
        return jm.apply(params, **batch)["loss"].astype(jnp.float32)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(train_step, donate_argnums=(0, 1))
    params = jax.tree.map(jnp.copy, jm.params)   # donated: never the model's own arrays
    st = {"p": params, "o": opt.init(params)}
    losses = []

    def step():
        st["p"], st["o"], loss = jitted(st["p"], st["o"], batch_j)
        jax.block_until_ready(loss)
        losses.append(loss)
    return step, losses, lambda: jitted.trace(st["p"], st["o"], batch_j)


def trainer_variant(jm, batch_j, run_dir):
    cfg = TrainConfig(num_devices=1, progress=False, plot=False, run_dir=str(run_dir), async_checkpoints=False,
                      compute_dtype="bfloat16")
    trainer = Trainer(jm, optax.adamw(LR, weight_decay=WD), loss_fn=model_loss, config=cfg)
    st = {"s": trainer.init_state()}
    placed = trainer._convert(batch_j)
    losses = []

    def step():
        st["s"], metrics = trainer.train_step(st["s"], placed)
        jax.block_until_ready(metrics["loss"])
        losses.append(metrics["loss"])
    return step, losses, trainer


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--variants", default="torch_eager,torch_compile,bridge,trainer")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, bridge variants only (checks the script)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.seq, args.steps, args.warmup, args.variants = 2, 64, 2, 1, "bridge,trainer"
    elif not (torch.cuda.is_available() and jax.default_backend() == "gpu"):
        raise SystemExit("needs a GPU for torch and for jax (or --smoke)")
    t_start = time.perf_counter()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model, cfg = build(args.seq, small=args.smoke)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    batch_t = {"input_ids": ids, "labels": ids} if args.smoke else {"input_ids": ids.cuda(), "labels": ids.cuda()}
    batch_j = {"input_ids": jnp.asarray(ids.numpy().astype(np.int32)), "labels": jnp.asarray(ids.numpy().astype(np.int32))}
    fpt = flops_per_token(model, cfg, args.seq)
    tokens = args.batch * args.seq
    dev = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    peak = peak_flops(dev)
    res = {"model": "GPT-2 124M (12L d768 12h vocab 50257)", "batch": args.batch, "seq": args.seq,
           "params": sum(p.numel() for p in model.parameters()), "flops_per_token": fpt,
           "steps": args.steps, "warmup": args.warmup,
           "device": dev, "jax_device": str(jax.devices()[0]), "peak_bf16_flops": peak,
           "jax_version": jax.__version__, "torch_version": torch.__version__,
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "variants": {}}

    t0 = time.perf_counter()
    jm = bridge.convert(model, kwargs={"input_ids": ids[:, :], "labels": ids}, compute_dtype=torch.bfloat16)
    res["convert_s"] = time.perf_counter() - t0
    wanted = args.variants.split(",")
    for name in wanted:
        print(f"== {name}", file=sys.stderr, flush=True)
        extra = {}
        if name.startswith("torch"):
            step, losses = torch_variant(model, batch_t, name == "torch_compile")
            torch.cuda.reset_peak_memory_stats()
        elif name == "bridge":
            step, losses, traced = bridge_variant(jm, batch_j)
        else:
            step, losses, trainer = trainer_variant(jm, batch_j, Path("/tmp/bridge_gpu_bench"))
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
        time_steps(step, args.warmup - 1)
        times = time_steps(step, args.steps)
        med = statistics.median(times)
        if name.startswith("torch"):
            extra["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        else:
            stats = jax.devices()[0].memory_stats() or {}
            extra["peak_memory_gb"] = stats.get("peak_bytes_in_use", 0) / 1e9
        if name == "bridge":
            hlo = traced().lower().compile().as_text()
            extra["cudnn_attention_calls"] = hlo.count("__cudnn$fmha")
            extra["custom_calls"] = hlo.count("custom-call(")
        if name == "trainer":
            trainer.close()
        res["variants"][name] = {
            "median_ms": 1e3 * med, "min_ms": 1e3 * min(times), "first_call_s": first,
            "tokens_per_s": tokens / med, "mfu": (fpt * tokens / med / peak) if peak else None,
            "losses": [float(x) for x in losses[:3]] + [float(losses[-1])], **extra}
        del step, losses
        if name.startswith("torch"):   # give the memory back before the next variant
            gc.collect()
            torch.cuda.empty_cache()
        print(f"   {name}: {1e3 * med:.1f} ms/step, {tokens / med:,.0f} tok/s"
              + (f", MFU {100 * fpt * tokens / med / peak:.1f}%" if peak else ""), file=sys.stderr, flush=True)
    v = res["variants"]
    res["ratios"] = {f"bridge/{n}": v["bridge"]["median_ms"] / v[n]["median_ms"]
                     for n in ("torch_eager", "torch_compile") if "bridge" in v and n in v}
    res["machine"] = {"platform": platform.platform(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    res["total_seconds"] = time.perf_counter() - t_start
    write_results(args.out, "gpu_train_step", "GPU train-step benchmark (GPT-2 124M, bf16)", res, markdown(res))


def markdown(res: dict) -> str:
    rows = ["| variant | ms/step | tokens/s | MFU | peak memory GB | first call s |", "|---|---|---|---|---|---|"]
    for name, r in res["variants"].items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        rows.append(f"| {name} | {r['median_ms']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | "
                    f"{r['peak_memory_gb']:.1f} | {r['first_call_s']:.1f} |")
    ratios = "; ".join(f"{k} {v:.2f}" for k, v in res["ratios"].items())
    return ("\n".join(rows) + "\n\n"
            f"{res['model']}, batch {res['batch']}×{res['seq']}, fp32 master weights + AdamW, bf16 compute; "
            f"{res['device']}, jax {res['jax_version']}, torch {res['torch_version']}, {res['machine']['date']}, "
            f"XLA_FLAGS=`{res['xla_flags']}`. "
            f"Step-time ratios (lower is better for bridge): {ratios}. MFU counts 6N + 12·L·d·T FLOPs per token "
            f"against a dense bf16 peak of {(res['peak_bf16_flops'] or 0) / 1e12:.0f} TFLOP/s. Median of "
            f"{res['steps']} timed steps after {res['warmup']} warmup calls; convert {res['convert_s']:.1f} s. "
            f"JAX peak memory is the process's peak so far (cumulative over the JAX variants).\n")


if __name__ == "__main__":
    main()

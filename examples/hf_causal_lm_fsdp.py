"""Port a Hugging Face causal LM to JAX, train it with FSDP, and hand it back to Hugging Face.

What this shows, end to end:

  1. build a GPT-2 (default) or Llama from a small config - nothing is downloaded;
  2. `bridge.convert(model, ..., train=True, dynamic="batch+seq")`: the training program, with dropout
     live and the model's own loss (`labels` in the batch);
  3. train it with `trainers.Trainer` on a mesh that shards every weight matrix over all local devices
     (`TrainConfig(mesh={"fsdp": jax.device_count()})`), on byte-level tokens (vocab 256, no tokenizer)
     of `tests/data/corpus.txt` or any text file given with `--text`;
  4. `bridge.export(trainer.export_model(state), out_dir, like=model)` writes a Hugging Face directory
     (config.json + model.safetensors) that `transformers.AutoModelForCausalLM.from_pretrained` loads;
  5. parity: the reloaded PyTorch model's logits against the JAX eval-mode program
     (`bridge.convert(model.eval(), ...)`) run on the trained parameters, on a batch and sequence length
     that training never used.

Devices: on a machine without an accelerator this script asks XLA for 8 simulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`) so that FSDP really shards, unless XLA_FLAGS
already chooses a device count. The flag must be set before JAX starts, so it only takes effect when
this file is run as a script (or imported before anything imports jax). On GPU/TPU hosts the real
devices are used.

Run:
    PYTHONPATH=. .venv/bin/python examples/hf_causal_lm_fsdp.py                      # GPT-2, 300 steps
        (0.86M parameters; about 6 minutes on a 2-core CPU with 8 simulated devices, loss 5.56 -> ~2.1)
    PYTHONPATH=. .venv/bin/python examples/hf_causal_lm_fsdp.py --model llama --steps 100
    PYTHONPATH=. .venv/bin/python examples/hf_causal_lm_fsdp.py --steps 10 --seq 32 --quiet   # smoke test

Outputs under --out: run/ (metrics.jsonl, loss.png, orbax checkpoints; re-running with the same --out
resumes from the last checkpoint) and hf_model/ (the Hugging Face directory).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

SIMULATED_CPU_DEVICES = 8
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                        "libtpu")


def _simulate_cpu_devices(n: int = SIMULATED_CPU_DEVICES) -> None:
    """Ask XLA for `n` CPU devices when no accelerator is installed and XLA_FLAGS does not choose a count.

    Only effective before jax is imported; afterwards the device count is fixed and this does nothing.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" in sys.modules or "xla_force_host_platform_device_count" in flags:
        return
    if any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS):
        return
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


_simulate_cpu_devices()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built from configs: never reach the Hub

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import bridge  # noqa: E402
import trainers  # noqa: E402
from bridge.parity import rel_err  # noqa: E402
from trainers.report import read_losses  # noqa: E402
from trainers import TrainConfig, Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO / "tests" / "data" / "corpus.txt"
VOCAB = 256  # byte-level tokens: the "tokenizer" is bytes(...)


# -- model -------------------------------------------------------------------------------------
def build_model(kind: str, layers: int, width: int, heads: int, max_len: int, seed: int) -> transformers.PreTrainedModel:
    """A randomly initialised causal LM from a small config (bos = eos = byte 0)."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_layer=layers, n_embd=width, n_head=heads,
                                      n_positions=max_len, bos_token_id=0, eos_token_id=0)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=4 * width,
                                       num_hidden_layers=layers, num_attention_heads=heads,
                                       num_key_value_heads=max(heads // 2, 1), max_position_embeddings=max_len,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=0)
    else:
        raise ValueError(f"--model {kind!r}: expected 'gpt2' or 'llama'")
    return transformers.AutoModelForCausalLM.from_config(cfg)


# -- data ----------------------------------------------------------------------------------------
def read_bytes(path: Path) -> np.ndarray:
    data = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8).astype(np.int64)
    if data.size < 2:
        raise SystemExit(f"{path}: needs at least 2 bytes of text")
    return data


def batches(data: np.ndarray, n: int, batch: int, seq: int, seed: int):
    """`n` batches of `batch` random `seq`-byte windows. labels = input_ids: HF models shift them internally."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        starts = rng.integers(0, len(data) - seq + 1, size=batch)
        ids = np.stack([data[s:s + seq] for s in starts])
        yield {"input_ids": ids, "labels": ids}




# -- the script ----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("gpt2", "llama"), default="gpt2")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="training text (read as bytes)")
    p.add_argument("--out", type=Path, default=Path("runs/hf_causal_lm_fsdp"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32, help="global batch (a multiple of the device count)")
    p.add_argument("--seq", type=int, default=128, help="training window length in bytes")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", type=int, default=80, help="bytes to generate from the reloaded model (0: none)")
    p.add_argument("--prompt", default="A compiler is a program that", help="prompt for the sample")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    n_dev = jax.device_count()
    if args.batch % n_dev:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {n_dev} devices (FSDP shards the batch)")
    data = read_bytes(args.text)
    if data.size <= args.seq:
        raise SystemExit(f"{args.text}: {data.size} bytes, fewer than --seq {args.seq}")
    max_len = max(2 * args.seq, 128)
    model = build_model(args.model, args.layers, args.width, args.heads, max_len, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params:,} parameters | {n_dev} x {jax.devices()[0].platform} devices | "
          f"{data.size:,} bytes of {args.text.name}")

    # 1. the training program: dropout live, loss computed by the model from `labels`
    example = next(batches(data, 1, 2, args.seq, seed=args.seed + 1))
    jm = bridge.convert(model, kwargs={k: torch.from_numpy(v) for k, v in example.items()},
                        dynamic="batch+seq", train=True)

    # 2. FSDP over every local device; the default loss (trainers.model_loss) is the model's own
    config = TrainConfig(steps=args.steps, mesh={"fsdp": n_dev}, run_dir=str(args.out / "run"), seed=args.seed,
                         progress=not args.quiet)
    optimizer = trainers.adamw(args.lr, total_steps=args.steps, warmup_steps=max(args.steps // 20, 1))
    trainer = Trainer(jm, optimizer, config=config)
    t0 = time.perf_counter()
    try:
        state = trainer.fit(batches(data, args.steps, args.batch, args.seq, seed=args.seed))
        train_s = time.perf_counter() - t0
        trained = trainer.export_model(state)   # params/buffers in the model's own dtypes
    finally:
        trainer.close()
    losses = read_losses(args.out / "run" / "metrics.jsonl")

    # 3. back to Hugging Face: config from `like=model`, weights as model.safetensors
    hf_dir = bridge.export(trained, args.out / "hf_model", like=model)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()

    # 4. parity: reloaded torch model vs the JAX eval-mode program with the trained params, on a
    #    batch size and length that training never saw (dynamic="batch+seq" covers them)
    jm_eval = bridge.convert(model.eval(), kwargs={"input_ids": torch.from_numpy(example["input_ids"])},
                             dynamic="batch+seq")
    check_len = max(min(args.seq - 5, data.size - 1), 2)
    fresh = next(batches(data, 1, 3, check_len, seed=args.seed + 2))["input_ids"]
    with torch.no_grad():
        ref = reloaded(input_ids=torch.from_numpy(fresh)).logits.numpy()
    with jax.default_matmul_precision("highest"):  # full fp32 matmuls on GPU/TPU too (no TF32/bf16)
        got = jax.jit(jm_eval.apply)(trained.params, input_ids=fresh)["logits"]
    logits_err = rel_err(got, ref)

    sample = ""
    if args.sample and args.prompt:
        prompt = torch.tensor([list(args.prompt.encode("utf-8"))[: max_len - 1]])
        new_tokens = min(args.sample, max_len - prompt.shape[1])  # stay within the position table
        with torch.no_grad():
            out = reloaded.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        sample = bytes(out[0, prompt.shape[1]:].tolist()).decode("utf-8", errors="replace")

    result = {
        "model": args.model, "params": n_params, "devices": n_dev, "steps": int(state.step),
        "first_loss": losses[0], "final_loss": float(np.mean(losses[-5:])), "losses": losses,
        "train_s": train_s, "hf_dir": str(hf_dir), "logits_rel_err": logits_err,
        "logits_shape": tuple(ref.shape), "sample": sample, "total_s": time.perf_counter() - t_start,
    }
    print(f"loss {result['first_loss']:.3f} -> {result['final_loss']:.3f} (mean of last 5) in "
          f"{result['steps']} FSDP steps, {train_s:.1f}s")
    print(f"exported to {hf_dir}; reloaded with AutoModelForCausalLM: logits {result['logits_shape']} "
          f"relative error vs JAX {logits_err:.2e}")
    if sample:
        print(f"greedy sample from the reloaded torch model: {sample!r}")
    return result


if __name__ == "__main__":
    main()

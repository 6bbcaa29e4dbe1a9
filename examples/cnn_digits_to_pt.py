"""Train a PyTorch CNN with BatchNorm in JAX, then evaluate the exported `.pt` back in PyTorch.

What this shows:

  1. a torch-native CNN (Conv2d + BatchNorm2d + ReLU + MaxPool2d + AdaptiveAvgPool2d + Linear) for the
     8x8 images of scikit-learn's digits dataset (`sklearn.datasets.load_digits`, shipped inside
     scikit-learn: nothing is downloaded), with a stratified train/test split;
  2. `bridge.convert(model, (x,), dynamic="batch", train=True)`: the training program, where BatchNorm
     normalises with batch statistics and updates its running mean/var (the Trainer carries the updated
     buffers in its state);
  3. `trainers.Trainer` with `classification_cross_entropy` on (images, labels) tuple batches, data
     parallel over all local devices;
  4. `bridge.export(trainer.export_model(state), "digits_cnn.pt")`: a plain state_dict (params and
     running statistics, torch dtypes - `num_batches_tracked` is int64 again);
  5. a fresh `DigitsCNN()` loads it with `load_state_dict(torch.load(path, weights_only=True))` and is
     evaluated in PyTorch eval mode; the same weights in the JAX eval-mode program
     (`bridge.convert(model.eval(), ...)`) must give the same test accuracy and predictions.

Run:
    PYTHONPATH=. .venv/bin/python examples/cnn_digits_to_pt.py                 # 600 steps, ~99% test accuracy
    PYTHONPATH=. .venv/bin/python examples/cnn_digits_to_pt.py --steps 60 --quiet --out /tmp/digits

Outputs under --out: run/ (metrics.jsonl, loss.png, checkpoints; the same --out resumes) and digits_cnn.pt.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import bridge
import trainers
from bridge.parity import rel_err
from trainers import TrainConfig, Trainer
from trainers.report import read_losses


class DigitsCNN(torch.nn.Module):
    """8x8 grey images -> 10 digit logits."""

    def __init__(self, channels: int = 32, classes: int = 10):
        super().__init__()
        c = channels
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),                                                            # 8x8 -> 4x4
            torch.nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(2 * c), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1))                                                    # 4x4 -> 1x1
        self.classifier = torch.nn.Linear(2 * c, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


# -- data ----------------------------------------------------------------------------------------
def load_data(test_size: float, seed: int):
    """(x_train, x_test, y_train, y_test): float32 images in [0, 1] shaped (N, 1, 8, 8), int64 labels."""
    digits = load_digits()
    # reshape, not images[:, None]: numpy gives that size-1 channel dim a non-row-major stride, which
    # torch.export traces from the example input and which currently makes the adaptive_avg_pool2d
    # decomposition emit aten.as_strided (no JAX lowering); see test_numpy_strided_example_input in
    # tests/examples/test_examples.py
    x = (digits.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)


def batches(x: np.ndarray, y: np.ndarray, steps: int, batch: int, seed: int):
    """`steps` (images, labels) batches: shuffled epochs, incomplete last batch of an epoch dropped."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < steps:
        order = rng.permutation(len(x))
        for i in range(0, len(order) - batch + 1, batch):
            if done == steps:
                return
            idx = order[i:i + batch]
            yield x[idx], y[idx]
            done += 1




# -- the script ----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/cnn_digits"))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64, help="global batch (a multiple of the device count)")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--test-size", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    n_dev = jax.device_count()
    if args.batch % n_dev:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {n_dev} devices (data parallel)")
    x_train, x_test, y_train, y_test = load_data(args.test_size, args.seed)
    torch.manual_seed(args.seed)
    model = DigitsCNN(args.channels)
    print(f"digits: {len(x_train)} train / {len(x_test)} test images | "
          f"{sum(p.numel() for p in model.parameters()):,} parameters | {n_dev} devices")

    # 1. train-mode program: BatchNorm uses batch statistics and returns updated running stats
    example = torch.from_numpy(x_train[:2])
    jm = bridge.convert(model, (example,), dynamic="batch", train=True)
    assert jm.mutates_buffers  # running_mean / running_var / num_batches_tracked

    # 2. data-parallel training; batches are (images, labels) tuples: images feed the model, labels the loss
    config = TrainConfig(steps=args.steps, run_dir=str(args.out / "run"), seed=args.seed, progress=not args.quiet)
    optimizer = trainers.adamw(args.lr, total_steps=args.steps, warmup_steps=max(args.steps // 20, 1))
    trainer = Trainer(jm, optimizer, loss_fn=trainers.classification_cross_entropy(labels_key=1), config=config)
    t0 = time.perf_counter()
    try:
        state = trainer.fit(batches(x_train, y_train, args.steps, args.batch, args.seed))
        train_s = time.perf_counter() - t0
        trained = trainer.export_model(state)
    finally:
        trainer.close()
    losses = read_losses(args.out / "run" / "metrics.jsonl")

    # 3. export a plain torch state_dict (params + BatchNorm running statistics)
    pt_path = bridge.export(trained, args.out / "digits_cnn.pt")

    # 4. PyTorch: a fresh module, the exported weights, eval mode (running statistics)
    torch_model = DigitsCNN(args.channels)
    torch_model.load_state_dict(torch.load(pt_path, weights_only=True))
    torch_model.eval()
    with torch.no_grad():
        torch_logits = torch_model(torch.from_numpy(x_test)).numpy()

    # 5. JAX: the eval-mode program with the same trained params and buffers
    jm_eval = bridge.convert(model.eval(), (example,), dynamic="batch")
    with jax.default_matmul_precision("highest"):
        jax_logits = np.asarray(jax.jit(jm_eval.apply)(trained.params, x_test, buffers=trained.buffers))

    torch_pred, jax_pred = torch_logits.argmax(-1), jax_logits.argmax(-1)
    bn = torch_model.features[1]  # BatchNorm running statistics came back from JAX training
    result = {
        "steps": int(state.step), "train_s": train_s, "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-10:])), "pt_path": str(pt_path),
        "torch_accuracy": float(np.mean(torch_pred == y_test)),
        "jax_accuracy": float(np.mean(jax_pred == y_test)),
        "prediction_mismatches": int(np.sum(torch_pred != jax_pred)),
        "logits_rel_err": rel_err(jax_logits, torch_logits), "n_test": len(y_test),
        "bn_batches_tracked": int(bn.num_batches_tracked), "bn_running_var_mean": float(bn.running_var.mean()),
        "total_s": time.perf_counter() - t_start,
    }
    print(f"loss {result['first_loss']:.3f} -> {result['final_loss']:.3f} (mean of last 10) "
          f"in {result['steps']} steps, {train_s:.1f}s")
    print(f"exported {pt_path}; test accuracy on {result['n_test']} images: torch {result['torch_accuracy']:.4f}, "
          f"JAX {result['jax_accuracy']:.4f} ({result['prediction_mismatches']} differing predictions, "
          f"logits relative error {result['logits_rel_err']:.2e})")
    print(f"BatchNorm state in the .pt: num_batches_tracked={result['bn_batches_tracked']}, "
          f"mean running_var={result['bn_running_var_mean']:.3f} (1.0 at init)")
    return result


if __name__ == "__main__":
    main()

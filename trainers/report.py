"""What a person sees: a progress bar, throughput units and the loss-curve PNG."""
from __future__ import annotations

import json
from pathlib import Path

import jax
from tqdm.auto import tqdm


def progress_bar(config, start: int):
    return tqdm(total=config.steps, initial=start, desc="train", unit="step",
                disable=not config.progress or jax.process_index() != 0, dynamic_ncols=True)


def throughput_unit(batch) -> tuple[int, str]:
    """(count, 'tokens' | 'examples') for a placed batch."""
    if isinstance(batch, dict) and "input_ids" in batch:
        return int(batch["input_ids"].size), "tokens"
    first = jax.tree.leaves(batch)[0]   # nested batches too (a PackedInput's padded batch)
    return int(first.shape[0]), "examples"


def read_metrics(metrics_path: Path) -> list[dict]:
    """Rows of a run's metrics.jsonl, one per step (a resumed run rewrites the steps after its checkpoint)."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    return [r for _, r in sorted({r["step"]: r for r in rows}.items())]


def read_losses(metrics_path: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(metrics_path)]


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    """Loss (and eval loss) per step from the JSONL metrics, written atomically as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step = {r["step"]: r for r in read_metrics(metrics_path)}
    if not by_step:
        return None
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(steps, [by_step[s]["loss"] for s in steps], label="train loss")
    ev = [s for s in steps if "eval_loss" in by_step[s]]
    if ev:
        ax.plot(ev, [by_step[s]["eval_loss"] for s in ev], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out

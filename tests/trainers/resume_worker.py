"""A training run for the resume tests: `python -m tests.trainers.resume_worker RUN_DIR STEPS SLEEP`.

Deterministic data (a re-creatable iterable), dropout active (the rng must resume too), AdamW state,
checkpoints every 4 steps. Prints nothing; the test reads RUN_DIR/metrics.jsonl.
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import bridge  # noqa: E402
from trainers import TrainConfig, Trainer, adamw, classification_cross_entropy  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                        torch.nn.Linear(64, 4))

    def forward(self, x):
        return self.body(x)


def batches(n, sleep):
    rng = np.random.default_rng(123)
    for _ in range(n):
        x = rng.standard_normal((8, 16)).astype(np.float32)
        y = (x[:, :4].argmax(1)).astype(np.int32)
        time.sleep(sleep)
        yield {"x": x, "labels": y}


def main(run_dir, steps, sleep):
    torch.manual_seed(0)
    jm = bridge.convert(Net(), (torch.randn(8, 16),), train=True, dynamic="batch")
    cfg = TrainConfig(steps=steps, run_dir=run_dir, mesh={"fsdp": 4}, checkpoint_every=4, keep_checkpoints=2,
                      progress=False, plot=False)
    trainer = Trainer(jm, adamw(1e-2, total_steps=steps, warmup_steps=2), loss_fn=classification_cross_entropy(),
                      config=cfg)
    trainer.fit(batches(steps, sleep))
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))

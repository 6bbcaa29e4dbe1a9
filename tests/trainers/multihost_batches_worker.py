"""One of two processes (4 CPU devices each, gloo) feeding batches that the processes must agree on, for
test_multihost_batches. Every process runs the same scenarios in turn and prints one JSON line per scenario.

    python -m tests.trainers.multihost_batches_worker --process-id I --port P --run-dir D

The model's output is ignored: the loss is the mean of the batch's "rid" column over the global batch, so the
logged loss tells which rows (and how many) each step trained on. optax.sgd(0) keeps the weights fixed.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
import warnings

PROCESSES, LOCAL_DEVICES = 2, 4


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--hang-timeout", type=float, default=0)
    return p.parse_args(argv)


def batch(rows, rid):
    import numpy as np
    return {"x": np.zeros((rows, 2), np.float32), "rid": np.asarray(rid, np.float32).reshape(rows)}


def unequal(pid):
    """Four batches of 4 rows a process, but batch 1 has only 3 rows on process 1 (a per-host short batch)."""
    for b in range(4):
        n = 3 if (b == 1 and pid == 1) else 4
        yield batch(n, [b] * n)


def odd_global(pid):
    """Global batches of 16, 17 and 16 rows (row ids 100 * batch + row), each process taking its local_rows."""
    from trainers.data import local_rows
    for b, n in enumerate((16, 17, 16)):
        yield local_rows(batch(n, [100 * b + r for r in range(n)]), pid, PROCESSES)


def ended(pid):
    """Process 0 has three batches, process 1 only two."""
    for b in range(3 - pid):
        yield batch(4, [b] * 4)


SCENARIOS = {"tensor": ({"tensor": 8}, ended, 1), "unequal": ({"data": 8}, unequal, 3),
             "odd_global": ({"data": 8}, odd_global, 3), "ended": ({"data": 8}, ended, 5)}


def run(name, jm, args):
    import jax
    import jax.numpy as jnp
    import optax

    from trainers import TrainConfig, Trainer

    mesh, source, steps = SCENARIOS[name]
    run_dir = os.path.join(args.run_dir, name)
    config = TrainConfig(steps=steps, run_dir=run_dir, mesh=mesh, checkpoint_every=0, progress=False, plot=False)
    report = {"scenario": name}
    try:
        trainer = Trainer(jm, optax.sgd(0.0), loss_fn=lambda out, b: jnp.mean(b["rid"]) + 0.0 * jnp.sum(out),
                          config=config, inputs_fn=lambda b: ((b["x"],), {}))
    except ValueError as e:
        return {**report, "error": str(e)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = trainer.fit(source(jax.process_index()))
    trainer.close()
    final = int(state.step)
    with open(os.path.join(run_dir, "checkpoints", str(final), "meta", "metadata")) as f:
        position = json.load(f)["data_position"]
    losses = [json.loads(line)["loss"] for line in open(os.path.join(run_dir, "metrics.jsonl"))] \
        if jax.process_index() == 0 else None
    return {**report, "final_step": final, "data_position": position, "losses": losses,
            "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)]}


def main(argv=None) -> int:
    args = parse(argv)
    if args.hang_timeout:
        faulthandler.dump_traceback_later(args.hang_timeout, exit=True)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
    from trainers import TrainConfig
    from trainers.distributed import maybe_initialize

    maybe_initialize(TrainConfig(coordinator_address=f"127.0.0.1:{args.port}", num_processes=PROCESSES,
                                 process_id=args.process_id))
    import torch

    import bridge

    torch.set_num_threads(1)
    jm = bridge.convert(torch.nn.Linear(2, 1), (torch.zeros(8, 2),), dynamic="batch")
    for name in SCENARIOS:
        t0 = time.perf_counter()
        print(json.dumps({**run(name, jm, args), "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

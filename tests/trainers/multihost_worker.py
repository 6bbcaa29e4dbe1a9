"""One process of a multi-host training run on CPU (or the single-process reference), for test_multihost.

    python -m tests.trainers.multihost_worker --process-id I --num-processes 2 --port P --run-dir D \
        --devices-per-process 4 [--init config|env]
    python -m tests.trainers.multihost_worker --single --run-dir D          # 8 local devices, one process

Every process builds the same model (torch.manual_seed(0)) and generates the same global batches from a
fixed seed, feeds only its own rows (`trainers.data.local_rows`), and trains with FSDP over all 8 devices.
All processes share one run directory: orbax needs every process to save into the same checkpoint directory
(with per-process run directories the final save hangs, process 1 waiting for a directory only process 0 creates).
The last line of stdout is a JSON report: the metrics file's records and where the final parameters,
gathered from every process, were saved (final_params.process<i>.npz in the run directory).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time

GLOBAL_DEVICES = 8
GLOBAL_BATCH = 16
STEPS = 8
D_IN, CLASSES = 32, 8


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--single", action="store_true", help="reference run: one process, all devices local")
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--devices-per-process", type=int, default=None)
    p.add_argument("--init", choices=("config", "env"), default="config",
                   help="take the coordinator from TrainConfig or from JAX_* environment variables")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--hang-timeout", type=float, default=0,
                   help="dump every thread's stack to stderr and exit after this many seconds (0: never)")
    args = p.parse_args(argv)
    if args.single:
        args.num_processes, args.process_id = 1, 0
        args.devices_per_process = args.devices_per_process or GLOBAL_DEVICES
    else:
        if args.port is None:
            p.error("--port is required for a multi-process run")
        args.devices_per_process = args.devices_per_process or GLOBAL_DEVICES // args.num_processes
    if args.devices_per_process * args.num_processes != GLOBAL_DEVICES:
        p.error(f"need {GLOBAL_DEVICES} devices in all, got {args.num_processes} x {args.devices_per_process}")
    return args


def batches(steps: int, process_index: int, process_count: int):
    """The same global batches in every process (fixed seed); yields this process's rows only."""
    import numpy as np

    from trainers.data import local_rows

    rng = np.random.default_rng(1234)
    teacher = rng.standard_normal((D_IN, CLASSES))  # learnable labels, so the loss goes down
    for _ in range(steps):
        x = rng.standard_normal((GLOBAL_BATCH, D_IN)).astype(np.float32)
        y = np.argmax(x @ teacher, axis=-1).astype(np.int32)
        yield local_rows((x, y), process_index, process_count)


def main(argv=None) -> int:
    args = parse(argv)
    if args.hang_timeout:
        faulthandler.dump_traceback_later(args.hang_timeout, exit=True)
    # Before jax is imported: the host platform's device count is read once, at backend start-up.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = " ".join(
        [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        + [f"--xla_force_host_platform_device_count={args.devices_per_process}"])
    address = None if args.single else f"127.0.0.1:{args.port}"
    if address is not None and args.init == "env":
        os.environ.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(args.num_processes),
                          JAX_PROCESS_ID=str(args.process_id))

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")

    import numpy as np
    import torch
    from jax.experimental import multihost_utils

    import bridge
    from bridge.tree import flatten
    from tests.models import MLP
    from trainers import TrainConfig, Trainer, adamw, classification_cross_entropy
    from trainers.distributed import maybe_initialize

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    by_config = address is not None and args.init == "config"
    config = TrainConfig(
        steps=args.steps, run_dir=args.run_dir, seed=0, mesh={"fsdp": GLOBAL_DEVICES}, log_every=1,
        progress=False, plot=False, prefetch=2,
        coordinator_address=address if by_config else None,
        num_processes=args.num_processes if by_config else None,
        process_id=args.process_id if by_config else None)
    # jax.distributed.initialize has to come before bridge.convert touches the backend.
    multi = maybe_initialize(config)
    assert multi == (not args.single), (multi, args)
    assert jax.process_count() == args.num_processes and jax.process_index() == args.process_id
    assert jax.device_count() == GLOBAL_DEVICES and jax.local_device_count() == args.devices_per_process

    torch.manual_seed(0)
    model = MLP(d_in=D_IN, hidden=64, d_out=CLASSES).eval()
    jm = bridge.convert(model, (torch.randn(GLOBAL_BATCH, D_IN),), train=False)
    trainer = Trainer(jm, adamw(1e-2, total_steps=args.steps, warmup_steps=2),
                      loss_fn=classification_cross_entropy(1), config=config)
    state = trainer.fit(batches(args.steps, jax.process_index(), jax.process_count()))
    trainer.close()

    # The metrics file as this process sees it; the final parameters gathered from every process.
    rows = [json.loads(line) for line in open(os.path.join(args.run_dir, "metrics.jsonl")) if line.strip()]
    params = {k: np.asarray(v) for k, v in flatten(multihost_utils.process_allgather(state.params, tiled=True)).items()}
    params_path = os.path.join(args.run_dir, f"final_params.process{jax.process_index()}.npz")
    np.savez(params_path, **params)
    # every process calls export; arrays sharded across processes are gathered and process 0 writes
    exported = str(bridge.export(trainer.export_model(state), os.path.join(args.run_dir, "final.safetensors")))
    state_dict = bridge.to_state_dict(trainer.export_model(state))    # on every process: the whole of it
    state_dict_matches = sorted(state_dict) == sorted(params) and all(
        np.array_equal(state_dict[k].numpy(), params[k]) for k in params)
    specs = flatten(trainer.specs)
    report = {
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
        "final_step": int(state.step),
        "metrics": [{"step": r["step"], "loss": r["loss"], "grad_norm": r["grad_norm"]} for r in rows],
        "params_path": params_path,
        "exported": exported, "exported_exists": os.path.exists(exported), "state_dict_matches": state_dict_matches,
        "sharded": sorted(k for k, spec in specs.items() if any(a is not None for a in spec)),
        "replicated_share": trainer.report["replicated_share"],
        "checkpoints": sorted(os.listdir(os.path.join(args.run_dir, "checkpoints"))),
        "seconds": time.perf_counter() - t0,
    }
    sys.stdout.flush()
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

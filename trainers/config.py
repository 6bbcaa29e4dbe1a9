"""TrainConfig: every knob of a run in one frozen dataclass (also loadable from a TOML table).

Example:
    >>> TrainConfig(steps=100, mesh={"data": 2, "fsdp": 4}, checkpoint_every=50, run_dir="runs/x")
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    run_dir: str = "runs/default"
    seed: int = 0
    mesh: dict | None = None              # e.g. {"data": 2, "fsdp": 4}; default: all devices on data
    num_devices: int | None = None        # use only the first N devices (e.g. 1 for a reference run)
    grad_accum: int = 1                   # micro-batches per step (the batch's leading dim splits)
    compute_dtype: str | None = None      # "bfloat16" / "float16": compute from fp32 master weights
    loss_scale: str | float | None = "auto"   # "dynamic", a static number, None; auto: dynamic for float16
    loss_scale_init: float = 2.0 ** 16    # dynamic scaling's start (torch.amp.GradScaler's init_scale)
    loss_scale_growth_interval: int = 2000   # finite steps in a row before the scale doubles
    param_dtype: str = "float32"          # master weights
    remat: str | None = None              # None, "full" or "dots"
    nan_policy: str = "stop"              # "stop": raise with step + last checkpoint; "skip": drop the update
    ema_decay: float | None = None        # keep an exponential moving average of the params (torch's AveragedModel)
    log_every: int = 1
    eval_every: int = 0                   # 0: no periodic eval
    eval_batches: int = 4
    checkpoint_every: int = 0             # 0: only at the end
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    prefetch: int = 2                     # batches converted and placed ahead in a background thread
    progress: bool = True
    plot: bool = True
    # multi-host: jax.distributed.initialize from these or the usual environment variables
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown trainer settings {unknown}; known: {sorted(names)}")
        return cls(**d)

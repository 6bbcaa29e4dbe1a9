"""TrainConfig: every knob of a run in one frozen dataclass (also loadable from a TOML table).

Example:
    >>> TrainConfig(steps=100, mesh={"data": 2, "fsdp": 4}, checkpoint_every=50, run_dir="runs/x")
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


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

    def __post_init__(self):
        """Each setting checked where it is given, naming it: a typo ("Skip", "bf16") must not run as the
        default or fail far away."""
        for name, kind, low in _NUMBERS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if isinstance(value, bool) or not isinstance(value, kind) or value < low:
                what = "an integer" if kind is int else "a number"
                raise ValueError(f"TrainConfig.{name}={value!r}: expected {what} >= {low}"
                                 f"{' or None' if name in _OPTIONAL else ''}")
        for name in ("compute_dtype", "param_dtype"):   # jnp.bfloat16 / torch.bfloat16 given from Python
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                try:
                    value = str(value).removeprefix("torch.") if type(value).__module__ == "torch" \
                        else np.dtype(value).name
                except TypeError:
                    pass
                object.__setattr__(self, name, value)
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: expected one of {list(choices)}")
        for name in ("async_checkpoints", "progress", "plot"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: expected true or false")
        ls = self.loss_scale
        if not (ls in (None, "auto", "dynamic") or (isinstance(ls, (int, float)) and not isinstance(ls, bool)
                                                     and ls > 0)):
            raise ValueError(f"TrainConfig.loss_scale={ls!r}: expected 'auto', 'dynamic', a positive number or None")
        if self.ema_decay is not None and not (isinstance(self.ema_decay, float) and 0 < self.ema_decay < 1):
            raise ValueError(f"TrainConfig.ema_decay={self.ema_decay!r}: expected a float in (0, 1) or None")
        if self.mesh is not None and not (isinstance(self.mesh, dict) and all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or v == -1)
                for k, v in self.mesh.items())):
            raise ValueError(f"TrainConfig.mesh={self.mesh!r}: expected axis name -> size (-1: the rest), "
                             "e.g. {'data': 2, 'fsdp': -1}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown trainer settings {unknown}; known: {sorted(names)}")
        return cls(**d)


# (setting, type, lowest value); _OPTIONAL ones may be None
_NUMBERS = [("steps", int, 0), ("seed", int, 0), ("num_devices", int, 1), ("grad_accum", int, 1),
            ("loss_scale_init", (int, float), 0), ("loss_scale_growth_interval", int, 1), ("log_every", int, 1),
            ("eval_every", int, 0), ("eval_batches", int, 1), ("checkpoint_every", int, 0),
            ("keep_checkpoints", int, 1), ("prefetch", int, 0), ("num_processes", int, 1), ("process_id", int, 0)]
_OPTIONAL = {"num_devices", "num_processes", "process_id"}
_FLOATS = ("float32", "bfloat16", "float16")
_CHOICES = {"compute_dtype": (None, *_FLOATS), "param_dtype": _FLOATS, "remat": (None, "full", "dots"),
            "nan_policy": ("stop", "skip")}

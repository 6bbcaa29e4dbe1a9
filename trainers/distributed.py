"""Multi-host start-up: `jax.distributed.initialize` from the config or the usual environment variables
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).

`jax.distributed.initialize` must run before anything touches the XLA backend, and `bridge.convert`
already does (it puts the weights on a device), so a multi-host script calls this first:

    >>> config = TrainConfig(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=0, ...)
    >>> maybe_initialize(config)           # before bridge.convert; Trainer(...) calls it again harmlessly
    >>> jm = bridge.convert(model, ...)
"""
from __future__ import annotations

import os

import jax
from jax._src import xla_bridge

_initialized = False


def _env_int(name: str, value: int | None) -> int:
    if value is not None:
        return int(value)
    try:
        return int(os.environ[name])
    except KeyError:
        raise ValueError(f"multi-host run: a coordinator address is set but neither the config nor ${name} "
                         f"says the {'process count' if 'NUM' in name else 'process id'}") from None


def maybe_initialize(config) -> bool:
    """Initialise once when a coordinator is configured; returns whether this is a multi-process run."""
    global _initialized
    if _initialized:
        return True
    address = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address is None:
        return jax.distributed.is_initialized()  # the caller may have initialised it itself
    if jax.distributed.is_initialized():
        _initialized = True
        return True
    num = _env_int("JAX_NUM_PROCESSES", config.num_processes)
    pid = _env_int("JAX_PROCESS_ID", config.process_id)
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "jax.distributed.initialize must run before anything initialises the XLA backend, and something "
            "already did (bridge.convert, jax.devices(), any computation). Call "
            "trainers.distributed.maybe_initialize(config) first in a multi-host script.")
    # Cross-process collectives on CPU need an implementation (older JAX defaults to none). Only the
    # CPU client reads this flag, so it is safe to set without asking which backend will be used
    # (jax.default_backend() would itself initialise the backend and make initialize() fail).
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    _initialized = True
    return True

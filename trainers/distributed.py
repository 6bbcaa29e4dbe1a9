"""Multi-host start-up: `jax.distributed.initialize` from the config or the usual environment variables
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)."""
from __future__ import annotations

import os

import jax

_initialized = False


def maybe_initialize(config) -> bool:
    """Initialise once when a coordinator is configured; returns whether this is a multi-process run."""
    global _initialized
    address = config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address is None or _initialized:
        return _initialized
    num = config.num_processes or int(os.environ["JAX_NUM_PROCESSES"])
    pid = config.process_id if config.process_id is not None else int(os.environ["JAX_PROCESS_ID"])
    if jax.default_backend() == "cpu" or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    _initialized = True
    return True

"""orbax-checkpoint for TrainState: every N steps and at the end, keep the last K, async, atomic.

The data position (batches consumed) is saved beside the state, so resume skips exactly those.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from bridge.errors import CheckpointError


class Checkpointer:
    def __init__(self, directory: str | Path, *, every: int, keep: int, async_: bool = True):
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state, data_position: int, *, force: bool = False) -> None:
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_fields(state)), meta=ocp.args.JsonSave({"data_position": data_position})),
            force=force)

    def restore(self, step: int, abstract_state):
        """Restore into the given shardings (abstract_state: ShapeDtypeStructs with .sharding)."""
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_fields(abstract_state)), meta=ocp.args.JsonRestore()))
        except ValueError as e:   # orbax: the saved tree's structure, shapes or dtypes differ
            raise CheckpointError(
                f"{self.directory / str(step)}: this checkpoint does not fit the run as now configured "
                "(another model, optimizer or frozen-parameter set?); resume with the configuration that "
                f"wrote it, or start a new run_dir. orbax: {str(e).splitlines()[0]}") from e
        return type(abstract_state)(**out["state"]), int(out["meta"]["data_position"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _fields(state) -> dict:
    """The state's fields by name, leaving out unused optional ones (a TrainState without loss scaling
    is stored as before loss scaling existed, so older checkpoints still resume)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if getattr(state, f.name) is not None}


def abstract(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)

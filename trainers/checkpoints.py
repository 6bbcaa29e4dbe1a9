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
        """Restore into the given shardings (abstract_state: ShapeDtypeStructs with .sharding). A checkpoint
        that does not fit the run, or a damaged one, raises CheckpointError naming its directory and why."""
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_fields(abstract_state)), meta=ocp.args.JsonRestore()))
            return type(abstract_state)(**out["state"]), int(out["meta"]["data_position"])
        except (ValueError, KeyError, OSError) as e:   # orbax: a tree that differs, a missing item or file
            raise self._restore_error(step, _fields(abstract_state), e) from e

    def _restore_error(self, step: int, expected: dict, error: Exception) -> CheckpointError:
        """Why a restore failed: an item or file of the checkpoint is missing or unreadable (the saved arrays'
        names, shapes and dtypes are the run's), or it was written for another configuration."""
        where = self.directory / str(step)
        missing = [item for item in _ITEMS if not (where / item).is_dir()]
        if missing:
            return self._damaged(where, f"its item {missing[0]!r} ({_ITEMS[missing[0]]}) is missing")
        try:
            saved = _leaf_specs(ocp.StandardCheckpointHandler().metadata(where / "state").tree)
        except Exception as e:   # noqa: BLE001  (orbax/tensorstore raise many kinds for unreadable metadata)
            return self._damaged(where, f"state/ cannot be read ({_first_line(e)})")
        difference = _first_difference(saved, _leaf_specs(expected))
        if difference is None:
            return self._damaged(where, f"orbax: {_first_line(error)}")
        return CheckpointError(
            f"{where}: this checkpoint does not fit the run as now configured (another model, optimizer or "
            f"frozen-parameter set?): {difference}; resume with the configuration that wrote it, or start a new "
            f"run_dir. orbax: {_first_line(error)}")

    def _damaged(self, where: Path, what: str) -> CheckpointError:
        older = [s for s in self.manager.all_steps() if s < int(where.name)]
        hint = (f"move it aside to resume from step {max(older)}, the latest before it" if older
                else "no earlier checkpoint: start a new run_dir")
        return CheckpointError(f"{where}: the checkpoint is damaged or incomplete: {what}; {hint}")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


_ITEMS = {"state": "the arrays", "meta": "the data position"}


def _leaf_specs(tree) -> dict:
    """'path.to.leaf' → (shape, dtype) for every array of a state tree or of orbax's metadata of one."""
    def name(path):
        return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    return {name(path): (tuple(x.shape), str(x.dtype)) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _first_difference(saved: dict, expected: dict) -> str | None:
    for key in sorted(set(saved) | set(expected)):
        if key not in saved:
            return f"the run has {key!r}, the checkpoint does not"
        if key not in expected:
            return f"the checkpoint has {key!r}, the run does not"
        if saved[key] != expected[key]:
            (shape, dtype), (want, want_dtype) = saved[key], expected[key]
            return f"{key!r} is {dtype}{list(shape)} there, {want_dtype}{list(want)} here"
    return None


def _first_line(error: Exception) -> str:
    """An orbax/tensorstore message without its long tensorstore spec."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text.split(" [tensorstore_spec")[0]


def _fields(state) -> dict:
    """The state's fields by name, leaving out unused optional ones (a TrainState without loss scaling
    is stored as before loss scaling existed, so older checkpoints still resume)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if getattr(state, f.name) is not None}


def abstract(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)

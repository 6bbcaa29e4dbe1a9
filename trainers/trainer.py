"""`Trainer`: a thin host loop around a pure, sharded, jitted train step.

Example:
    >>> from trainers import Trainer, TrainConfig, adamw
    >>> trainer = Trainer(jm, adamw(3e-4, total_steps=100), config=TrainConfig(steps=100, mesh={"fsdp": 8}))
    >>> state = trainer.fit(batches)
    >>> bridge.export(trainer.export_model(state), "out/", like=hf_dir)

Multi-host: call `trainers.initialize_distributed(config)` before `bridge.convert` (converting
places weights on a device, which starts the JAX runtime); every process passes its local rows, an equal share
of each global batch (`trainers.data.local_rows` cuts one), and the mesh's data x fsdp axes split over the
processes. The processes agree on every batch: all train on it, or all skip it (unequal shares, rows that do not
split over the shards) with a warning, and all stop when any runs out of batches.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from bridge.atomic import atomic_path
from bridge.errors import NonFiniteLossError
from bridge.state import STATE_META
from trainers import data as data_lib
from trainers import loss_scale as loss_scale_lib
from trainers.checkpoints import Checkpointer, abstract
from trainers.config import TrainConfig
from trainers.distributed import maybe_initialize
from trainers.losses import model_loss
from trainers.optim import skip_frozen
from trainers.report import plot_losses, progress_bar, throughput_unit
from trainers.sharding import batch_sharding, check_batch_split, make_mesh, param_specs, replication_report
from trainers.state import TrainState
from trainers.step import default_inputs, make_eval_step, make_forward, make_train_step


class _Local(NamedTuple):
    """This process's side of a batch: placed as the global batch (None: it cannot be) and its rows."""
    placed: Any
    rows: int


class Trainer:
    def __init__(self, jm, optimizer: optax.GradientTransformation, *, loss_fn: Callable | None = None,
                 config: TrainConfig = TrainConfig(), rules=None, inputs_fn: Callable | None = None,
                 eval_model=None):
        maybe_initialize(config)
        meta = getattr(jm, "meta", None)
        optimizer = skip_frozen(optimizer, jm.params, meta.frozen) if meta is not None else optimizer
        self.jm, self.optimizer, self.config = jm, optimizer, config
        self.loss_fn = loss_fn or model_loss
        self.mesh = make_mesh(config.mesh, jax.devices()[: config.num_devices] if config.num_devices else None)
        check_batch_split(self.mesh)
        self.run_dir = Path(config.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_state_meta()
        inputs_fn = inputs_fn or default_inputs(jm)
        compute = jnp.dtype(config.compute_dtype) if config.compute_dtype else None
        if compute is not None:
            _check_captured_dtype(jm, compute)
        forward = make_forward(jm, self.loss_fn, inputs_fn, compute_dtype=compute, remat=config.remat)
        eval_forward = make_forward(eval_model or jm, self.loss_fn, inputs_fn, compute_dtype=compute)
        self._step_fn = make_train_step(forward, optimizer, accum=config.grad_accum, nan_policy=config.nan_policy,
                                        ema_decay=config.ema_decay)
        self._eval_fn = make_eval_step(eval_forward)
        master = jax.tree.map(lambda x: x.astype(config.param_dtype)
                              if jnp.issubdtype(x.dtype, jnp.floating) else x, jm.params)
        self._params0 = master
        self._loss_scale0 = loss_scale_lib.from_config(config.loss_scale, compute, init=config.loss_scale_init,
                                                       growth_interval=config.loss_scale_growth_interval)
        self.specs = param_specs(master, self.mesh, rules)
        self.report = replication_report(master, self.specs)
        self.batch_sharding = batch_sharding(self.mesh)
        self.state_shardings = self._state_shardings()
        self.train_step = jax.jit(self._step_fn, in_shardings=(self.state_shardings, self.batch_sharding),
                                  out_shardings=(self.state_shardings, None), donate_argnums=0)
        self.eval_step = jax.jit(self._eval_fn, in_shardings=(self.state_shardings, self.batch_sharding))
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", every=config.checkpoint_every,
                                         keep=config.keep_checkpoints, async_=config.async_checkpoints)
        self._stop_requested = False
        self._warned: set[str] = set()

    def _write_state_meta(self):
        """The model's torch names, dtypes, tied keys and order, beside the checkpoints: what
        `bridge export RUN_DIR` needs to write exactly the torch state_dict."""
        meta = getattr(self.jm, "meta", None)
        if meta is not None and jax.process_index() == 0:
            with atomic_path(self.run_dir / STATE_META) as tmp:
                tmp.write_text(meta.to_json())

    # -- state ----------------------------------------------------------------------------
    def _state_shardings(self) -> TrainState:
        rep = NamedSharding(self.mesh, P())
        param_sh = jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.specs, is_leaf=lambda x: isinstance(x, P))
        shapes = self._abstract_state()
        masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731  (frozen params: no state)
        opt_sh = optax.tree_map_params(self.optimizer, lambda v, s: v if masked(v) else s, shapes.opt_state,
                                       param_sh, transform_non_params=lambda _: rep, is_leaf=masked)
        return TrainState(step=rep, params=param_sh, buffers=jax.tree.map(lambda _: rep, self.jm.buffers),
                          opt_state=opt_sh, rng=rep, loss_scale=jax.tree.map(lambda _: rep, shapes.loss_scale),
                          ema=param_sh if self.config.ema_decay is not None else None)

    def _create(self, params, buffers) -> TrainState:
        return TrainState.create(params, buffers, self.optimizer, self.config.seed, loss_scale=self._loss_scale0,
                                 ema=self.config.ema_decay is not None)

    def _abstract_state(self) -> TrainState:
        return jax.eval_shape(self._create, self._params0, self.jm.buffers)

    def init_state(self) -> TrainState:
        """Initialise directly into the shardings (eval_shape → shardings → jit(init, out_shardings))."""
        return jax.jit(self._create, out_shardings=self.state_shardings)(self._params0, self.jm.buffers)

    def restore_or_init(self) -> tuple[TrainState, int]:
        latest = self.checkpointer.latest()
        if latest is None:
            return self.init_state(), 0
        return self.checkpointer.restore(latest, abstract(self._abstract_state(), self.state_shardings))

    def export_model(self, state: TrainState, *, ema: bool = False):
        """The JaxModule with the trained params/buffers (in the model's own dtypes), ready for bridge.export;
        ema=True: the moving average of the params (TrainConfig.ema_decay) with the run's current buffers."""
        if ema and state.ema is None:
            raise ValueError("this run keeps no moving average of the params: set TrainConfig(ema_decay=...)")
        cast = jax.tree.map(lambda new, old: new.astype(old.dtype), state.ema if ema else state.params,
                            self.jm.params)
        return self.jm.replace(params=cast, buffers=state.buffers)

    # -- loop -----------------------------------------------------------------------------
    def _prepare(self, batch) -> _Local:
        """A batch's host side (run in the prefetch thread, no collectives): checked, and placed as the global
        batch of every process's equal share when that splits over the data-parallel shards and micro-batches."""
        host = data_lib.to_host(batch)
        rows = data_lib.row_count(host)
        total = rows * jax.process_count()
        fits = total > 0 and total % self._row_multiple == 0
        return _Local(data_lib.place(host, self.batch_sharding, total) if fits else None, rows)

    def _convert(self, batch):
        """The batch placed on the mesh, or None for one every process skips (see `_next_batch`)."""
        local = self._prepare(batch)
        return local.placed if self._usable(local, self._shares(local)) else None

    @staticmethod
    def _usable(local: _Local, shares: np.ndarray) -> bool:
        return local.placed is not None and bool((shares == shares[0]).all())

    def _shares(self, local: _Local | None) -> np.ndarray:
        """Every process's rows of its current batch (-1: its batches ran out), the same array on all of them."""
        rows = -1 if local is None else local.rows
        if jax.process_count() == 1:
            return np.array([rows])
        return np.asarray(multihost_utils.process_allgather(np.array(rows, np.int32))).reshape(-1)

    @property
    def _row_multiple(self) -> int:
        return math.lcm(self.mesh.shape["data"] * self.mesh.shape["fsdp"], self.config.grad_accum)

    def evaluate(self, state: TrainState, batches: Iterable) -> float:
        it = map(self._prepare, itertools.islice(batches, self.config.eval_batches))
        losses, where = [], f"evaluation after step {int(state.step)}"
        with contextlib.suppress(StopIteration):
            while True:
                batch, _ = self._next_batch(it, where)
                losses.append(float(self.eval_step(state, batch)["loss"]))
        return float(np.mean(losses)) if losses else float("nan")

    def _next_batch(self, it, where: str):
        """(next placed batch, batches consumed). Every process takes or skips each batch together: one whose
        rows do not split over the data-parallel shards and micro-batches (e.g. a DataLoader's last), or whose
        processes hold different numbers of rows, is skipped on all of them (one warning a run for each);
        when any process's batches run out, every process stops (StopIteration)."""
        consumed = 0
        while True:
            local = next(it, None)
            shares = self._shares(local)
            if (shares < 0).any():
                self._warn_ended(shares, where)
                raise StopIteration
            consumed += 1
            if self._usable(local, shares):
                return local.placed, consumed
            self._warn_skipped(shares, where)

    def _warn_skipped(self, shares: np.ndarray, where: str) -> None:
        equal = bool((shares == shares[0]).all())
        kind = "ragged" if equal else "unequal"
        if kind in self._warned:
            return
        self._warned.add(kind)
        if equal:
            warnings.warn(f"{where}: skipped a batch whose rows do not divide into {self._row_multiple} (data x fsdp "
                          f"shards, grad_accum): {int(shares.sum())} rows; e.g. a DataLoader's last batch: pass "
                          "drop_last=True or a batch size divisible by it", stacklevel=4)
        else:
            warnings.warn(f"{where}: skipped a batch whose processes hold different numbers of rows "
                          f"({shares.tolist()} by process; {int(shares.sum())} in all): every process passes an "
                          "equal share of each global batch, so every process skips it", stacklevel=4)

    @staticmethod
    def _warn_ended(shares: np.ndarray, where: str) -> None:
        if (shares >= 0).any():
            ended = np.flatnonzero(shares < 0).tolist()
            warnings.warn(f"{where}: the batches of process(es) {ended} ran out while the other processes still had "
                          "some: every process stops here", stacklevel=4)

    def fit(self, batches: Iterable, *, eval_batches: Callable[[], Iterable] | None = None,
            state: TrainState | None = None) -> TrainState:
        """Train for config.steps, resuming from the run directory's latest checkpoint; without one, from
        `state` if given (e.g. `init_state()` with a torch optimizer's moments loaded), else a fresh state."""
        cfg = self.config
        if state is None or self.checkpointer.latest() is not None:
            state, position = self.restore_or_init()
        else:
            state, position = jax.device_put(state, self.state_shardings), 0
        start = int(state.step)
        it = data_lib.Prefetcher(itertools.islice(batches, position, None), self._prepare, cfg.prefetch)
        metrics_path = self.run_dir / "metrics.jsonl"
        is_main = jax.process_index() == 0
        if is_main:
            _drop_steps_after(metrics_path, start)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        bar = progress_bar(cfg, start)
        last_good = self.checkpointer.latest()
        try:
            with open(metrics_path, "a") if is_main else contextlib.nullcontext() as log:
                for step in range(start, cfg.steps):
                    try:
                        batch, n_read = self._next_batch(it, f"step {step + 1}")
                    except StopIteration:
                        break
                    position += n_read
                    t0 = time.perf_counter()
                    state, metrics = self.train_step(state, batch)
                    loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
                    dt = time.perf_counter() - t0
                    done = step + 1
                    if cfg.nan_policy == "stop":
                        self._stop_if_not_finite(loss, metrics, done, last_good)
                    record = {"step": done, "loss": loss, "grad_norm": gnorm, "step_time_s": dt,
                              "skipped": not bool(metrics["finite"])}
                    if "loss_scale" in metrics:
                        record["loss_scale"] = float(metrics["loss_scale"])
                    n, unit = throughput_unit(batch)
                    record[f"{unit}_per_s"] = n / dt
                    if cfg.eval_every and eval_batches is not None and done % cfg.eval_every == 0:
                        record["eval_loss"] = self.evaluate(state, eval_batches())
                    if is_main and (done % cfg.log_every == 0 or done == cfg.steps):
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", step_s=f"{dt:.3f}", **{unit + "/s": f"{n / dt:,.0f}"})
                    stop = self._agreed_stop()
                    if self.checkpointer.due(done) or stop:
                        self.checkpointer.save(done, state, position)
                        last_good = done
                    if stop:
                        break
            final = int(state.step)
            self.checkpointer.save(final, state, position, force=True)
            self.checkpointer.wait()
        finally:
            it.close()
            bar.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if cfg.plot and jax.process_index() == 0:
            plot_losses(metrics_path, self.run_dir / "loss.png")
        return state

    def _stop_if_not_finite(self, loss: float, metrics: dict, step: int, last_good) -> None:
        """nan_policy="stop": a non-finite loss, or non-finite gradients (which would have put NaN in the
        weights) raise; an overflow that dynamic loss scaling skipped and answered does not."""
        scaled = self._loss_scale0 is not None and self._loss_scale0.dynamic
        if np.isfinite(loss) and (scaled or bool(metrics["grads_finite"])):
            return
        what = f"loss is {loss}" if not np.isfinite(loss) else f"gradients are not finite (loss {loss:.6g})"
        where = self.checkpointer.directory / str(last_good) if last_good else "none (no checkpoint yet)"
        raise NonFiniteLossError(f"{what} at step {step}; last good checkpoint: {where}")

    def _on_sigterm(self, signum, frame):
        self._stop_requested = True

    def _agreed_stop(self) -> bool:
        """Every process stops (and saves) together if any of them was asked to."""
        if jax.process_count() == 1:
            return self._stop_requested
        flags = multihost_utils.process_allgather(np.array(self._stop_requested))
        return bool(np.asarray(flags).any())

    def close(self):
        self.checkpointer.close()


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _check_captured_dtype(jm, compute) -> None:
    """bf16 compute needs a program captured in bf16: an fp32 graph would cast the bf16 weights back up
    and silently compute in fp32."""
    wrong = sorted(n for n, d in jm.program.captured_dtypes().items()
                   if jnp.issubdtype(d, jnp.floating) and d != compute)
    if wrong:
        raise ValueError(
            f"compute_dtype={compute.name} but the model's graph computes {wrong[0]} (and {len(wrong) - 1} more) "
            f"in {jm.program.captured_dtypes()[wrong[0]].name}; convert with "
            f"bridge.convert(module, ..., compute_dtype=torch.{compute.name}) so the graph runs in {compute.name} "
            f"while the fp32 master weights stay in jm.params")



def _drop_steps_after(path: Path, step: int) -> None:
    """metrics.jsonl without the records of steps after `step`, where a run resumes: a run killed after its
    last checkpoint logged steps that the resumed run computes again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) != len(lines):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(kept))


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except ValueError:   # a line cut short when the process was killed
        return math.inf

"""What the trainer does with batches and checkpoints it cannot use as they are: rows shared out over processes
(`local_rows`), batch entries that cannot be split by rows, and damaged checkpoints: every row is used or the
batch skipped with a warning, and every error names the entry, step directory or file at fault."""
from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import bridge
from bridge.errors import CheckpointError, InputError
from trainers import TrainConfig, Trainer, mse
from trainers.data import local_rows


def _cfg(run_dir, **kw):
    return TrainConfig(run_dir=str(run_dir), progress=False, plot=False, **kw)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def linear():
    torch.manual_seed(0)
    return bridge.convert(torch.nn.Linear(4, 2), (torch.zeros(8, 4),), dynamic="batch")


def test_local_rows_give_every_row_to_one_process(tmp_path, linear):
    """17 rows over 2 processes: 8 + 9, none dropped (they were 8 + 8); the Trainer then skips the batch on every
    process, as one process skips it (17 rows do not split over 8 data shards): the same losses either way."""
    rows = {"rid": np.arange(17)}
    shares = [local_rows(rows, i, 2)["rid"].tolist() for i in range(2)]
    assert shares == [list(range(8)), list(range(8, 17))]
    assert [len(local_rows(rows, i, 3)["rid"]) for i in range(3)] == [5, 6, 6]
    assert np.concatenate([local_rows(rows, i, 3)["rid"] for i in range(3)]).tolist() == list(range(17))

    # one process, the global batches test_multihost_batches shares out: the 17-row batch is skipped
    batches = [{"x": np.zeros((n, 4), np.float32), "rid": 100.0 * b + np.arange(n, dtype=np.float32)}
               for b, n in enumerate((16, 17, 16))]
    trainer = Trainer(linear, optax.sgd(0.0), loss_fn=lambda out, b: jnp.mean(b["rid"]) + 0.0 * jnp.sum(out),
                      config=_cfg(tmp_path, steps=3, mesh={"data": 8}), inputs_fn=lambda b: ((b["x"],), {}))
    with pytest.warns(UserWarning, match=r"step 2: skipped a batch whose rows do not divide into 8 .*: 17 rows"):
        state = trainer.fit(batches)
    trainer.close()
    assert int(state.step) == 2 and _losses(tmp_path) == [7.5, 207.5]


def test_batch_entries_that_cannot_be_split_by_rows_are_named(tmp_path, linear):
    """Every entry of a batch is placed split by its leading dim: a 0-d counter, a string column or entries of
    different row counts raise InputError naming them (not IndexError, TypeError or IndivisibleError mid-run);
    extra numeric per-row entries are carried along and change nothing."""
    rng = np.random.default_rng(0)
    base = {"x": rng.standard_normal((16, 4)).astype(np.float32), "target": np.zeros((16, 2), np.float32)}
    trainer = Trainer(linear, optax.sgd(0.1), loss_fn=mse(), config=_cfg(tmp_path, steps=1, mesh={"data": 8}),
                      inputs_fn=lambda b: ((b["x"],), {}))
    cases = {"aaa_step": (dict(base, aaa_step=3), r"batch\['aaa_step'\]: a 0-d value"),
             "epoch": (dict(base, epoch=np.int32(0)), r"batch\['epoch'\]: a 0-d value"),
             "text": (dict(base, text=["hello"] * 16), r"batch\['text'\]: holds <U5 values"),
             "rows": (dict(base, a_index=np.arange(12)),
                      r"different numbers of rows \(12 rows: batch\['a_index'\]; 16 rows: batch\['target'\], "
                      r"batch\['x'\]\)")}
    for name, (batch, match) in cases.items():
        with pytest.raises(InputError, match=match):
            trainer.fit([batch])
    state = trainer.init_state()
    w, b = (np.asarray(linear.params[k]) for k in ("weight", "bias"))
    want = float(np.mean(np.square(base["x"] @ w.T + b)))
    for batch in (base, dict(base, index=np.arange(16))):
        np.testing.assert_allclose(trainer.evaluate(state, [batch]), want, rtol=1e-6)
    trainer.close()


def _damage(run_dir, what):
    step4 = run_dir / "checkpoints" / "4"
    if what == "meta":
        shutil.rmtree(step4 / "meta")
        return
    for path in list((step4 / "state").rglob("*")):   # the arrays' data: what a partial copy could leave out
        if path.name in ("d", "manifest.ocdbt") and path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize("what,match", [
    ("meta", r"checkpoints/4: the checkpoint is damaged or incomplete: its item 'meta' \(the data position\) is "
             r"missing; move it aside to resume from step 2"),
    ("arrays", r"checkpoints/4: the checkpoint is damaged or incomplete: state/ cannot be read \(.*"
               r"Metadata at \"(step|rng|params|opt_state)[\w.]*/\.zarray\".* does not exist\); move it aside to "
               r"resume from step 2"),
])
def test_a_damaged_checkpoint_is_named_and_the_one_before_it_resumes(tmp_path, linear, what, match):
    """A latest checkpoint that lost files is reported as damaged (its step directory and the missing item or
    file, and the checkpoint before it), not as a configuration change; moved aside, the run resumes from step 2
    and computes the same losses as the uninterrupted run."""
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal((8, 2)).astype(np.float32))
               for _ in range(4)]
    make = lambda: Trainer(linear, optax.adam(1e-2), loss_fn=mse(1),   # noqa: E731
                           config=_cfg(tmp_path, steps=4, num_devices=1, checkpoint_every=2))
    trainer = make()
    trainer.fit(batches)
    trainer.close()
    uninterrupted = _losses(tmp_path)
    _damage(tmp_path, what)
    with pytest.raises(CheckpointError, match=match):
        make().fit(batches)
    shutil.move(tmp_path / "checkpoints" / "4", tmp_path / "step4.damaged")
    trainer = make()
    state = trainer.fit(batches)
    trainer.close()
    assert int(state.step) == 4 and _losses(tmp_path) == uninterrupted

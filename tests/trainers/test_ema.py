"""TrainConfig(ema_decay=...): a moving average of the params, as torch's AveragedModel with
get_ema_multi_avg_fn keeps it, checkpointed with the run (exact resume) and exported on request."""
from __future__ import annotations

import copy

import jax
import numpy as np
import optax
import pytest
import torch
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import bridge
from bridge import cli
from tests.conftest import rel_err
from trainers import TrainConfig, Trainer, mse

LR, DECAY, STEPS = 0.05, 0.8, 5


def _model_and_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(8, 6, generator=g).numpy(), "target": torch.randn(8, 3, generator=g).numpy()}
               for _ in range(STEPS)]
    return model, batches


def _trainer(model, run_dir, steps, every=0):
    jm = bridge.convert(model, (torch.zeros(8, 6),), dynamic="batch")
    cfg = TrainConfig(steps=steps, run_dir=str(run_dir), progress=False, plot=False, ema_decay=DECAY,
                      checkpoint_every=every, async_checkpoints=False)
    return Trainer(jm, optax.adam(LR), loss_fn=mse(), config=cfg, inputs_fn=lambda b: ((b["x"],), {}))


def _torch_run(model, batches):
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    for b in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(torch.from_numpy(b["x"])), torch.from_numpy(b["target"])).backward()
        opt.step()
        ema.update_parameters(model)
    return ema.module


def _assert_params(got_jm, ref: torch.nn.Module):
    sd = bridge.to_state_dict(got_jm)
    for name, p in ref.named_parameters():   # Adam divides by sqrt(v): small gradients' rounding grows a little
        assert rel_err(sd[name], p.detach()) <= 1e-5, name


def test_moving_average_matches_torch_averaged_model(tmp_path):
    model, batches = _model_and_batches()
    trainer = _trainer(copy.deepcopy(model), tmp_path / "run", STEPS)
    state = trainer.fit(batches)
    ref_ema = _torch_run(model, batches)
    _assert_params(trainer.export_model(state, ema=True), ref_ema)
    _assert_params(trainer.export_model(state), model)   # the params themselves are unchanged by it
    assert not np.allclose(np.asarray(state.ema["0"]["weight"]), np.asarray(state.params["0"]["weight"]))
    trainer.close()
    for ema, ref in ((True, ref_ema), (False, model)):   # `bridge export RUN --ema` reads the run's checkpoint
        out = tmp_path / f"ema_{ema}.safetensors"
        assert cli.main(["export", str(tmp_path / "run"), "--to", str(out)] + ["--ema"] * ema) == 0
        written = load_file(out)
        for name, p in ref.named_parameters():
            assert rel_err(written[name], p.detach()) <= 1e-5, name


def test_moving_average_resumes_exactly(tmp_path):
    model, batches = _model_and_batches()
    full = _trainer(copy.deepcopy(model), tmp_path / "full", STEPS)
    ref = full.fit(batches)
    full.close()
    first = _trainer(copy.deepcopy(model), tmp_path / "split", 2, every=1)
    first.fit(batches[:2])
    first.close()
    second = _trainer(copy.deepcopy(model), tmp_path / "split", STEPS, every=1)   # restores step 2, ema included
    state = second.fit(batches)
    for a, b in zip(*(map(np.asarray, jax.tree.leaves(s.ema)) for s in (state, ref))):
        np.testing.assert_array_equal(a, b)
    second.close()


def test_export_of_a_run_without_average_is_refused(tmp_path):
    model, batches = _model_and_batches()
    jm = bridge.convert(model, (torch.zeros(8, 6),))
    trainer = Trainer(jm, optax.adam(LR), loss_fn=mse(), inputs_fn=lambda b: ((b["x"],), {}),
                      config=TrainConfig(steps=1, run_dir=str(tmp_path), progress=False, plot=False))
    state = trainer.fit(batches[:1])
    assert state.ema is None
    with pytest.raises(ValueError, match="ema_decay"):
        trainer.export_model(state, ema=True)
    trainer.close()
    assert cli.main(["export", str(tmp_path), "--to", str(tmp_path / "x.safetensors"), "--ema"]) != 0
    assert not (tmp_path / "x.safetensors").exists()

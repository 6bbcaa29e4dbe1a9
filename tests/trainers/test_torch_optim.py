"""A run moves between torch.optim.AdamW and the JAX trainer mid-training: moments, step counts and
schedule positions carry over, so continuing on either side matches continuing in torch."""
from __future__ import annotations

import copy

import numpy as np
import optax
import pytest
import torch

import bridge
from bridge.errors import CheckpointError
from bridge.tree import flatten
from trainers import TrainConfig, Trainer, load_torch_optimizer, mse, torch_optimizer_state

LR, WD = 0.01, 0.1


def _setup(named: bool, frozen: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    if frozen:
        model[2].weight.requires_grad_(False)
    opt = _adamw(model, named)
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(8, 8, generator=g).numpy(), "target": torch.randn(8, 4, generator=g).numpy()}
               for _ in range(6)]
    return model, opt, batches


def _adamw(model, named: bool):
    """torch.optim.AdamW over the trainable parameters, from named_parameters() or plain parameters."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(params if named else [p for _, p in params], lr=LR, weight_decay=WD, betas=(0.8, 0.99))


def _torch_steps(model, opt, batches):
    for b in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(torch.from_numpy(b["x"])), torch.from_numpy(b["target"])).backward()
        opt.step()


def _trainer(model, tmp_path, steps):
    jm = bridge.convert(model, (torch.zeros(8, 8),), dynamic="batch")
    opt = optax.adamw(LR, b1=0.8, b2=0.99, eps=1e-8, weight_decay=WD)
    cfg = TrainConfig(steps=steps, run_dir=str(tmp_path / "run"), progress=False, plot=False)
    return jm, Trainer(jm, opt, loss_fn=mse(), config=cfg, inputs_fn=lambda b: ((b["x"],), {}))


@pytest.mark.parametrize("named,frozen", [(True, False), (False, False), (False, True)])
def test_torch_adamw_run_continues_in_jax_and_back(tmp_path, named, frozen):
    model, opt, batches = _setup(named, frozen)
    _torch_steps(model, opt, batches[:2])                          # two steps in torch, then move
    ref_model = copy.deepcopy(model)
    ref_opt = _adamw(ref_model, named)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))   # torch would share the step/moment tensors
    _torch_steps(ref_model, ref_opt, batches[2:6])                 # the reference: all six in torch

    jm, trainer = _trainer(model, tmp_path, steps=2)               # steps 3-4 in JAX
    state = load_torch_optimizer(trainer.init_state(), opt.state_dict(), jm)
    state = trainer.fit(batches[2:4], state=state)
    back = type(model)(*[copy.deepcopy(m) for m in model])
    back.load_state_dict(bridge.to_state_dict(trainer.export_model(state)))
    back_opt = _adamw(back, named)
    back_opt.load_state_dict(torch_optimizer_state(state, jm, like=back_opt.state_dict()))
    _torch_steps(back, back_opt, batches[4:6])                     # steps 5-6 back in torch
    for (name, p), ref in zip(back.named_parameters(), ref_model.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    moments = back_opt.state_dict()["state"][0]
    assert float(moments["step"]) == 6 and float(ref_opt.state_dict()["state"][0]["step"]) == 6


def test_an_optimizer_that_does_not_fit_is_named(tmp_path):
    model, opt, batches = _setup(False, False)
    _torch_steps(model, opt, batches[:1])
    jm, trainer = _trainer(model, tmp_path, steps=1)
    sd = opt.state_dict()
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:3]
    with pytest.raises(CheckpointError, match="the optimizer holds 3 parameters and the model 6"):
        load_torch_optimizer(trainer.init_state(), sd, jm)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _torch_steps(model, sgd, batches[:1])
    with pytest.raises(CheckpointError, match="not an Adam/AdamW state_dict"):
        load_torch_optimizer(trainer.init_state(), sgd.state_dict(), jm)
    assert flatten(jm.params)

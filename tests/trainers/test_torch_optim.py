"""A run moves between torch.optim (AdamW, SGD with momentum) and the JAX trainer mid-training: moments, momentum
buffers, step counts and schedule positions carry over, so continuing on either side matches continuing in torch."""
from __future__ import annotations

import copy

import jax
import numpy as np
import optax
import pytest
import torch

import bridge
from bridge.errors import CheckpointError
from bridge.tree import flatten
from trainers import TrainConfig, Trainer, load_torch_optimizer, mse, torch_optimizer_state

LR, WD = 0.01, 0.1


def _setup(named: bool, frozen: bool, family: str = "adamw"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    if frozen:
        model[2].weight.requires_grad_(False)
    opt = _torch_opt(model, named, family)
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(8, 8, generator=g).numpy(), "target": torch.randn(8, 4, generator=g).numpy()}
               for _ in range(6)]
    return model, opt, batches


def _torch_opt(model, named: bool, family: str):
    """torch.optim.AdamW or SGD over the trainable parameters, from named_parameters() or plain parameters."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = params if named else [p for _, p in params]
    if family == "adamw":
        return torch.optim.AdamW(params, lr=LR, weight_decay=WD, betas=(0.8, 0.99))
    return torch.optim.SGD(params, lr=LR * 10, momentum=0.9, nesterov=family == "sgd_nesterov", weight_decay=WD)


def _optax_opt(family: str):
    if family == "adamw":
        return optax.adamw(LR, b1=0.8, b2=0.99, eps=1e-8, weight_decay=WD)
    return optax.chain(optax.add_decayed_weights(WD),   # torch's SGD adds weight decay to the gradient
                       optax.sgd(LR * 10, momentum=0.9, nesterov=family == "sgd_nesterov"))


def _torch_steps(model, opt, batches):
    for b in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(torch.from_numpy(b["x"])), torch.from_numpy(b["target"])).backward()
        opt.step()


def _trainer(model, tmp_path, steps, family="adamw"):
    jm = bridge.convert(model, (torch.zeros(8, 8),), dynamic="batch")
    opt = _optax_opt(family)
    cfg = TrainConfig(steps=steps, run_dir=str(tmp_path / "run"), progress=False, plot=False)
    return jm, Trainer(jm, opt, loss_fn=mse(), config=cfg, inputs_fn=lambda b: ((b["x"],), {}))


@pytest.mark.parametrize("named,frozen,family", [(True, False, "adamw"), (False, False, "adamw"),
                                                 (False, True, "adamw"), (True, False, "sgd"),
                                                 (False, True, "sgd_nesterov")])
def test_torch_run_continues_in_jax_and_back(tmp_path, named, frozen, family):
    model, opt, batches = _setup(named, frozen, family)
    _torch_steps(model, opt, batches[:2])                          # two steps in torch, then move
    ref_model = copy.deepcopy(model)
    ref_opt = _torch_opt(ref_model, named, family)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))   # torch would share the step/moment tensors
    _torch_steps(ref_model, ref_opt, batches[2:6])                 # the reference: all six in torch

    jm, trainer = _trainer(model, tmp_path, steps=2, family=family)   # steps 3-4 in JAX
    state = load_torch_optimizer(trainer.init_state(), opt.state_dict(), jm)
    state = trainer.fit(batches[2:4], state=state)
    back = type(model)(*[copy.deepcopy(m) for m in model])
    back.load_state_dict(bridge.to_state_dict(trainer.export_model(state)))
    back_opt = _torch_opt(back, named, family)
    back_opt.load_state_dict(torch_optimizer_state(state, jm, like=back_opt.state_dict()))
    _torch_steps(back, back_opt, batches[4:6])                     # steps 5-6 back in torch
    for (name, p), ref in zip(back.named_parameters(), ref_model.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    moments = back_opt.state_dict()["state"][0]
    if family == "adamw":
        assert float(moments["step"]) == 6 and float(ref_opt.state_dict()["state"][0]["step"]) == 6
    else:
        np.testing.assert_allclose(moments["momentum_buffer"].numpy(),
                                   ref_opt.state_dict()["state"][0]["momentum_buffer"].numpy(), rtol=1e-5, atol=1e-6)


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
    with pytest.raises(CheckpointError, match=r"a torch SGD with momentum state_dict cannot fill .*\['mu', 'nu'\]"):
        load_torch_optimizer(trainer.init_state(), sgd.state_dict(), jm)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)   # no momentum: no state to move
    _torch_steps(model, plain, batches[:1])
    with pytest.raises(CheckpointError, match="not an Adam/AdamW state_dict .* nor an SGD one with momentum"):
        load_torch_optimizer(trainer.init_state(), plain.state_dict(), jm)
    scheduled = Trainer(jm, optax.sgd(optax.linear_schedule(0.1, 0.0, 10), momentum=0.9), loss_fn=mse(),
                        config=TrainConfig(steps=1, run_dir=str(tmp_path / "s"), progress=False, plot=False),
                        inputs_fn=lambda b: ((b["x"],), {}))
    with pytest.raises(CheckpointError, match="keeps no step count .* pass step="):
        load_torch_optimizer(scheduled.init_state(), sgd.state_dict(), jm)
    state = load_torch_optimizer(scheduled.init_state(), sgd.state_dict(), jm, step=1)
    counts = [x for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0] if "count" in str(p[-1])]
    assert counts and all(int(c) == 1 for c in counts)
    assert flatten(jm.params)

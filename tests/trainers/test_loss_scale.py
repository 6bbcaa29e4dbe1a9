"""float16 training: loss scaling against torch.amp (autocast + GradScaler) and torch fp32 autograd,
its checkpointed state, and non-finite gradients under nan_policy="stop"."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import bridge
from bridge.errors import NonFiniteLossError
from bridge.tree import flatten
from trainers import LossScale, TrainConfig, Trainer, mse

LR = 0.05


class Regressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))

    def forward(self, x):
        return self.net(x)


def _module(seed=0):
    torch.manual_seed(seed)
    return Regressor()


def _batches(n, rows=16, target_noise=1.0, module=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(rows, 32, generator=g)
        base = module(x).detach() if module is not None else 0.0
        out.append({"x": x.numpy(), "target": (base + target_noise * torch.randn(rows, 8, generator=g)).numpy()})
    return out


def _torch_amp(module, batches, accum=1, **scaler):
    """torch's own fp16 recipe: autocast + GradScaler (+ accumulation over micro-batches) + SGD;
    (params, scale each step ran with)."""
    opt = torch.optim.SGD(module.parameters(), lr=LR)
    gs = torch.amp.GradScaler("cpu", **scaler)
    scales = []
    for b in batches:
        opt.zero_grad()
        scales.append(gs.get_scale())
        for x, t in zip(torch.from_numpy(b["x"]).chunk(accum), torch.from_numpy(b["target"]).chunk(accum)):
            with torch.autocast("cpu", dtype=torch.float16):
                out = module(x)
            gs.scale(torch.nn.functional.mse_loss(out.float(), t) / accum).backward()
        gs.step(opt)
        gs.update()
    return {k: v.detach().numpy() for k, v in module.named_parameters()}, scales


def _bridge_fp16(module, batches, tmp_path, name="fp16", weight=1.0, **cfg):
    example = (torch.from_numpy(batches[0]["x"]),)
    jm = bridge.convert(module, example, dynamic="batch", compute_dtype=torch.float16)
    config = TrainConfig(steps=len(batches), run_dir=str(tmp_path / name), compute_dtype="float16",
                         progress=False, plot=False, **cfg)
    loss_fn = mse() if weight == 1.0 else lambda out, b: weight * mse()(out, b)
    trainer = Trainer(jm, optax.sgd(LR / weight), loss_fn=loss_fn, config=config,
                      inputs_fn=lambda b: ((b["x"].astype(jnp.float16),), {}))
    state = trainer.fit(batches)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return trainer, state, rows


def test_scale_schedule_matches_grad_scaler_kernel():
    """The schedule over overflow / finite steps, growth capped below float32's max: torch's kernel."""
    pattern = [0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    for init in (2.0 ** 16, 2.0 ** 126):
        scale, tracker = torch.tensor([init]), torch.zeros(1, dtype=torch.int32)
        ls = LossScale.create("dynamic", init=init, growth_interval=3)
        update = jax.jit(LossScale.update)
        for overflow in pattern:
            torch._amp_update_scale_(scale, tracker, torch.tensor([float(overflow)]), 2.0, 0.5, 3)
            ls = update(ls, jnp.asarray(not overflow))
            assert float(ls.value) == float(scale) and int(ls.good_steps) == int(tracker)


@pytest.mark.parametrize("accum", [1, 2])
def test_fp16_training_follows_torch_amp_grad_scaler(tmp_path, accum):
    """Overflowing steps are skipped and back the scale off, finite ones grow it: the same steps, scales
    and weights as torch.autocast(float16) + GradScaler + SGD (with accumulation: loss / accum per micro-batch)."""
    batches = _batches(10)
    ref, ref_scales = _torch_amp(_module(), batches, accum, init_scale=2.0 ** 24, growth_interval=2)
    _, state, rows = _bridge_fp16(_module(), batches, tmp_path, loss_scale_init=2.0 ** 24,
                                  loss_scale_growth_interval=2, grad_accum=accum)
    assert [r["loss_scale"] for r in rows] == ref_scales
    skipped = [r["skipped"] for r in rows]
    assert skipped[:2] == [True, True] and not all(skipped)       # overflow first, then train
    got = flatten(state.params)
    for k, want in ref.items():
        np.testing.assert_allclose(got[k], want, rtol=2e-3, atol=5e-5, err_msg=k)


@pytest.mark.parametrize("weight", [1e-7])
def test_dynamic_scaling_keeps_gradients_that_float16_flushes(tmp_path, weight):
    """A loss weighted 1e-7 gives output gradients of ~1e-9, below float16's smallest subnormal:
    without scaling the update vanishes; with it, it is torch fp32 autograd's."""
    batches = _batches(1)
    ref = _module()
    out = ref(torch.from_numpy(batches[0]["x"]))
    (weight * torch.nn.functional.mse_loss(out, torch.from_numpy(batches[0]["target"]))).backward()
    want = {k: -LR / weight * p.grad.numpy() for k, p in ref.named_parameters()}
    p0 = {k: p.detach().numpy() for k, p in ref.named_parameters()}

    def update(**cfg):
        _, state, _ = _bridge_fp16(_module(), batches, tmp_path, name=str(cfg), weight=weight, **cfg)
        return {k: np.asarray(v) - p0[k] for k, v in flatten(state.params).items()}

    scaled, unscaled = update(), update(loss_scale=None)
    for k, w in want.items():
        rel = np.linalg.norm(scaled[k] - w) / np.linalg.norm(w)
        assert rel < 1e-2, (k, rel)
        assert np.linalg.norm(unscaled[k]) < 1e-2 * np.linalg.norm(w), k


def test_loss_scale_resumes_from_the_checkpoint(tmp_path):
    batches = _batches(8)
    _, whole, whole_rows = _bridge_fp16(_module(), batches, tmp_path, name="whole", loss_scale_init=2.0 ** 24,
                                        loss_scale_growth_interval=3)
    _bridge_fp16(_module(), batches[:4], tmp_path, name="part", loss_scale_init=2.0 ** 24,
                 loss_scale_growth_interval=3)
    _, resumed, rows = _bridge_fp16(_module(), batches, tmp_path, name="part", loss_scale_init=2.0 ** 24,
                                    loss_scale_growth_interval=3)
    assert [r["loss_scale"] for r in rows] == [r["loss_scale"] for r in whole_rows]
    assert float(resumed.loss_scale.value) == float(whole.loss_scale.value)
    assert int(resumed.loss_scale.good_steps) == int(whole.loss_scale.good_steps)
    for k, v in flatten(whole.params).items():
        np.testing.assert_array_equal(flatten(resumed.params)[k], v, err_msg=k)


@pytest.mark.parametrize("value", ["dynamic", 0, -1.0, "big"])
def test_bad_loss_scale_settings_name_the_value(value):
    if value == "dynamic":
        with pytest.raises(ValueError, match="loss_scale_growth_interval=0"):
            LossScale.create(value, growth_interval=0)
    else:
        with pytest.raises(ValueError, match=f"loss_scale={value!r}"):
            LossScale.create(value)


def _nan_grad_loss(outputs, batch):
    """Finite loss, NaN gradient on the poisoned step: d sqrt(|u|)/du at u = 0."""
    u = outputs[0, 0] - jax.lax.stop_gradient(outputs[0, 0])
    off = 1.0 - batch["poison"][0]
    return mse()(outputs, batch) + jnp.sqrt(jnp.abs(u) + off) - off


def test_nan_gradients_with_a_finite_loss_stop_the_run(tmp_path):
    """nan_policy="stop" (fp32, no loss scaling) stops at the step whose gradients are not finite,
    before NaN weights turn up as a NaN loss a step later."""
    batches = [{**b, "poison": np.full(16, float(i == 2), np.float32)} for i, b in enumerate(_batches(5))]
    jm = bridge.convert(_module(), (torch.from_numpy(batches[0]["x"]),), dynamic="batch")
    config = TrainConfig(steps=5, run_dir=str(tmp_path / "r"), progress=False, plot=False)
    trainer = Trainer(jm, optax.sgd(LR), loss_fn=_nan_grad_loss, config=config)
    with pytest.raises(NonFiniteLossError, match=r"gradients are not finite \(loss [0-9.]+\) at step 3"):
        trainer.fit(batches)

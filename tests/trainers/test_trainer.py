"""The trainer: compile-once step, sharded vs single-device losses, accumulation, mixed precision,
remat, NaN guards, data sources, metrics and plots."""
from __future__ import annotations

import functools
import itertools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import bridge
from bridge.errors import CheckpointError, NonFiniteLossError
from trainers import TrainConfig, Trainer, adamw, classification_cross_entropy, decay_mask, mse, token_cross_entropy
from trainers.sharding import make_mesh, param_specs
from tests.conftest import full_only
from tests.models import MODELS

STEPS = 20


@functools.lru_cache(maxsize=None)
def _lm(name: str, train: bool):
    torch.manual_seed(0)
    case = MODELS[name]()
    ids = torch.randint(0, 128, (8, 16))
    return bridge.convert(case.module, kwargs={"input_ids": ids, "labels": ids}, train=train, dynamic="batch")


def _lm_batches(n=STEPS, batch=8):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ids = (rng.integers(0, 128, (batch, 1)) + 3 * np.arange(16)) % 128   # learnable: arithmetic runs
        out.append({"input_ids": ids, "labels": ids})
    return out


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _fit(jm, tmp_path, name, batches=None, **cfg):
    cfg = {"steps": STEPS, "run_dir": str(tmp_path / name), "progress": False, "plot": False, **cfg}
    trainer = Trainer(jm, adamw(3e-3, total_steps=cfg["steps"], warmup_steps=2), config=TrainConfig(**cfg))
    state = trainer.fit(batches if batches is not None else _lm_batches(cfg["steps"]))
    return trainer, state, np.array(_losses(tmp_path / name))


_MESHES = {"data": {"data": 8}, "fsdp": {"fsdp": 8}, "3d": {"data": 2, "fsdp": 2, "tensor": 2}}


@pytest.mark.parametrize("model,mesh", [pytest.param(m, _MESHES[k], id=f"{k}-{m}", marks=() if (m, k) in
                                                     (("gpt2", "3d"), ("llama", "fsdp")) else full_only)
                                        for m in ("gpt2", "llama") for k in _MESHES])
def test_sharded_losses_match_one_device(tmp_path, model, mesh):
    jm = _lm(model, True)                                   # dropout on: the rng must not depend on sharding
    _, _, ref = _fit(jm, tmp_path, "one", num_devices=1)
    trainer, state, got = _fit(jm, tmp_path, "many", mesh=mesh)
    assert len(got) == STEPS and trainer.train_step._cache_size() == 1     # the second step did not recompile
    assert np.max(np.abs(got - ref) / np.abs(ref)) <= 1e-5, np.abs(got - ref).max()
    assert ref[-1] < ref[0]
    if mesh.get("fsdp", 1) > 1:                              # FSDP really shards the matrices
        w = jax.tree.leaves(state.params)
        assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in w)
        assert trainer.report["replicated_share"] < 0.05


def test_tensor_rules_cover_hf_attention_and_mlp():
    mesh = make_mesh({"tensor": 2, "fsdp": 4})
    for name, picks in {"gpt2": ["attn.c_attn.weight", "mlp.c_proj.weight"],
                        "llama": ["self_attn.q_proj.weight", "mlp.down_proj.weight"],
                        "bert": ["attention.self.query.weight", "intermediate.dense.weight"]}.items():
        case = MODELS[name]()
        specs = bridge.tree.flatten(param_specs(bridge.tree.nest({k: v for k, v in case.module.state_dict().items()}),
                                                mesh))
        for pick in picks:
            spec = next(s for k, s in specs.items() if k.endswith(pick))
            assert any("tensor" in (a if isinstance(a, tuple) else (a,)) for a in spec if a), (name, pick, spec)


def test_grad_accumulation_equals_the_full_batch(tmp_path):
    jm = _lm("gpt2", False)
    _, _, full = _fit(jm, tmp_path, "full", steps=5)
    _, _, accum = _fit(jm, tmp_path, "acc", steps=5, grad_accum=4)
    np.testing.assert_allclose(accum, full, rtol=1e-5)


@functools.lru_cache(maxsize=None)
def _lm_bf16(name: str):
    torch.manual_seed(0)
    case = MODELS[name]()
    ids = torch.randint(0, 128, (8, 16))
    return bridge.convert(case.module, kwargs={"input_ids": ids, "labels": ids}, dynamic="batch",
                          compute_dtype=torch.bfloat16)


def test_mixed_precision_keeps_fp32_master_weights(tmp_path):
    jm, jm16 = _lm("gpt2", False), _lm_bf16("gpt2")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(jm16.params))
    np.testing.assert_array_equal(jm16.params["transformer"]["wte"]["weight"], jm.params["transformer"]["wte"]["weight"])
    _, _, ref = _fit(jm, tmp_path, "fp32", steps=5)
    trainer, state, bf16 = _fit(jm16, tmp_path, "bf16", steps=5, compute_dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    np.testing.assert_allclose(bf16, ref, rtol=2e-2)
    assert np.max(np.abs(bf16 - ref)) > 0                       # it really ran in bf16 ...
    batch = trainer._convert(_lm_batches(1)[0])
    hlo = trainer.train_step.lower(state, batch).as_text()
    assert "bf16" in hlo and "dot_general" in hlo               # ... with bf16 matmuls


def test_bf16_compute_refuses_an_fp32_graph(tmp_path):
    with pytest.raises(ValueError, match="compute_dtype=torch.bfloat16"):
        Trainer(_lm("gpt2", False), adamw(1e-3, total_steps=2),
                config=TrainConfig(compute_dtype="bfloat16", run_dir=str(tmp_path), progress=False, plot=False))


@pytest.mark.parametrize("remat", ["full", pytest.param("dots", marks=full_only)])
def test_remat_changes_nothing_numerically(tmp_path, remat):
    jm = _lm("gpt2", False)
    _, _, ref = _fit(jm, tmp_path, "plain", steps=3)
    _, _, got = _fit(jm, tmp_path, remat, steps=3, remat=remat)
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def _poisoned(n, bad_step):
    out = _lm_batches(n)
    out[bad_step - 1] = {**out[bad_step - 1], "poison": np.ones(8, np.float32)}
    return [{**b, "poison": b.get("poison", np.zeros(8, np.float32))} for b in out]


def _poison_loss(outputs, batch):
    return outputs["loss"] + jnp.where(batch["poison"][0] > 0, jnp.nan, 0.0)


def test_nan_loss_stops_with_step_and_last_checkpoint(tmp_path):
    jm = _lm("gpt2", False)
    cfg = TrainConfig(steps=8, run_dir=str(tmp_path / "nan"), checkpoint_every=2, progress=False, plot=False)
    trainer = Trainer(jm, adamw(1e-3, total_steps=8), loss_fn=_poison_loss, config=cfg)
    with pytest.raises(NonFiniteLossError, match=r"at step 5; last good checkpoint: .*checkpoints/4"):
        trainer.fit(_poisoned(8, 5))


def test_nan_loss_skip_policy_keeps_the_previous_update(tmp_path):
    jm = _lm("gpt2", False)
    cfg = TrainConfig(steps=6, run_dir=str(tmp_path / "skip"), nan_policy="skip", progress=False, plot=False)
    trainer = Trainer(jm, adamw(1e-3, total_steps=6), loss_fn=_poison_loss, config=cfg)
    state = trainer.fit(_poisoned(6, 3))
    rows = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False, False, True, False, False, False]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    assert all("grad_norm" in r for r in rows)


def test_dataloader_of_torch_tensors_and_outputs(tmp_path):
    torch.manual_seed(0)
    case = MODELS["cnn"]()
    x = torch.randn(64, 3, 16, 16)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)
    jm = bridge.convert(case.module, (x[:16],), train=True, dynamic="batch")
    cfg = TrainConfig(steps=4, run_dir=str(tmp_path / "cnn"), progress=False, eval_every=2, eval_batches=2)
    trainer = Trainer(jm, adamw(1e-2, total_steps=4), loss_fn=classification_cross_entropy(1), config=cfg)
    state = trainer.fit(loader, eval_batches=lambda: iter(loader))
    rows = [json.loads(line) for line in (tmp_path / "cnn" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "eval_loss" in rows[1]
    assert "examples_per_s" in rows[0]
    assert (tmp_path / "cnn" / "loss.png").stat().st_size > 1000
    assert int(bridge.tree.flatten(state.buffers)["features.1.num_batches_tracked"]) == 4   # BN stats trained


def test_decay_mask_skips_biases_and_norms():
    params = bridge.tree.nest({k: v for k, v in MODELS["gpt2"]().module.state_dict().items()
                               if not k.startswith("lm_head")})
    mask = bridge.tree.flatten(decay_mask(params))
    assert mask["transformer.h.0.attn.c_attn.weight"] and mask["transformer.wte.weight"]
    assert not mask["transformer.h.0.attn.c_attn.bias"] and not mask["transformer.h.0.ln_1.weight"]


def test_token_cross_entropy_matches_hf_loss():
    jm = _lm("gpt2", False)
    b = _lm_batches(1)[0]
    b["labels"] = b["labels"].copy()
    b["labels"][:, :3] = -100
    out = jm(input_ids=b["input_ids"], labels=b["labels"])
    np.testing.assert_allclose(token_cross_entropy()(out, b), out["loss"], rtol=1e-5)


def test_weights_load_straight_into_trainer_shardings(tmp_path):
    from trainers import param_shardings
    jm = _lm("gpt2", False)
    bridge.export(jm, tmp_path / "w.safetensors")
    mesh = make_mesh({"fsdp": 8})
    jm_sharded, report = jm.load_weights(tmp_path / "w.safetensors", shardings=param_shardings(jm.params, mesh))
    assert report.clean
    wte = jm_sharded.params["transformer"]["wte"]["weight"]
    assert not wte.sharding.is_fully_replicated and len(wte.addressable_shards) == 8
    assert wte.addressable_shards[0].data.shape[0] == wte.shape[0] // 8      # each device holds its slice only
    cfg = TrainConfig(steps=2, run_dir=str(tmp_path / "run"), mesh={"fsdp": 8}, progress=False, plot=False)
    trainer = Trainer(jm_sharded, adamw(1e-3, total_steps=2), config=cfg)
    state = trainer.init_state()
    assert state.params["transformer"]["wte"]["weight"].sharding.spec == wte.sharding.spec


class _ComplexFilter(torch.nn.Module):
    """A learnable complex spectral filter: real in, real out, complex parameters."""

    def __init__(self, n=16):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n // 2 + 1, dtype=torch.complex64))
        self.proj = torch.nn.Linear(n, 4)

    def forward(self, x):
        return self.proj(torch.fft.irfft(torch.fft.rfft(x) * self.w, n=x.shape[-1]))


def test_complex_parameters_train_as_in_torch(tmp_path):
    """jax.grad returns the conjugate of torch's gradient for complex leaves; the trainer must still descend."""
    torch.manual_seed(0)
    model = _ComplexFilter()
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    jm = bridge.convert(model, (x,))
    report = bridge.parity_report(model, jm, (x,))
    assert report["grad_rel_err"] < 1e-4, report
    ref = _ComplexFilter()
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        opt.step()
    cfg = TrainConfig(steps=5, run_dir=str(tmp_path / "c"), progress=False, plot=False, num_devices=1)
    trainer = Trainer(jm, optax.sgd(0.05), loss_fn=mse(1), config=cfg)
    state = trainer.fit([(x.numpy(), y.numpy())] * 5)
    got = bridge.tree.flatten(state.params)
    for name, p in ref.named_parameters():
        np.testing.assert_allclose(np.asarray(got[name]), p.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_frozen_parameters_stay_put_and_hold_no_optimizer_state(tmp_path):
    """requires_grad=False layers are not trained, not weight-decayed and get no Adam moments, as with
    torch.optim.AdamW (which skips parameters without a gradient); the rest follows torch step for step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    model[0].requires_grad_(False)
    x, y = torch.randn(16, 8), torch.randn(16, 2)
    jm = bridge.convert(model, (x,))
    cfg = TrainConfig(steps=5, run_dir=str(tmp_path / "f"), progress=False, plot=False, num_devices=1)
    trainer = Trainer(jm, optax.adamw(1e-2, weight_decay=0.1), loss_fn=mse(1), config=cfg)
    state = trainer.fit([(x.numpy(), y.numpy())] * 5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("0.")}
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    got = bridge.tree.flatten(state.params)
    for name, p in model.named_parameters():
        want = frozen[name] if name in frozen else p.detach()
        np.testing.assert_allclose(np.asarray(got[name]), want.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    n_state = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert n_state == 2 * sum(p.numel() for p in model[2].parameters()) + 1     # mu, nu of layer 2 + count


def test_resuming_with_another_configuration_names_the_checkpoint(tmp_path):
    """A run dir whose checkpoint was written for another optimizer state (here: a layer frozen since)
    fails with a CheckpointError naming the step and the first difference, not orbax's tree diff alone."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x, y = torch.randn(16, 8), torch.randn(16, 2)
    cfg = dict(run_dir=str(tmp_path / "r"), progress=False, plot=False, num_devices=1, checkpoint_every=1)
    batches = [(x.numpy(), y.numpy())] * 3
    Trainer(bridge.convert(model, (x,)), optax.adamw(1e-2), loss_fn=mse(1), config=TrainConfig(steps=2, **cfg)).fit(batches)
    model[0].requires_grad_(False)
    trainer = Trainer(bridge.convert(model, (x,)), optax.adamw(1e-2), loss_fn=mse(1), config=TrainConfig(steps=3, **cfg))
    with pytest.raises(CheckpointError, match=r"checkpoints/2: this checkpoint does not fit the run .*: the "
                                              r"checkpoint has 'opt_state\.0\.count', the run does not"):
        trainer.fit(batches)


def test_ragged_last_batch_is_skipped_and_resume_keeps_the_data_position(tmp_path):
    """A DataLoader's short last batch cannot split over 8 data shards: it is skipped with a warning
    (not a sharding error mid-run), and the checkpoint's data position counts it, so a resumed run
    reads exactly the batches an uninterrupted one reads."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x, y = torch.randn(21, 8), torch.randn(21, 2)
    epochs = lambda: itertools.chain.from_iterable(   # noqa: E731  three epochs of 8, 8, 5 rows
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8) for _ in range(3))

    def run(name, steps):
        cfg = TrainConfig(steps=steps, run_dir=str(tmp_path / name), progress=False, plot=False, mesh={"data": 8},
                          checkpoint_every=0)
        trainer = Trainer(bridge.convert(model, (x[:8],), dynamic="batch"), optax.sgd(0.1), loss_fn=mse(1),
                          config=cfg)
        return trainer.fit(epochs())

    with pytest.warns(UserWarning, match="step 3: skipped a batch whose rows do not divide into 8"):
        full = run("full", 5)
    run("resumed", 3)
    resumed = run("resumed", 5)                       # restarts from step 3's checkpoint
    assert _losses(tmp_path / "full") == _losses(tmp_path / "resumed")
    assert len(_losses(tmp_path / "full")) == 5
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _PackedRegressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.GRU(3, 8, batch_first=True)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, packed):
        _, h = self.rnn(packed)
        return self.head(h[-1])


def test_packed_sequence_batches_train_as_torch_does(tmp_path):
    """A DataLoader-style batch holding a PackedSequence (a collate function packs it) trains: the trainer takes it
    as its padded batch and lengths; SGD steps match torch's on the same batches."""
    from torch.nn.utils.rnn import pack_sequence
    torch.manual_seed(0)
    model = _PackedRegressor()
    g = torch.Generator().manual_seed(1)

    def batch(i):
        seqs = [torch.randn(int(n), 3, generator=g) for n in torch.randint(1, 7, (8,), generator=g)]
        return {"packed": pack_sequence(seqs, enforce_sorted=False), "target": torch.randn(8, 2, generator=g)}

    batches = [batch(i) for i in range(3)]
    jm = bridge.convert(model, (batches[0]["packed"],), dynamic="batch+seq")
    trainer = Trainer(jm, optax.sgd(0.1), loss_fn=mse(),   # the batch names forward's argument: no inputs_fn
                      config=TrainConfig(steps=3, run_dir=str(tmp_path), progress=False, plot=False))
    state = trainer.fit(batches)
    trainer.close()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for b in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(b["packed"]), b["target"]).backward()
        opt.step()
    trained = bridge.to_state_dict(trainer.export_model(state))
    for name, p in model.named_parameters():
        np.testing.assert_allclose(trained[name].numpy(), p.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_batches_to_host_keep_python_lists_whole_and_place_packed_sequences():
    """A dict batch's nested Python lists are one array (as before PackedSequences were supported), a
    PackedSequence becomes its padded batch and lengths, and a top-level tuple stays a tuple of arrays."""
    from torch.nn.utils.rnn import pack_sequence

    from converters.packed import PackedInput
    from trainers.data import to_host
    packed = pack_sequence([torch.ones(3, 2), torch.ones(1, 2)])
    host = to_host({"input_ids": [[1, 2, 3], [4, 5, 6]], "packed": packed})
    np.testing.assert_array_equal(host["input_ids"], np.array([[1, 2, 3], [4, 5, 6]], np.int32))
    assert isinstance(host["packed"], PackedInput)
    assert host["packed"].padded.shape == (2, 3, 2)
    np.testing.assert_array_equal(host["packed"].lengths, [3, 1])
    pair = to_host((np.zeros((2, 3)), [[1], [2]]))
    assert isinstance(pair, tuple) and pair[1].shape == (2, 1)


@pytest.mark.parametrize("setting,fault", [
    ({"nan_policy": "Skip"}, "nan_policy='Skip'"), ({"steps": "3"}, "steps='3': expected an integer"),
    ({"remat": "yes"}, "remat='yes'"), ({"compute_dtype": "bf16"}, "compute_dtype='bf16'"),
    ({"mesh": {"data": 0}}, "mesh={'data': 0}"), ({"ema_decay": 1.5}, "ema_decay=1.5"),
    ({"grad_accum": 0}, "grad_accum=0"), ({"progress": "no"}, "progress='no'"),
])
def test_config_settings_are_checked_where_given(setting, fault):
    """A typo must not run as a default ("Skip" as neither policy) nor fail steps later."""
    with pytest.raises(ValueError, match=re.escape(fault)):
        TrainConfig(**setting)
    assert TrainConfig(compute_dtype=jnp.bfloat16, mesh={"fsdp": -1}, loss_scale=128.0).compute_dtype == "bfloat16"

"""ExportedPrograms (in memory and .pt2 files) as convert's input, and .pt2 as an export target: outputs and
gradients against torch, tied weights, frozen parameters, train-mode programs, the round trip's bytes."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import bridge
from bridge.errors import CaptureError, CheckpointError, ExportError
from bridge.tree import flatten
from converters.programs import reference_module
from tests.conftest import GRAD_TOL, assert_close, rel_err


class TiedLM(torch.nn.Module):
    """Tied embedding/head, a frozen parameter, a non-persistent buffer, a lifted constant, BatchNorm
    statistics and a Python-valued input: everything a program carries besides its ops."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 8)
        self.head = torch.nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight
        self.bn = torch.nn.BatchNorm1d(8)
        self.bn.weight.requires_grad_(False)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, 8), persistent=False)
        self.drop = torch.nn.Dropout(0.25)

    def forward(self, ids, scale=2.0):
        h = self.emb(ids) * self.gain + torch.tensor([0.25, -0.5]).sum()
        h = self.bn(h.transpose(1, 2)).transpose(1, 2)
        return {"logits": self.head(self.drop(torch.tanh(h))) * scale}


def _randomized(model):
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    return model


def _program(model, train, ids, path=None):
    model.train(train)
    ep = torch.export.export(model, (ids,), {"scale": 3.0}, dynamic_shapes=({0: torch.export.Dim("B")}, None))
    if path is None:
        return ep
    torch.export.save(ep, path)
    return torch.export.load(path)


@pytest.fixture(params=["in_memory", "pt2_file"])
def program(request, tmp_path):
    model = _randomized(TiedLM())
    ids = torch.randint(0, 11, (4, 6))
    path = tmp_path / "model.pt2" if request.param == "pt2_file" else None
    return model, _program(model, False, ids, path)


def test_forward_and_gradients_match_torch(program):
    model, ep = program
    jm = bridge.convert(ep)   # the program's own example inputs
    assert jm.meta.aliases["head.weight"] == "emb.weight" and jm.meta.frozen == {"bn.weight"}
    ids = torch.randint(0, 11, (3, 6))          # another batch size: the program's dynamic dim
    ref = model.eval()(ids, scale=3.0)["logits"]
    assert_close(np.asarray(jm(ids)["logits"]), ref, what="logits")
    w = torch.randn(ref.shape)
    g = flatten(jax.grad(lambda p: (jm.apply(p, ids.numpy())["logits"] * w.numpy()).sum())(jm.params))
    model.zero_grad()
    (model(ids, scale=3.0)["logits"] * w).sum().backward()
    for name, p in model.named_parameters():   # tied: emb.weight's gradient holds the head's part too
        if p.requires_grad:
            assert rel_err(g[name], p.grad) <= GRAD_TOL, name
    assert float(np.abs(g["bn.weight"]).max()) == 0.0   # requires_grad=False: no gradient, as in torch


def test_the_program_runs_as_exported(program):
    """The Python value baked in (scale=3.0) is the call's default; another raises."""
    model, ep = program
    jm = bridge.convert(ep)
    ids = torch.randint(0, 11, (2, 6))
    assert_close(np.asarray(jm(ids, scale=3.0)["logits"]), model.eval()(ids, scale=3.0)["logits"])
    with pytest.raises(Exception, match="scale"):
        jm(ids, scale=1.0)


def test_train_mode_program_updates_statistics_and_draws_dropout(tmp_path):
    model = _randomized(TiedLM())
    ids = torch.randint(0, 11, (4, 6))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    jm = bridge.convert(_program(model, True, ids, tmp_path / "train.pt2"))
    model.load_state_dict(before)   # exporting ran forward in train mode once
    assert jm.needs_rng and jm.mutates_buffers
    _, buffers = jm.apply(jm.params, ids.numpy(), rng=jax.random.key(0), return_buffers=True)
    model.train()(ids, scale=3.0)
    new = flatten(buffers)
    for name in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert_close(np.asarray(new[name]), getattr(model.bn, name.split(".")[1]), what=name)
    draw = lambda k: np.asarray(jm.apply(jm.params, ids.numpy(), rng=jax.random.key(k))["logits"])  # noqa: E731
    assert np.array_equal(draw(1), draw(1)) and not np.allclose(draw(1), draw(2))   # dropout draws from rng


def test_trained_weights_export_as_a_program_torch_runs(program, tmp_path):
    model, ep = program
    jm = bridge.convert(ep)
    ids = torch.randint(0, 11, (4, 6))
    g = jax.grad(lambda p: jm.apply(p, ids.numpy())["logits"].std())(jm.params)
    trained = jm.replace(params=jax.tree.map(lambda p, d: p - 0.5 * d, jm.params, g))
    out = bridge.export(trained, tmp_path / "trained.pt2")
    back = torch.export.load(out)
    sd = bridge.to_state_dict(trained)
    assert list(back.state_dict) == list(sd)
    assert all(torch.equal(back.state_dict[k], sd[k]) and back.state_dict[k].dtype == sd[k].dtype for k in sd)
    assert not torch.equal(sd["emb.weight"], model.state_dict()["emb.weight"])   # it did train
    assert back.state_dict["head.weight"].data_ptr() == back.state_dict["emb.weight"].data_ptr()   # still tied
    assert not back.state_dict["bn.weight"].requires_grad
    x = torch.randint(0, 11, (5, 6))
    assert_close(np.asarray(trained(x)["logits"]), back.module()(x, scale=3.0)["logits"], what="torch program")
    loaded = flatten(bridge.load_weights(out))   # .pt2 also reads as a checkpoint
    assert all(np.array_equal(np.asarray(loaded[k]), sd[k].numpy()) for k in sd)


def test_reference_module_ties_what_the_file_untied(tmp_path):
    model = TiedLM()
    ep = _program(model, False, torch.randint(0, 11, (2, 6)), tmp_path / "m.pt2")
    ref = reference_module(ep)
    assert ref.get_parameter("head.weight") is ref.get_parameter("emb.weight")


def test_errors_name_what_is_wrong(program, tmp_path):
    model, ep = program
    with pytest.raises(CaptureError, match="shapes were fixed when it was exported"):
        bridge.convert(ep, dynamic="batch")
    with pytest.raises(CaptureError, match="mode was fixed when it was exported"):
        bridge.convert(ep, train=True)
    with pytest.raises(CaptureError, match="compute_dtype needs the torch module"):
        bridge.convert(ep, compute_dtype=torch.bfloat16)
    jm = bridge.convert(ep)
    with pytest.raises(ExportError, match="keeps its own dtypes"):
        bridge.export(jm, tmp_path / "x.pt2", dtype="bfloat16")
    with pytest.raises(ExportError, match="export a JaxModule"):
        bridge.export(jm.params, tmp_path / "w.pt2")
    assert not (tmp_path / "w.pt2").exists()
    bad = tmp_path / "broken.pt2"
    bad.write_bytes(b"PK\x03\x04 not a program")
    with pytest.raises(CheckpointError, match="broken.pt2: not a readable torch.export program"):
        bridge.load_weights(bad)


def test_a_pt2_path_converts_and_builtin_input_names_survive(tmp_path):
    """`bridge.convert("model.pt2")`; nn.Linear names its input `input`, a name copying a graph renames."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GELU(), torch.nn.Linear(4, 2))
    x = torch.randn(5, 3)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "mlp.pt2")
    jm = bridge.convert(str(tmp_path / "mlp.pt2"))
    assert_close(np.asarray(jm(x)), model(x), what="mlp")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(CaptureError, match="weights.pt: not a torch.export program"):
        bridge.convert(tmp_path / "weights.pt")
    with pytest.raises(CaptureError, match="missing.pt2: no such file"):
        bridge.convert(tmp_path / "missing.pt2")
    with pytest.raises(CaptureError, match="not OrderedDict"):
        bridge.convert(model.state_dict())


def test_a_mixed_precision_model_exports_its_bf16_program(tmp_path):
    """convert(compute_dtype=bfloat16) keeps fp32 master weights; the program it writes runs in bf16, so the
    weights go in cast to bf16 (torch's rounding) and torch's run of it matches JAX's."""
    model = _randomized(TiedLM()).eval()
    ids = torch.randint(0, 11, (4, 6))
    jm = bridge.convert(model, (ids,), {"scale": 3.0}, compute_dtype=torch.bfloat16)
    back = torch.export.load(bridge.export(jm, tmp_path / "bf16.pt2"))
    assert back.state_dict["emb.weight"].dtype == torch.bfloat16
    assert torch.equal(back.state_dict["emb.weight"], model.emb.weight.detach().bfloat16())
    assert_close(np.asarray(jm(ids)["logits"]).astype(np.float32),
                 back.module()(ids, scale=3.0)["logits"].float(), dtype="bfloat16", what="bf16 program")

"""Checks on tensor values inside forward (`if ...: raise`, `assert`, torch's own GaussianNLLLoss check) are
assumed and named; values that decide real computation are still refused with their source line."""
from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bridge
from bridge.errors import CaptureError
from bridge.tree import flatten
from tests.conftest import GRAD_TOL, assert_close, rel_err


class Checked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mean, self.log_var = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)

    def forward(self, x, target):
        if (target.abs() > 1e3).any():
            raise ValueError("target out of range")
        elif x.isnan().any():
            warnings.warn("NaN input")
            raise ValueError("NaN input")
        assert torch.isfinite(x).all(), "bad x"
        var = F.softplus(self.log_var(x)) + 1e-3
        return F.gaussian_nll_loss(self.mean(x), target, var)   # torch checks torch.any(var < 0) in Python


class Branchy(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return -x


def test_checks_are_assumed_and_named():
    model, x, t = Checked(), torch.randn(5, 4), torch.randn(5, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jm = bridge.convert(model, (x, t), dynamic="batch")
    text = "\n".join(str(w.message) for w in caught)
    for line in ("if (target.abs() > 1e3).any():", "elif x.isnan().any():", 'assert torch.isfinite(x).all(), "bad x"',
                 "torch/nn/functional.py"):
        assert line in text, line
    x2, t2 = torch.randn(7, 4), torch.randn(7, 3) * 3   # other values; the checks pass in torch too
    assert_close(np.asarray(jm(x2, t2)), model(x2, t2), what="loss")
    g = flatten(jax.grad(lambda p: jm.apply(p, x2.numpy(), t2.numpy()))(jm.params))
    model(x2, t2).backward()
    for name, p in model.named_parameters():
        assert rel_err(g[name], p.grad) <= GRAD_TOL, name
    # bad input no longer raises (nothing can under jit): the value is computed as it comes
    assert np.isfinite(np.asarray(jm(x2, t2 * 1e4)))


class ExpertLoop(torch.nn.Module):
    """Mixtral's expert loop as transformers 4.x wrote it at first: experts with no tokens are skipped."""

    def __init__(self, stop=False, hits=False, experts=4, hidden=6):
        super().__init__()
        self.router = torch.nn.Linear(hidden, experts)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(experts))
        self.stop, self.hits = stop, hits

    def forward(self, x):
        weights, chosen = self.router(x).softmax(-1).topk(2, dim=-1)
        expert_mask = F.one_hot(chosen, len(self.experts)).permute(2, 1, 0)
        out = torch.zeros_like(x)
        if self.hits:   # transformers 4.5x: only the experts hit (a trip count read from a tensor)
            for e in (expert_mask.sum((1, 2)) > 0).nonzero():
                slot, tok = torch.where(expert_mask[e[0]])
                out.index_add_(0, tok, self.experts[int(e[0])](x[tok]) * weights[tok, slot, None])
            return out
        for e, expert in enumerate(self.experts):
            slot, tok = torch.where(expert_mask[e])
            if self.stop and tok.shape[0] == 0:
                break
            if tok.shape[0] == 0:
                continue
            out.index_add_(0, tok, expert(x[tok]) * weights[tok, slot, None])
        return out


def test_loops_skipping_empty_selections_are_assumed_and_named():
    """`if tok.shape[0] == 0: continue` only skips an expert without tokens; its rows write nothing, so the
    loop runs on for every expert, any routing (an expert with no tokens included)."""
    torch.manual_seed(0)
    model, x = ExpertLoop(), torch.randn(9, 6)
    with torch.no_grad():
        model.router.bias[3] = -1e3   # expert 3 gets no token
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jm = bridge.convert(model, (x,), dynamic="batch")
    text = "\n".join(str(w.message) for w in caught)
    assert "if tok.shape[0] == 0:  (assumed not empty" in text, text
    x2 = torch.randn(5, 6)
    assert_close(np.asarray(jm(x2)), model(x2), what="moe")
    g = flatten(jax.grad(lambda p: jm.apply(p, x2.numpy()).sum())(jm.params))
    model(x2).sum().backward()
    for name, p in model.named_parameters():
        assert rel_err(g[name], p.grad if p.grad is not None else torch.zeros_like(p)) <= GRAD_TOL, name


@pytest.mark.parametrize("module, args, where", [
    (Branchy(), (torch.randn(3, 4),), "if x.sum() > 0:"),
    (ExpertLoop(stop=True), (torch.randn(9, 6),), "if self.stop and tok.shape[0] == 0:"),
    (ExpertLoop(hits=True), (torch.randn(9, 6),), "nonzero():\nhint: the loop's trip count is read from a tensor"),
    (torch.nn.BatchNorm1d(3, momentum=None), (torch.randn(4, 3),), "torch/nn/modules/batchnorm.py:"),
])
def test_values_that_decide_computation_are_refused(module, args, where):
    with pytest.raises(CaptureError) as e:
        bridge.convert(module, args, train=isinstance(module, torch.nn.BatchNorm1d))
    msg = str(e.value)
    assert "decides more than a check that raises, at" in msg and where in msg, msg


def test_failed_attempts_print_no_partial_graphs(capfd):
    """Strict and non-strict attempts that fail on a check are expected; torch's dump of their partial graph
    stays out of the user's stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge.convert(Checked(), (torch.randn(5, 4), torch.randn(5, 3)))
    err = capfd.readouterr().err
    assert "GraphModule" not in err and "def forward" not in err, err[:500]

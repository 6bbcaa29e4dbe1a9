"""Rows selected by a boolean mask (`x[mask]`, masked_select) convert and run under jax.jit: forward values and
gradients match torch for masks other than the example's, including the count where it is used as a number."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import torch
import torch.nn.functional as F

import bridge
from bridge.errors import LoweringError
from bridge.tree import flatten
from tests.conftest import GRAD_TOL, assert_close, rel_err

B, S, H, C = 3, 5, 8, 4


class Net(torch.nn.Module):
    """A small encoder; `head` decides what is done with the rows the mask selects."""

    def __init__(self, head):
        super().__init__()
        self.emb = torch.nn.Embedding(16, H)
        self.adapter = torch.nn.Sequential(torch.nn.Linear(H, H), torch.nn.Tanh(), torch.nn.Linear(H, H))
        self.cls = torch.nn.Linear(H, C)
        self.head = head

    def forward(self, ids, mask, labels):
        return self.head(self, self.emb(ids), mask, labels)


def token_loss(m, h, mask, labels):     # HF token classification: active positions only
    logits = m.cls(h).view(-1, C)
    active = mask.view(-1)
    return F.cross_entropy(logits[active], labels.view(-1)[active])


def bce_loss(m, h, mask, labels):      # ELECTRA / Funnel pre-training: BCE over attended positions
    logits = m.cls(h)[..., 0]
    return F.binary_cross_entropy_with_logits(logits[mask], (labels[mask] > 1).float())


def adapter_rows(m, h, mask, labels):   # X-MOD: per-group adapters written back with out[mask] = rows
    out = torch.zeros_like(h)
    out[mask[:, 0]] = m.adapter(h[mask[:, 0]])
    return m.cls(out + h).sum(-1)


def adapter_tokens(m, h, mask, labels):   # a (B, S) mask over (B, S, H), accumulated
    out = h.clone()
    out.index_put_((mask,), m.adapter(h[mask]), accumulate=True)
    return out


def select_mean(m, h, mask, labels):    # masked_select, mean over what it picked
    return torch.masked_select(m.cls(h), mask[..., None]).mean()


def count_divides(m, h, mask, labels):   # the count where it is a number; also returned
    rows = m.cls(h)[mask]
    return (rows ** 2).sum() / rows.shape[0], rows.shape[0] * 1.0, rows.amax(0), torch.logsumexp(rows, 0)


def over_rows(m, h, mask, labels):      # softmax and cumsum along the selected rows, reduced after
    rows = m.cls(h)[mask]
    return (torch.softmax(rows, 0) * rows).sum(0), torch.cumsum(rows, 0).prod(-1).sum()


def gram(m, h, mask, labels):           # rows in both operands of a contraction
    rows = m.adapter(h[mask])
    return rows.T @ rows


def where_coordinates(m, h, mask, labels):   # torch.where(mask) / nonzero: coordinates of the picked rows
    b, s = torch.where(mask)
    rows = m.cls(h[b, s]) * (s[:, None] + 1)
    out = torch.zeros(B, S, C)
    out[mask] = rows
    return out, m.emb.weight[mask.nonzero()[:, 1]].sum(0)


def moe_index_add(m, h, mask, labels):   # Mixtral's expert loop (transformers 4.x): rows per expert, index_add_
    x = h.reshape(-1, H)
    weights, chosen = torch.softmax(m.cls(x), -1).topk(2, dim=-1)
    expert_mask = F.one_hot(chosen, C).permute(2, 1, 0)
    out = torch.zeros_like(x)
    for e in range(C):
        slot, tok = torch.where(expert_mask[e])
        rows = m.adapter(x[None, tok].reshape(-1, H)) * (e + 1) * weights[tok, slot, None]
        out.index_add_(0, tok, rows)
    return out


def moe_tensor_loop(m, h, mask, labels):   # the expert loop over a tensor: `for e in torch.arange(E)[:, None]`
    x = h.reshape(-1, H)
    weights, chosen = torch.softmax(m.cls(x), -1).topk(2, dim=-1)
    expert_mask = F.one_hot(chosen, C).permute(2, 1, 0)
    out = torch.zeros_like(x)
    for e in torch.arange(C)[:, None]:
        e = e[0]
        slot, tok = torch.where(expert_mask[e])
        out.index_add_(0, tok, m.adapter(x[tok]) * (e + 1) * weights[tok, slot, None] + x.narrow(0, e, 1))
    return out


def writes_at_row_indices(m, h, mask, labels):   # scatter_add / index_copy / index_put at the rows' coordinates
    b, s = torch.where(mask)
    rows = m.cls(h[b, s])
    flat = b * S + s
    added = torch.zeros(B * S, C).scatter_add(0, flat[:, None].expand(-1, C), rows)
    copied = m.cls(h).reshape(-1, C).index_copy(0, flat, rows.tanh())
    put = m.cls(h).clone()
    put[b, s] = rows.sin()
    acc = m.cls(h).index_put((b, s), rows.exp(), accumulate=True)
    return added, copied, put, acc


def numbered_rows(m, h, mask, labels):   # Idefics2: the real images numbered by position, arange(count)
    rows = m.cls(h[mask])
    pos = torch.arange(rows.shape[0])
    return (rows * (pos[:, None] + 1)).sum(0), torch.arange(0, rows.shape[0], dtype=torch.float32).sum()


def scatter_into_other_mask(m, h, mask, labels):   # Qwen2-Audio: rows fill another mask's slots, count checked
    rows = m.adapter(h[mask])
    slots = mask.flip(-1)
    torch._check(slots.sum().item() == rows.shape[0])
    return h.masked_scatter(slots[..., None], rows)


def rows_indexed_by_rank(m, h, mask, labels):   # transformers' mask builder over Idefics2's real images
    rows = m.adapter(h[mask])
    picked = rows[torch.arange(rows.shape[0])[:, None], torch.arange(H)[None, :]]
    return (picked * 2).sum(0), rows[torch.tensor([0, -1])]   # ranks: the first and the last selected row


def grouped_experts(m, h, mask, labels):   # JetMoE: tokens sorted by expert, split by counts, cat back
    x = h.reshape(-1, H)
    chosen = m.cls(x).argmax(-1)
    order = chosen.argsort(stable=True)
    pieces = x[order].split(F.one_hot(chosen, C).sum(0).tolist())
    out = torch.cat([m.adapter(p) * (e + 1) + p.sum(0) for e, p in enumerate(pieces)])   # a sum over each group
    return torch.zeros_like(x).index_add(0, order, out)


HEADS = [token_loss, bce_loss, adapter_rows, adapter_tokens, select_mean, count_divides, over_rows, gram,
         where_coordinates, moe_index_add, moe_tensor_loop, writes_at_row_indices, numbered_rows,
         scatter_into_other_mask, rows_indexed_by_rank, grouped_experts]


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, S, generator=g) > 0.5
    mask[0, 0] = True   # at least one row (torch's mean of nothing is NaN)
    return torch.randint(0, 16, (B, S), generator=g), mask, torch.randint(0, C, (B, S), generator=g)


def _jax(args):
    return [jnp.asarray(a.numpy()) for a in args]


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.__name__)
def test_forward_and_gradients_match_torch_for_other_masks(head):
    torch.manual_seed(0)
    model = Net(head)
    jm = bridge.convert(model, _inputs(0))
    run = jax.jit(jm.apply)
    for seed in (1, 2):   # other masks than the example's: other counts
        args = _inputs(seed)
        ref = model(*args)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = run(jm.params, *_jax(args))
        got = got if isinstance(got, tuple) else (got,)
        for g, r in zip(got, ref):
            assert_close(g, r.detach() if isinstance(r, torch.Tensor) else torch.tensor(r), what=head.__name__)

    args = _inputs(3)
    model.zero_grad()
    out = model(*args)
    sum(o.sum() for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor)).backward()

    def loss(params):
        out = jm.apply(params, *_jax(args))
        return sum(jnp.sum(o) for o in (out if isinstance(out, tuple) else (out,)))

    grads = flatten(jax.jit(jax.grad(loss))(jm.params))
    for name, p in model.named_parameters():
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        assert rel_err(grads[name], ref) <= GRAD_TOL, (head.__name__, name)


def test_outside_jit_rows_are_torchs():
    """A concrete mask (eager) selects as torch does: the rows themselves can be returned."""
    def rows(m, h, mask, labels):
        return m.cls(h)[mask].sort(0).values
    model = Net(rows)
    jm = bridge.convert(model, _inputs(0))
    args = _inputs(1)
    assert_close(jm.apply(jm.params, *_jax(args)), model(*args).detach())


def test_returned_rows_under_jit_come_first_then_zeros():
    """jnp.nonzero(size=...)'s convention: all N rows, the selected ones in order, then zeros; also after a
    reshape that flattens each row (rows repeated k times) and for the pieces of a split by per-sample counts."""
    def rows(m, h, mask, labels):
        picked = m.cls(h)[mask]
        return picked, picked.reshape(-1), picked.split(mask.sum(1).tolist())
    model = Net(rows)
    jm = bridge.convert(model, _inputs(0))
    args = _inputs(1)
    ref = model(*args)
    with pytest.warns(UserWarning, match="the selected ones first, zeros after"):
        got = jax.jit(jm.apply)(jm.params, *_jax(args))
    n = ref[0].shape[0]
    for g, r, total in [(got[0], ref[0], B * S), (got[1], ref[1], B * S * C)]:
        assert g.shape[0] == total
        assert_close(g[:r.shape[0]], r.detach())
        assert float(jnp.abs(g[r.shape[0]:]).max()) == 0.0
    assert len(got[2]) == B and n == sum(p.shape[0] for p in ref[2])
    for g, r in zip(got[2], ref[2]):   # each piece: N rows, its own first
        assert g.shape[0] == B * S
        assert_close(g[:r.shape[0]], r.detach())
        assert float(jnp.abs(g[r.shape[0]:]).max()) == 0.0


@pytest.mark.parametrize("what, head", [
    ("along their dim", lambda m, h, mask, labels: m.cls(h)[mask].sort(0).values.sum()),
    ("along their dim", lambda m, h, mask, labels: m.cls(h)[mask][:2].sum()),
    ("across other dims", lambda m, h, mask, labels: m.cls(h)[mask].T.reshape(-1).sum()),
])
def test_what_depends_on_row_positions_fails_under_jit_naming_the_line(what, head):
    model = Net(head)
    jm = bridge.convert(model, _inputs(0))
    with pytest.raises(LoweringError, match=what) as e:
        jax.jit(jm.apply)(jm.params, *_jax(_inputs(1)))
    assert "test_selected_rows.py" in str(e.value)


def test_rows_passed_into_a_custom_function_are_refused_under_jit():
    """A Function's forward could reduce the rows (its own graph sees N rows, not the selected ones)."""
    class Mean(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.mean(0)

        @staticmethod
        def backward(ctx, g):
            return g.expand(3, -1) / 3

    model = Net(lambda m, h, mask, labels: Mean.apply(m.cls(h)[mask]))
    jm = bridge.convert(model, _inputs(0))
    with pytest.raises(LoweringError, match="an op bridge does not see into"):
        jax.jit(jm.apply)(jm.params, *_jax(_inputs(1)))


class PinnedCount(torch.nn.Module):
    """HF's placeholder check (granite_speech, voxtral): `torch._check` that a mask selects as many values as
    there are features fixes the selection's size, which torch.export then records as a static size."""

    def __init__(self, numel_check: bool):
        super().__init__()
        self.lin = torch.nn.Linear(H, H)
        self.numel_check = numel_check

    def forward(self, x, ids, feats):
        mask = (ids == 7).unsqueeze(-1).expand_as(x)
        if self.numel_check:   # (with a dynamic batch, torch's value ranges trip over this one's bound)
            torch._check(x[mask].numel() == feats.numel())
        rows = x[ids == 7]
        torch._check(rows.shape[0] == feats.shape[0] * feats.shape[1])
        return self.lin(x.masked_scatter(mask, feats)), (self.lin(rows) * feats.reshape(rows.shape)).sum(0)


def _pinned_inputs(b, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 7, (b, S), generator=g)
    ids[torch.arange(b), torch.randint(0, S - 1, (b,), generator=g)] = 7   # 2 placeholders per row, moving
    ids[:, S - 1] = 7
    return torch.randn(b, S, H, generator=g), ids, torch.randn(b, 2, H, generator=g)


@pytest.mark.parametrize("dynamic", [None, "batch"])
def test_a_count_a_check_pins_selects_at_that_size_under_jit(dynamic):
    torch.manual_seed(0)
    model = PinnedCount(numel_check=dynamic is None)
    jm = bridge.convert(model, _pinned_inputs(2, 0), dynamic=dynamic)
    args = _pinned_inputs(3 if dynamic else 2, 1)   # other placeholder positions (and batch) than the example's
    ref = model(*args)
    got = jax.jit(jm.apply)(jm.params, *_jax(args))
    for g, r in zip(got, ref):
        assert_close(g, r.detach())
    sum(r.sum() for r in ref).backward()
    grads = flatten(jax.jit(jax.grad(lambda p: sum(jnp.sum(o) for o in jm.apply(p, *_jax(args)))))(jm.params))
    for name, p in model.named_parameters():
        assert rel_err(grads[name], p.grad) <= GRAD_TOL, name

"""Capture: strict with non-strict fallback, dynamic presets, Hugging Face conventions, input checks."""
from __future__ import annotations

import collections
import dataclasses
import functools
import types
import typing
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import bridge
from bridge.errors import CaptureError, InputError
from bridge.tree import flatten
from converters.dtypes import to_jax
from tests.conftest import GRAD_TOL, assert_close, rel_err
from tests.models import MODELS


class NeedsNonStrict(torch.nn.Module):
    """Calls numpy on a Python value mid-forward: dynamo (strict) refuses, non-strict traces it."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        import sys
        sys._getframe()  # noqa: strict export cannot trace frame introspection
        return self.lin(x)


def test_strict_falls_back_to_non_strict():
    jm = bridge.convert(NeedsNonStrict(), (torch.randn(2, 4),))
    assert jm.program.captured.strict is False
    jm2 = bridge.convert(NeedsNonStrict(), (torch.randn(2, 4),), strict=False)
    assert jm2.program.captured.strict is False


def test_dynamic_batch_one_example_is_refused_clearly():
    with pytest.raises(CaptureError, match="'x' has size 1 in dim 0"):
        bridge.convert(MODELS["mlp"]().module, (torch.randn(1, 32),), dynamic="batch")


class SizeInMessage(torch.nn.Module):
    """Formats the batch size into a check's message (HF's torch_compilable_check): dynamo specializes it."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, images):
        n = images.shape[0] * images.shape[1]
        message = f"{n} image features for {x.shape[0]} rows"
        torch._check(x.shape[0] == images.shape[0], lambda: message)
        return self.lin(x) + images.mean((1, 2))[:, None]


class FixedBatch(SizeInMessage):
    def forward(self, x, images):
        return self.lin(x.reshape(2, 4)) + images.mean((1, 2))[:, None]


def test_dynamic_size_read_as_python_int_stays_dynamic():
    """Strict export fixes a size the code formats into a string; capture then keeps non-strict's symbolic one."""
    torch.manual_seed(0)
    m = SizeInMessage().eval()
    jm = bridge.convert(m, (torch.randn(2, 4), torch.randn(2, 3, 5)), dynamic="batch")
    x, images = torch.randn(5, 4), torch.randn(5, 3, 5)
    with torch.no_grad():
        ref = m(x, images)
    assert_close(jm(to_jax(x), to_jax(images)), ref, what="batch 5")


def test_dynamic_size_the_code_fixes_is_named():
    with pytest.warns(UserWarning, match=r"ties input 'x' dim 0 \(size 2\), input 'images' dim 0 \(size 2\)"):
        jm = bridge.convert(FixedBatch().eval(), (torch.randn(2, 4), torch.randn(2, 3, 5)), dynamic="batch")
    with pytest.raises(InputError, match="'x' dim 0: exported with static size 2, got 3"):
        jm(np.zeros((3, 4), np.float32), np.zeros((3, 3, 5), np.float32))


@pytest.mark.parametrize("ran_first", [False, True])
def test_hf_output_hooks_are_installed_before_strict_export(ran_first):
    """CLIPSeg's decoder reads the vision tower's hidden states through transformers' output hooks, which its
    first call installs under a lock strict export cannot trace; non-strict then fixed the batch (`len(ids)`).
    A model that ran already keeps its hooks as they are (installed again, each hidden state was recorded
    twice: the torch model itself then computed something else)."""
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    model = transformers.CLIPSegForImageSegmentation(transformers.CLIPSegConfig(
        text_config=text, vision_config=vision, projection_dim=16, reduce_dim=16, extract_layers=[1],
        decoder_num_attention_heads=2)).eval()

    def inputs(b):
        return {"input_ids": torch.randint(3, 64, (b, 7)), "pixel_values": torch.randn(b, 3, 32, 32)}
    kwargs = inputs(3)
    if ran_first:
        with torch.no_grad():
            before = model(**kwargs).logits
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    jm = bridge.convert(model, kwargs=inputs(2), dynamic="batch")
    assert jm.program.captured.strict
    if ran_first:
        assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
        with torch.no_grad():
            assert torch.equal(model(**kwargs).logits, before)
    with torch.no_grad():   # float64: the decoder's float32 logits are ill-conditioned (torch's own are 3e-5 off)
        ref = model.double()(**{k: v.double() if v.is_floating_point() else v for k, v in kwargs.items()})
    assert_close(jm(**{k: to_jax(v) for k, v in kwargs.items()})["logits"], ref.logits, what="batch 3")


class _Vocabulary:
    """A helper object whose table is a functools.cached_property, first computed inside forward (Chameleon)."""

    @functools.cached_property
    def table(self):
        return torch.arange(16).flip(0)


class _CachesATable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 4)
        self.vocabulary = _Vocabulary()

    def forward(self, ids):
        return self.emb(self.vocabulary.table[ids])


@pytest.mark.parametrize("strict", [None, False])   # (Python 3.11's cached_property takes a lock dynamo refuses)
def test_values_forward_caches_while_traced_do_not_stay_fake(strict):
    torch.manual_seed(0)
    model, ids = _CachesATable(), torch.randint(0, 16, (2, 5))
    jm = bridge.convert(model, (ids,), strict=strict)
    assert "table" not in vars(model.vocabulary)   # computed again, by torch, on the next call
    with torch.no_grad():
        ref = model(ids)
    assert type(ref) is torch.Tensor and type(model.vocabulary.table) is torch.Tensor
    assert_close(jm(to_jax(ids)), ref)


def test_static_shapes_give_named_input_errors():
    case = MODELS["mlp"]()
    jm = bridge.convert(case.module, (torch.randn(2, 32),))
    with pytest.raises(InputError, match="'x' dim 0: exported with static size 2, got 5"):
        jm(np.zeros((5, 32), np.float32))
    with pytest.raises(InputError, match="expected 1 positional input"):
        jm(np.zeros((2, 32), np.float32), np.zeros((2, 32), np.float32))


def test_hf_labels_loss_and_model_output_dict():
    torch.manual_seed(0)
    case = MODELS["gpt2"]()
    model = case.module.eval()
    ids = torch.randint(0, 128, (2, 8))
    jm = bridge.convert(model, kwargs={"input_ids": ids, "labels": ids}, dynamic="batch+seq")
    assert jm.program.captured.extra_kwargs == {"use_cache": False}
    ids2 = torch.randint(0, 128, (3, 10))
    out = jax.jit(jm.apply)(jm.params, input_ids=to_jax(ids2), labels=to_jax(ids2))
    assert isinstance(out, dict) and set(out) == {"loss", "logits"}
    with torch.no_grad():
        ref = model(input_ids=ids2, labels=ids2)
    assert_close(out["loss"], ref.loss, what="loss")
    assert_close(out["logits"], ref.logits, what="logits")
    with pytest.raises(InputError, match="unexpected keyword"):
        jm(input_ids=to_jax(ids2), labels=to_jax(ids2), attention_mask=to_jax(ids2))


def test_bert_sequence_classification_with_token_types():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).eval()
    kw = {"input_ids": torch.randint(0, 64, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
          "token_type_ids": torch.zeros(4, 6, dtype=torch.long), "labels": torch.tensor([0, 1, 2, 1])}
    kw["attention_mask"][1, 4:] = 0
    jm = bridge.convert(model, kwargs=kw)
    out = jm(**{k: to_jax(v) for k, v in kw.items()})
    with torch.no_grad():
        ref = model(**kw)
    assert_close(out["logits"], ref.logits, what="logits")
    assert_close(out["loss"], ref.loss, what="loss")


class _Cache:
    """Not a pytree: torch.export refuses it as an output."""


class CacheThroughKwargs(torch.nn.Module):
    """A Hugging Face forward that takes `use_cache` only through **kwargs and defaults it from the config."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(use_cache=True)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, **kwargs):
        use_cache = kwargs.get("use_cache", self.config.use_cache)
        return (self.lin(x), _Cache()) if use_cache else (self.lin(x),)


def test_hf_cache_off_through_the_config_when_forward_takes_kwargs():
    m = CacheThroughKwargs()
    x = torch.randn(3, 4)
    jm = bridge.convert(m, (x,), dynamic="batch")   # as a keyword, use_cache would trip torch's **kwargs spec
    assert m.config.use_cache is True and jm.program.captured.extra_kwargs == {}
    with torch.no_grad():
        assert_close(jm(to_jax(x))[0], m.lin(x), what="output")


class SizeThroughTensor(torch.nn.Module):
    """DeBERTa's attention span: a size made a tensor (`torch.tensor(min(T, 8))`), then a slice bound."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(16, 4))

    def forward(self, x):
        span = torch.tensor(min(x.size(1), 8))
        return x.sum(1) + self.table[8 - span: 8 + span].mean(0)


def test_size_arithmetic_through_tensors_stays_static_under_jit():
    m = SizeThroughTensor()
    jm = bridge.convert(m, (torch.randn(2, 4, 4),), dynamic="batch+seq", strict=False)
    x = torch.randn(3, 6, 4)
    with torch.no_grad():
        assert_close(jax.jit(jm.apply)(jm.params, to_jax(x)), m(x), what="output")


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g


class UsesAutogradFunction(torch.nn.Module):
    """Bloom's GeLU: an autograd.Function with an exact backward (strict export inlines it as a no-grad block)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return _Cube.apply(self.lin(x))


def test_autograd_function_gradients_flow():
    m = UsesAutogradFunction()
    x = torch.randn(3, 4)
    jm = bridge.convert(m, (x,), strict=True)
    m(x).sum().backward()
    grad = jax.grad(lambda p: jm.apply(p, to_jax(x)).sum())(jm.params)
    assert_close(grad["lin"]["weight"], m.lin.weight.grad, what="grad through the Function")


class BranchesOnValues(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_a_branch_on_tensor_values_names_the_line_and_the_rewrite():
    with pytest.raises(CaptureError, match=r"(?s)test_capture.py.*hint: a Python branch on tensor values.*torch.cond"):
        bridge.convert(BranchesOnValues(), (torch.randn(2, 3),))


@dataclasses.dataclass
class _Out:
    hidden: torch.Tensor
    aux: torch.Tensor | None = None
    extra: torch.Tensor | None = None


class _Pair(typing.NamedTuple):
    pos: torch.Tensor
    neg: torch.Tensor


class Containers(torch.nn.Module):
    """List and dict inputs; a user dataclass (one field None), a NamedTuple and nested dict/list outputs."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, xs: list, extra: dict):
        h = sum(self.lin(x) for x in xs) * extra["scale"]
        return _Out(h, aux=h.sum(-1)), _Pair(h, -h.tanh()), {"z": [h.exp(), (h[:, :2],)]}


def test_dataclass_namedtuple_and_nested_outputs_keep_their_structure():
    """A user's own @dataclass output (torch.export knows only registered pytrees) becomes a dict of its fields,
    a NamedTuple stays that NamedTuple, values equal torch's under jit and their gradients torch autograd's."""
    torch.manual_seed(0)
    model, xs, extra = Containers(), [torch.randn(2, 4), torch.randn(2, 4)], {"scale": torch.randn(2, 1)}
    jm = bridge.convert(model, (xs, extra))
    got = jax.jit(jm.apply)(jm.params, [to_jax(x) for x in xs], {"scale": to_jax(extra["scale"])})
    ref = model(xs, extra)
    assert set(got[0]) == {"hidden", "aux", "extra"} and got[0]["extra"] is None
    assert isinstance(got[1], _Pair) and isinstance(got[2]["z"], list) and isinstance(got[2]["z"][1], tuple)
    for g, r in [(got[0]["hidden"], ref[0].hidden), (got[0]["aux"], ref[0].aux), (got[1].neg, ref[1].neg),
                 (got[2]["z"][0], ref[2]["z"][0]), (got[2]["z"][1][0], ref[2]["z"][1][0])]:
        assert_close(g, r.detach())
    (ref[0].aux.sum() + ref[1].neg.sum()).backward()
    grad = jax.grad(lambda p: (lambda o: o[0]["aux"].sum() + o[1].neg.sum())(
        jm.apply(p, [to_jax(x) for x in xs], {"scale": to_jax(extra["scale"])})))(jm.params)
    assert_close(grad["lin"]["weight"], model.lin.weight.grad, what="weight grad")


class _Unsorted(torch.nn.Module):
    """Outputs whose keys are not in sorted order: a ModelOutput, a dataclass and a dict."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        seq2seq = transformers.modeling_outputs.Seq2SeqLMOutput(logits=h, encoder_last_hidden_state=h.tanh())
        return seq2seq, _Out(h.exp(), aux=h.sum(-1), extra=-h), {"z": h.cos(), "a": h.sin(), "m": h * 2}


@pytest.mark.parametrize("call", ["jm", "jit_apply"])
def test_output_mappings_keep_torch_key_order(call):
    """jax sorts a dict's keys when a jitted function returns it; outputs keep torch's order (a ModelOutput
    and a dataclass in field order, a dict in insertion order), so zipping `out.values()` with
    `ref.to_tuple()` pairs the same tensors."""
    torch.manual_seed(0)
    model, x = _Unsorted(), torch.randn(3, 4)
    jm = bridge.convert(model, (x,))
    got = jm(x) if call == "jm" else jax.jit(jm.apply)(jm.params, to_jax(x))
    ref = model(x)
    assert list(got[0]) == list(ref[0].keys()) == ["logits", "encoder_last_hidden_state"]
    assert list(got[1]) == ["hidden", "aux", "extra"] and list(got[2]) == ["z", "a", "m"]
    for g, r in zip(got[0].values(), ref[0].to_tuple()):
        assert_close(g, r.detach())
    for g, r in zip(got[2].values(), ref[2].values()):
        assert_close(g, r.detach())


class _SetLate(torch.nn.Module):
    """A ModelOutput whose fields are set out of field order (HF's get_image_features sets `pooler_output`
    after the hidden states were recorded): torch.export rebuilds it field by field while tracing and
    decomposing, so tensors came back under each other's keys."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        out = transformers.modeling_outputs.BaseModelOutputWithPooling(last_hidden_state=self.lin(x))
        out["hidden_states"] = (x + 1, x * 3)
        out.pooler_output = out.last_hidden_state.mean(1)
        return out


@pytest.mark.parametrize("strict", [True, False])
def test_model_output_fields_set_out_of_order_keep_their_tensors(strict):
    torch.manual_seed(0)
    model, x = _SetLate(), torch.randn(2, 3, 4)
    jm = bridge.convert(model, (x,), strict=strict, dynamic="batch")
    x = torch.randn(3, 3, 4)
    got, ref = jax.jit(jm.apply)(jm.params, to_jax(x)), model(x)
    assert set(got) == set(ref.keys())
    for key, value in ref.items():
        for g, r in zip(*(v if isinstance(v, tuple) else (v,) for v in (got[key], value))):
            assert_close(g, r.detach(), what=key)


def test_a_model_output_first_made_while_tracing_stays_a_model_output():
    """transformers registers a ModelOutput class as a pytree when the class is made, except while torch traces
    (a lazily imported `modeling_outputs` module first touched inside forward): capture registers it as
    transformers would, so building one eagerly afterwards does not fail as registered twice."""
    with mock.patch.object(torch.compiler, "is_compiling", lambda: True):
        @dataclasses.dataclass
        class LateOutput(transformers.utils.ModelOutput):
            zeta: torch.Tensor | None = None
            alpha: torch.Tensor | None = None

    class Late(torch.nn.Module):
        def forward(self, x):
            return LateOutput(zeta=x.exp(), alpha=x.sin())

    x = torch.randn(2, 3)
    jm = bridge.convert(Late(), (x,))
    out = jm(x)
    assert list(out) == ["zeta", "alpha"]
    assert_close(out["alpha"], x.sin())
    assert list(LateOutput(zeta=x, alpha=x).keys()) == ["zeta", "alpha"]   # eager, after capture: no error


class _ReadsABatch(torch.nn.Module):
    """Takes a tokenizer's BatchEncoding (a Mapping, not a dict), read by key and by attribute, as
    sentence-transformers models do."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 8)

    def forward(self, features):
        h = self.emb(features["input_ids"]) * features.attention_mask[..., None]
        return {"pooled": h.sum(1) / features.attention_mask.sum(1, keepdim=True)}


@pytest.mark.parametrize("mapping", ["BatchEncoding", "UserDict"])
def test_mapping_inputs_that_are_not_dicts(mapping):
    def batch(b, t):
        data = {"input_ids": torch.randint(0, 32, (b, t)), "attention_mask": torch.ones(b, t, dtype=torch.long)}
        data["attention_mask"][0, -2:] = 0
        return transformers.BatchEncoding(data) if mapping == "BatchEncoding" else collections.UserDict(data)

    model = _ReadsABatch()
    if mapping == "UserDict":   # no attribute access on a UserDict
        model.forward = lambda f: {"pooled": model.emb(f["input_ids"]).mean(1) * f["attention_mask"][:, :1]}
    jm = bridge.convert(model, (batch(2, 5),), dynamic="batch+seq")
    other = batch(3, 7)
    with torch.no_grad():
        ref = model(other)["pooled"]
    assert_close(jm(other)["pooled"], ref)
    assert_close(jax.jit(jm.apply)(jm.params, bridge.as_jax_inputs(other))["pooled"], ref)


class _Scriptable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 2)
        self.register_buffer("scale", torch.tensor([2.0, 0.5]))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        if h.shape[-1] > 1:             # scripting keeps the branch, tracing records the taken one
            h = h.mean(-1)
        return self.head(h) * self.scale


@pytest.mark.parametrize("how", ["script", "trace", "saved"])
def test_torchscript_modules_convert(how, tmp_path):
    """torch.jit.script / trace / a torch.jit.load'ed archive: converted through torch's TorchScript converter
    with the module's own names; forward and every parameter gradient equal the original module's."""
    torch.manual_seed(0)
    model, x = _Scriptable().eval(), torch.randn(5, 3, 7)
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    ts = torch.jit.trace(model, (x,)) if how == "trace" else torch.jit.script(model)
    if how == "saved":
        torch.jit.save(ts, tmp_path / "m.pt")
        ts = torch.jit.load(tmp_path / "m.pt")
    jm = bridge.convert(ts, (x,))
    assert sorted(flatten(jm.params)) == sorted(n for n, _ in model.named_parameters())
    assert_close(jax.jit(jm.apply)(jm.params, to_jax(x)), model(x).detach())
    model(x).square().sum().backward()
    grads = jax.grad(lambda p: jax.numpy.sum(jax.numpy.square(jm.apply(p, to_jax(x)))))(jm.params)
    for name, p in model.named_parameters():
        assert_close(flatten(grads)[name], p.grad, what=name)


class _PINN(torch.nn.Module):
    """A physics-informed net: forward returns u and du/dx through torch.autograd.grad."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def forward(self, x):
        u = self.net(x)
        return u, torch.autograd.grad(u.sum(), x, create_graph=True)[0]


def test_derivatives_inside_forward_point_to_jax_grad():
    """torch.autograd.grad in forward cannot be captured: the error says so, and the recipe it gives (convert the
    network, differentiate in JAX) reproduces torch's du/dx."""
    torch.manual_seed(0)
    model, x = _PINN(), torch.randn(5, 2, requires_grad=True)
    with pytest.raises(CaptureError, match="(?s)derivatives taken inside forward.*jax.grad"):
        bridge.convert(model, (x,))
    jm = bridge.convert(model.net, (x.detach(),))
    du = jax.grad(lambda xj: jm.apply(jm.params, xj).sum())(to_jax(x.detach()))
    assert_close(du, model(x)[1].detach(), what="du/dx")
    with pytest.raises(CaptureError, match="(?s)derivatives taken inside forward.*jacrev.*jax.grad"):
        bridge.convert(_JacobianPenalty(), (torch.randn(4, 2),))   # torch.func transforms: the same advice


class _JacobianPenalty(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))

    def forward(self, x):
        jac = torch.func.vmap(torch.func.jacrev(self.net))(x)
        return self.net(x), (jac ** 2).sum((1, 2))


@pytest.mark.parametrize("inside", ["to_same_dtype", "contiguous", "to_float64"])
def test_a_no_grad_block_passes_its_input_through_as_torch_does(inside):
    """`x.to(x.dtype)` (and `.contiguous()` of a contiguous x) inside `torch.no_grad()` returns x itself, so
    x used after the block still carries its gradient (a DSA indexer's `hidden.to(w.dtype)`); a real
    conversion (`.to(float64)`) is a new tensor without one, used after the block it carries none."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.lin = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, inp):
            x = self.pre(inp)
            with torch.no_grad():
                y = {"to_same_dtype": lambda: x.to(torch.float32), "contiguous": lambda: x.contiguous(),
                     "to_float64": lambda: x.to(torch.float64)}[inside]()
                s = y.sum().float()
            return self.lin(y.float()) * s
    torch.manual_seed(0)
    model, inp = Net(), torch.randn(3, 4)
    jm = bridge.convert(model, (inp,))
    model(inp).sum().backward()
    grads = flatten(jax.jit(jax.grad(lambda p: jm.apply(p, jnp.asarray(inp.numpy())).sum()))(jm.params))
    assert (model.pre.weight.grad is None) == (inside == "to_float64")
    for name, p in model.named_parameters():
        if p.grad is None:   # no path to the output carries a gradient: none arrives in JAX either
            assert float(jnp.abs(grads[name]).max()) == 0.0, name
        else:
            assert rel_err(grads[name], p.grad) <= GRAD_TOL, name


class _BranchOnSizes(torch.nn.Module):
    def forward(self, x, mask):
        y = x * mask.unsqueeze(-1)
        return y + 1 if x.shape[0] > 4 else y - 1


def test_dynamic_sizes_outside_the_captured_ranges_or_unequal_raise():
    """A branch on the batch size narrows it to [2, 4] at capture: batch 6 would silently take the captured
    branch (torch's own program raises too). Sizes torch.export found equal must stay equal: a mask of
    length 1 would broadcast silently."""
    module, x, mask = _BranchOnSizes(), torch.randn(3, 5, 2), torch.ones(3, 5)
    jm = bridge.convert(module, (x, mask), dynamic="batch+seq")
    x4, mask4 = torch.randn(4, 7, 2), (torch.rand(4, 7) > 0.5).float()
    with torch.no_grad():
        assert_close(jax.jit(jm.apply)(jm.params, to_jax(x4), to_jax(mask4)), module(x4, mask4))
    with pytest.raises(InputError, match=r"'x' dim 0 has size 6, outside \[2, 4\]"):
        jm(np.zeros((6, 5, 2), np.float32), np.zeros((6, 5), np.float32))
    with pytest.raises(InputError, match="'mask' dim 1 has size 1, but input 'x' dim 1 has 5"):
        jm(np.zeros((3, 5, 2), np.float32), np.zeros((3, 1), np.float32))


class _OptionalBias(torch.nn.Module):
    def forward(self, x, bias=None):
        return x * 2 if bias is None else x * 2 + bias


def test_an_array_for_an_input_captured_as_none_raises():
    """The program never reads an input captured as None: an array given there positionally would be dropped."""
    x = torch.ones(2, 3)
    jm = bridge.convert(_OptionalBias(), (x, None))
    assert_close(jm(to_jax(x), None), _OptionalBias()(x))
    with pytest.raises(InputError, match="'bias' was captured as None"):
        jm(to_jax(x), to_jax(x))

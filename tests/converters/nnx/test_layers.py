"""Per-layer parity: each torch layer, across its configuration options, against torch eager (fp32 ≤ 1e-6
relative to the output scale), and each conversion's round trip back to a bit-exact state_dict."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

import bridge
from converters.nnx import layers
from tests.converters.nnx.helpers import assert_round_trip, check_parity, from_cl, to_cl


def spatial_case(family, module, x, *, grad=False):
    """torch NC* layer vs its NNX conversion on the channels-last input; optional input-grad parity."""
    module.eval()
    fm = assert_round_trip(module)
    check_parity(family, from_cl(fm(to_cl(x))), module(x).detach())
    if grad:
        xt = x.clone().requires_grad_(True)
        (module(xt) ** 2).sum().backward()
        g = jax.grad(lambda v: jnp.sum(fm(v) ** 2))(to_cl(x))
        check_parity(family + " grad", from_cl(g), xt.grad, tol=1e-5)


def _ids(cases):
    return ["-".join(map(str, c)) for c in cases]


# -- Linear ----------------------------------------------------------------------------------------
LINEAR = [(4, 4, True, (3, 4)), (3, 5, False, (2, 6, 3)), (6, 2, True, (6,))]


@pytest.mark.parametrize("fin,fout,bias,shape", LINEAR, ids=_ids(LINEAR))
def test_linear(fin, fout, bias, shape):
    m = nn.Linear(fin, fout, bias=bias)
    x = torch.randn(shape[:-1] + (fin,))
    fm = assert_round_trip(m)
    assert fm.kernel.shape == (fin, fout)
    check_parity("Linear", fm(x.numpy()), m(x).detach())


# -- convolutions ----------------------------------------------------------------------------------
# (dims, stride, padding, dilation, groups, bias, padding_mode): each option value crossed with others
CONV = [
    (d, s, p, dil, g, b, mode)
    for d in (1, 2, 3)
    for (s, p, dil, g, b, mode) in [
        (1, 0, 1, 1, True, "zeros"), (2, 1, 1, 2, False, "zeros"), (1, "same", 2, 1, True, "zeros"),
        (1, "same", 1, 2, True, "reflect"), (2, "valid", 1, 1, True, "zeros"),
        (2, 2, 1, 1, False, "replicate"), (1, 1, 2, 2, True, "circular"),
        (3, (1, 0, 2)[:d] if d > 1 else 1, 1, 1, True, "zeros"),
    ]
]


@pytest.mark.parametrize("dims,stride,padding,dilation,groups,bias,mode", CONV, ids=_ids(CONV))
def test_conv(dims, stride, padding, dilation, groups, bias, mode):
    cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    kernel = (3, 2, 3)[:dims] if dims > 1 else 3
    m = cls(4, 6, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
            padding_mode=mode)
    x = torch.randn((2, 4) + (9, 8, 7)[:dims])
    spatial_case(f"Conv{dims}d", m, x, grad=dims == 2)


CONVT = [(d, s, p, op, dil, b) for d in (1, 2) for (s, p, op, dil, b) in
         [(1, 0, 0, 1, True), (2, 1, 1, 1, True), (3, 2, 1, 1, False), (2, 0, 1, 2, True), (2, 3, 0, 1, True)]]


@pytest.mark.parametrize("dims,stride,padding,output_padding,dilation,bias", CONVT, ids=_ids(CONVT))
def test_conv_transpose(dims, stride, padding, output_padding, dilation, bias):
    cls = (nn.ConvTranspose1d, nn.ConvTranspose2d)[dims - 1]
    m = cls(4, 3, (4, 3)[:dims] if dims > 1 else 4, stride=stride, padding=padding,
            output_padding=output_padding, dilation=dilation, bias=bias)
    x = torch.randn((2, 4) + (6, 5)[:dims])
    spatial_case(f"ConvTranspose{dims}d", m, x, grad=True)


# -- embeddings and normalization -------------------------------------------------------------------
@pytest.mark.parametrize("padding_idx", [None, 0, 5])
def test_embedding(padding_idx):
    m = nn.Embedding(7, 5, padding_idx=padding_idx)
    ids = torch.tensor([[0, 5, 3], [6, 5, 0]])
    fm = assert_round_trip(m)
    check_parity("Embedding", fm(ids.numpy()), m(ids).detach())
    (m(ids) ** 2).sum().backward()
    g = nnx.grad(lambda f: jnp.sum(f(ids.numpy()) ** 2))(fm)["embedding"][...]
    check_parity("Embedding grad", g, m.weight.grad, tol=1e-5)     # the padding row gets zero, as in torch


NORM = [((8,), 1e-5, True), ((4, 8), 1e-3, True), ((8,), 1e-3, False), ((4, 8), 1e-5, False)]


@pytest.mark.parametrize("shape,eps,affine", NORM, ids=_ids(NORM))
def test_layer_norm(shape, eps, affine):
    for bias in ([True, False] if affine else [True]):
        m = nn.LayerNorm(shape, eps=eps, elementwise_affine=affine, bias=bias)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
        x = torch.randn((3, 2) + shape) * 0.05 + 0.02
        fm = assert_round_trip(m)
        assert fm.epsilon == eps
        check_parity("LayerNorm", fm(x.numpy()), m(x).detach())


@pytest.mark.parametrize("shape,eps,affine", [((8,), None, True), ((4, 8), 1e-6, True), ((8,), 1e-3, False)])
def test_rms_norm(shape, eps, affine):
    m = nn.RMSNorm(shape, eps=eps, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            m.weight.normal_()
    x = torch.randn((3,) + shape) * 0.01
    fm = assert_round_trip(m)
    check_parity("RMSNorm", fm(x.numpy()), m(x).detach())


GROUP = [(1, True, 4), (2, False, 3), (4, True, 2), (4, False, 4), (2, True, 3)]


@pytest.mark.parametrize("groups,affine,rank", GROUP, ids=_ids(GROUP))
def test_group_norm(groups, affine, rank):
    m = nn.GroupNorm(groups, 8, eps=1e-4, affine=affine)
    if affine:
        with torch.no_grad():
            m.weight.normal_(), m.bias.normal_()
    x = torch.randn((2, 8) + (5, 4)[:rank - 2]) + 0.5
    spatial_case("GroupNorm", m, x)


# every option value at least once, crossed with both modes
BN = [(cls, rank, mom, affine, track, train) for (cls, rank, mom, affine, track) in [
    (nn.BatchNorm1d, 2, 0.1, True, True), (nn.BatchNorm1d, 3, 0.3, False, True),
    (nn.BatchNorm2d, 4, None, True, True), (nn.BatchNorm2d, 4, 0.1, True, False),
    (nn.BatchNorm1d, 3, 0.1, False, False)] for train in (True, False)]


@pytest.mark.parametrize("cls,rank,momentum,affine,track,train", BN, ids=_ids(BN))
def test_batch_norm(cls, rank, momentum, affine, track, train):
    m = cls(6, momentum=momentum, affine=affine, track_running_stats=track)
    with torch.no_grad():
        for t in [*m.parameters(), *([m.running_mean, m.running_var] if track else [])]:
            t.uniform_(0.5, 1.5)
    m.train(train)
    x = torch.randn((4, 6) + (5, 3)[:rank - 2]) * 2 + 1
    fm = assert_round_trip(m)
    for _ in range(2):                                 # the second call sees the first one's statistics
        y = fm(to_cl(x))
        check_parity("BatchNorm", from_cl(y), m(x).detach())
    if track:
        for name, ref in [("mean", m.running_mean), ("var", m.running_var)]:
            check_parity("BatchNorm stats", getattr(fm, name)[...], ref)
        assert int(fm.num_batches_tracked[...]) == int(m.num_batches_tracked)


# -- stateless layers ---------------------------------------------------------------------------------
ACTS = [nn.Identity(), nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.2), nn.ELU(0.7), nn.CELU(1.3), nn.SELU(),
        nn.GELU(), nn.GELU("tanh"), nn.SiLU(), nn.Mish(), nn.Sigmoid(), nn.LogSigmoid(), nn.Tanh(),
        nn.Tanhshrink(), nn.Softsign(), nn.Softplus(), nn.Softplus(beta=2.0, threshold=3.0), nn.Hardswish(),
        nn.Hardsigmoid(), nn.Hardtanh(-0.5, 2.0), nn.Softshrink(0.3), nn.Hardshrink(0.4),
        nn.Threshold(0.1, -2.0), nn.Softmax(-1), nn.Softmax(1), nn.LogSoftmax(-1), nn.Softmin(0), nn.GLU(-1),
        nn.PReLU()]


# grads where torch's formula is hand-written here (or has a threshold / kink convention to match)
GRAD_ACTS = {nn.GELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Softshrink, nn.Hardshrink, nn.Threshold, nn.ReLU6,
             nn.Hardswish, nn.Tanhshrink, nn.Softmin, nn.PReLU, nn.LeakyReLU}


@pytest.mark.parametrize("m", ACTS, ids=[repr(a) for a in ACTS])
def test_activation(m):
    x = torch.randn(3, 4, 6) * 3
    fm = assert_round_trip(m)
    check_parity("activations", fm(x.numpy()), m(x).detach())
    if type(m) not in GRAD_ACTS:
        return
    grad = jax.grad(lambda v: jnp.sum(fm(v) ** 2))(jnp.asarray(x.numpy()))
    xt = x.clone().requires_grad_(True)
    (m(xt) ** 2).sum().backward()
    check_parity("activations grad", grad, xt.grad, tol=1e-5)


def test_every_activation_module_is_covered():
    assert {type(a) for a in ACTS} == set(layers.ACTIVATIONS) | {nn.PReLU}


def test_prelu_per_channel():
    """Slopes along torch's dim 1: the last axis in a model of conv feature maps (channels-last), axis 1 of
    (N, C, L) in a model that keeps torch's layout."""
    m = nn.PReLU(6, 0.1)
    with torch.no_grad():
        m.weight.uniform_(-1, 1)
    spatial_case("activations", nn.Sequential(nn.Conv1d(6, 6, 1), m), torch.randn(2, 6, 5), grad=True)
    x = torch.randn(2, 6, 6)   # C == L: a slope on the wrong axis would still broadcast
    check_parity("activations", assert_round_trip(m)(x.numpy()), m(x).detach())


@pytest.mark.parametrize("act", [nn.Softmax(1), nn.LogSoftmax(1), nn.Softmin(-1), nn.GLU(1), nn.Softmax(-3)],
                         ids=repr)
def test_dim_activations_after_convs_use_torchs_dim(act):
    """In a conv model feature maps are (N, H, W, C): torch's dim 1 (channels) is the last axis."""
    torch.manual_seed(0)
    spatial_case("activations", nn.Sequential(nn.Conv2d(3, 4, 1), act), torch.randn(2, 3, 6, 5), grad=True)


def test_rms_norm_default_eps_in_bfloat16():
    m = nn.RMSNorm(8, eps=None).to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with jax.numpy_dtype_promotion("standard"):   # flax's norms mix fp32 statistics into bf16 inputs
        got = assert_round_trip(m)(jnp.asarray(x.float().numpy(), jnp.bfloat16))
    check_parity("RMSNorm", got.astype(jnp.float32), m(x).detach().float(), tol=2e-2)


@pytest.mark.parametrize("cls,rank", [(nn.Dropout, 3), (nn.Dropout1d, 3), (nn.Dropout2d, 4)])
def test_dropout(cls, rank):
    m = cls(0.4)
    x = torch.rand((4, 8) + (6, 5)[:rank - 2]) + 1
    fm = bridge.to_flax(m.eval())
    check_parity("Dropout", from_cl(fm(to_cl(x))), x)                # eval: identity
    fm = bridge.to_flax(m.train(), rngs=nnx.Rngs(3))
    y = from_cl(fm(to_cl(x)))
    kept = y != 0
    np.testing.assert_allclose(y[kept], x.numpy()[kept] / 0.6, rtol=1e-6)   # torch's 1/(1-p) scaling
    if cls is not nn.Dropout:                                       # whole channels drop together
        assert (kept.reshape(4, 8, -1).all(-1) | ~kept.reshape(4, 8, -1).any(-1)).all()
    assert 0.2 < 1 - kept.mean() < 0.6


POOL = [
    (nn.MaxPool1d(3, 2, 1), 3), (nn.MaxPool2d(3, 2, 1, ceil_mode=True), 4), (nn.MaxPool2d(2, dilation=2), 4),
    (nn.MaxPool3d(2, ceil_mode=True), 5), (nn.MaxPool2d((3, 2), (2, 1), (1, 0), ceil_mode=True), 4),
    (nn.AvgPool1d(3, 2, 1), 3), (nn.AvgPool2d(3, 2, 1, count_include_pad=False), 4),
    (nn.AvgPool2d(3, 2, 1, ceil_mode=True), 4), (nn.AvgPool2d(3, 2, 1, True, False), 4),
    (nn.AvgPool2d(2, divisor_override=3), 4), (nn.AvgPool3d(2, ceil_mode=True), 5),
    (nn.AdaptiveAvgPool1d(3), 3), (nn.AdaptiveAvgPool2d((1, 1)), 4), (nn.AdaptiveAvgPool2d((3, None)), 4),
    (nn.AdaptiveAvgPool3d(2), 5), (nn.AdaptiveMaxPool1d(4), 3), (nn.AdaptiveMaxPool2d((3, 2)), 4),
    (nn.AdaptiveMaxPool3d(2), 5),
]


@pytest.mark.parametrize("m,rank", POOL, ids=[repr(p) for p, _ in POOL])
def test_pooling(m, rank):
    x = torch.randn((2, 3) + (7, 6, 5)[:rank - 2])
    spatial_case("pooling", m, x, grad=rank == 4)


# -- attention ---------------------------------------------------------------------------------------
MHA = [(16, 4, True, None, False), (16, 1, False, None, False), (12, 3, True, 8, True), (8, 2, True, None, True)]


@pytest.mark.parametrize("embed,heads,bias,kdim,cross", MHA, ids=_ids(MHA))
def test_multihead_attention(embed, heads, bias, kdim, cross):
    m = nn.MultiheadAttention(embed, heads, bias=bias, kdim=kdim, vdim=kdim, batch_first=True).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    q = torch.randn(2, 5, embed)
    kv = torch.randn(2, 7, kdim or embed) if cross else q
    fm = assert_round_trip(m)
    got = fm(q.numpy(), kv.numpy()) if cross else fm(q.numpy())
    check_parity("MultiheadAttention", got, m(q, kv, kv, need_weights=False)[0].detach())


# -- containers ----------------------------------------------------------------------------------------
def test_flatten_keeps_torch_order_after_convs():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 3 * 2, 5))
    x = torch.randn(2, 3, 5, 4)
    fm = assert_round_trip(m)
    check_parity("Flatten", fm(to_cl(x)), m(x).detach())


def test_containers_mirror_torch_names():
    m = nn.ModuleDict({"enc": nn.ModuleList([nn.Linear(3, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2))]),
                       "head": nn.Sequential(__import__("collections").OrderedDict(fc=nn.Linear(2, 2), act=nn.Tanh()))})
    fm = assert_round_trip(m)
    x = torch.randn(2, 3)
    y = fm["head"](fm["enc"][1](fm["enc"][0](x.numpy())))
    check_parity("containers", y, m["head"](m["enc"][1](m["enc"][0](x))).detach())

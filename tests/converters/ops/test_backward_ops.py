"""Core-ATen backward ops (converters/ops/backward.py) against torch's own kernels on the same values,
plus the custom gradient of multiplicative scatters (converters/ops/scatter.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters import ops  # noqa: F401  (registers every lowering)
from converters.registry import lookup
from tests.conftest import assert_close

aten = torch.ops.aten


def lowered(op, *args):
    """Call op's lowering on JAX arrays (tensors converted), with the interpreter's promotion rules."""
    conv = lambda a: jnp.asarray(a.detach().numpy()) if isinstance(a, torch.Tensor) else a  # noqa: E731
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        return lookup(op).fn(*[conv(a) for a in args])


def check(got, ref, what, mask=None):
    """Outputs the mask asks for match torch; the others are None (torch's meta kernels return none)."""
    got = got if isinstance(got, (tuple, list)) else (got,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    assert len(got) == len(ref), what
    for i, (g, r) in enumerate(zip(got, ref)):
        if r is None or (mask is not None and not mask[i]):
            assert g is None, f"{what}[{i}]: expected None"
            continue
        assert g is not None and tuple(g.shape) == tuple(r.shape), f"{what}[{i}]: shape {getattr(g, 'shape', g)}"
        assert_close(np.asarray(g), r, what=f"{what}[{i}]")


CONV = [  # (x shape, w shape, stride, padding, dilation, transposed, output_padding, groups)
    ((2, 4, 9, 8), (6, 4, 3, 3), [2, 2], [1, 1], [1, 1], False, [0, 0], 1),
    ((2, 4, 9, 8), (6, 2, 3, 2), [1, 2], [0, 1], [2, 1], False, [0, 0], 2),
    ((2, 4, 5, 6), (4, 3, 3, 3), [2, 2], [1, 0], [1, 1], True, [1, 0], 1),
    ((3, 2, 11), (4, 2, 3), [2], [1], [1], False, [0], 1),
]


@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False], [True, False, True]])
@pytest.mark.parametrize("cfg", range(len(CONV)))
def test_convolution_backward(cfg, mask):
    xs, ws, stride, padding, dilation, transposed, out_pad, groups = CONV[cfg]
    x, w = torch.randn(xs), torch.randn(ws)
    y = aten.convolution(x, w, None, stride, padding, dilation, transposed, out_pad, groups)
    g = torch.randn(y.shape)
    args = (g, x, w, [y.shape[1]], stride, padding, dilation, transposed, out_pad, groups, mask)
    check(lowered(aten.convolution_backward.default, *args), aten.convolution_backward(*args), "conv", mask)


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True]])
@pytest.mark.parametrize("shape,norm,affine", [((4, 8), [8], True), ((2, 3, 4), [3, 4], True), ((3, 5), [5], False)])
def test_native_layer_norm_backward(shape, norm, affine, mask):
    x = torch.randn(shape) * 3 + 1
    w, b = (torch.randn(norm), torch.randn(norm)) if affine else (None, None)
    mask = mask if affine else [mask[0], False, False]   # torch's kernel needs a weight for those
    y, mean, rstd = aten.native_layer_norm(x, norm, w, b, 1e-5)
    args = (torch.randn(shape), x, norm, mean, rstd, w, b, mask)
    check(lowered(aten.native_layer_norm_backward.default, *args), aten.native_layer_norm_backward(*args), "ln", mask)


@pytest.mark.parametrize("mask", [[True, True, True], [False, True, True], [True, False, False]])
@pytest.mark.parametrize("shape,group,affine", [((2, 6, 5), 3, True), ((2, 4, 3, 3), 2, True), ((3, 4, 6), 4, False)])
def test_native_group_norm_backward(shape, group, affine, mask):
    N, C = shape[:2]
    HxW = int(np.prod(shape[2:]))
    x = torch.randn(shape) * 2 - 1
    w, b = (torch.randn(C), torch.randn(C)) if affine else (None, None)
    y, mean, rstd = aten.native_group_norm(x, w, b, N, C, HxW, group, 1e-5)
    mask = mask if affine else [mask[0], False, False]   # torch's kernel needs a weight for those
    args = (torch.randn(shape), x, mean, rstd, w, N, C, HxW, group, mask)
    check(lowered(aten.native_group_norm_backward.default, *args), aten.native_group_norm_backward(*args), "gn", mask)


POOL = [  # (x shape, kernel, stride, padding, dilation, ceil_mode)
    ((2, 3, 9, 8), [3, 3], [2, 2], [1, 1], [1, 1], False),
    ((2, 3, 9, 8), [2, 3], [1, 2], [0, 1], [2, 1], True),
    ((3, 7, 7), [2, 2], [2, 2], [0, 0], [1, 1], True),
]


@pytest.mark.parametrize("cfg", range(len(POOL)))
def test_max_pool2d_with_indices_backward(cfg):
    xs, k, s, p, d, ceil = POOL[cfg]
    x = torch.randn(xs)
    y, idx = aten.max_pool2d_with_indices(x, k, s, p, d, ceil)
    args = (torch.randn(y.shape), x, k, s, p, d, ceil, idx)
    check(lowered(aten.max_pool2d_with_indices_backward.default, *args),
          aten.max_pool2d_with_indices_backward(*args), "maxpool")


@pytest.mark.parametrize("ceil,include_pad,divisor", [(False, True, None), (True, True, None), (True, False, None),
                                                   (True, True, 5)])
@pytest.mark.parametrize("xs,k,s,p", [((2, 3, 9, 8), [3, 3], [2, 2], [1, 1]), ((3, 7, 6), [2, 3], [2, 1], [1, 0])])
def test_avg_pool2d_backward(xs, k, s, p, ceil, include_pad, divisor):
    x = torch.randn(xs)
    y = aten.avg_pool2d(x, k, s, p, ceil, include_pad, divisor)
    args = (torch.randn(y.shape), x, k, s, p, ceil, include_pad, divisor)
    check(lowered(aten.avg_pool2d_backward.default, *args), aten.avg_pool2d_backward(*args), "avgpool")


@pytest.mark.parametrize("xs,out", [((2, 3, 7, 9), (3, 4)), ((2, 3, 8, 8), (4, 4)), ((3, 5, 6), (5, 6))])
def test_adaptive_avg_pool2d_backward(xs, out):
    x = torch.randn(xs)
    args = (torch.randn(xs[:-2] + out), x)
    check(lowered(aten._adaptive_avg_pool2d_backward.default, *args),
          aten._adaptive_avg_pool2d_backward(*args), "adaptive")


@pytest.mark.parametrize("padding_idx,freq", [(-1, False), (2, False), (-1, True), (3, True)])
def test_embedding_dense_backward(padding_idx, freq):
    idx = torch.tensor([[0, 2, 3, 3], [5, 2, 3, 1]])
    args = (torch.randn(2, 4, 5), idx, 7, padding_idx, freq)
    check(lowered(aten.embedding_dense_backward.default, *args), aten.embedding_dense_backward(*args), "emb")


@pytest.mark.parametrize("include_self", [True, False])
def test_scatter_reduce_prod_grad_with_zeros(include_self):
    """Repeated indices, single and double zeros in src and in self: torch's exclusive-product rule."""
    x = torch.tensor([[2.0, 0.0, 3.0], [1.5, 4.0, 0.0]])
    src = torch.tensor([[0.0, 2.0, 5.0, 0.5], [3.0, 0.0, 0.0, 2.0]])
    index = torch.tensor([[0, 1, 1, 2], [2, 0, 0, 1]])
    w = torch.randn(2, 3)

    def loss_t(x, src):
        return (x.scatter_reduce(1, index, src, "prod", include_self=include_self) * w).sum()

    def loss_j(x, src):
        with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
            out = lookup(aten.scatter_reduce.two).fn(x, 1, jnp.asarray(index.numpy()), src, "prod",
                                                   include_self=include_self)
        return jnp.sum(out * jnp.asarray(w.numpy()))

    ref = torch.autograd.grad(loss_t(x.requires_grad_(), src.requires_grad_()), (x, src))
    got = jax.grad(loss_j, argnums=(0, 1))(jnp.asarray(x.detach().numpy()), jnp.asarray(src.detach().numpy()))
    check(got, ref, "scatter_reduce prod grad")

"""The traps of today's converters, one test each: each would pass a shape check and still be wrong."""
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch import nn

import bridge
from tests.converters.nnx.helpers import assert_round_trip, check_parity, from_cl, to_cl


def test_cubic_conv3d_kernel_is_permuted_not_reversed():
    m = nn.Conv3d(3, 5, 3, padding=1)                    # a generic `.T` gives (3,3,3,3,5) too: W,H,D swapped
    x = torch.randn(2, 3, 6, 5, 4)
    fm = assert_round_trip(m)
    assert fm.kernel.shape == m.weight.T.shape == (3, 3, 3, 3, 5)
    check_parity("Conv3d", from_cl(fm(to_cl(x))), m(x).detach())
    naive = nnx.clone(fm)
    naive.kernel[...] = jnp.asarray(m.weight.detach().numpy().T)
    assert np.abs(from_cl(naive(to_cl(x))) - m(x).detach().numpy()).max() > 1e-2   # the trap is real


def test_square_linear_is_transposed():
    m = nn.Linear(8, 8)                                   # kernel and weight shapes agree; values must not
    x = torch.randn(3, 8)
    fm = assert_round_trip(m)
    np.testing.assert_array_equal(np.asarray(fm.kernel[...]), m.weight.detach().numpy().T)
    check_parity("Linear", fm(x.numpy()), m(x).detach())


def test_conv_transpose_padding_and_output_padding():
    m = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
    x = torch.randn(2, 4, 5, 6)
    fm = assert_round_trip(m)
    y = from_cl(fm(to_cl(x)))
    assert y.shape == tuple(m(x).shape) == (2, 3, 10, 12)  # 'SAME'-style padding would give other sizes
    check_parity("ConvTranspose2d", y, m(x).detach())


def test_gelu_exact_and_tanh_are_kept_apart():
    x = torch.linspace(-4, 4, 101)
    exact, tanh = bridge.to_flax(nn.GELU()), bridge.to_flax(nn.GELU(approximate="tanh"))
    check_parity("activations", exact(x.numpy()), nn.GELU()(x))
    check_parity("activations", tanh(x.numpy()), nn.GELU(approximate="tanh")(x))
    assert np.abs(np.asarray(exact(x.numpy())) - np.asarray(tanh(x.numpy()))).max() > 1e-4   # jax default: tanh


def test_layer_norm_keeps_torch_eps():
    m = nn.LayerNorm(16)                                  # torch 1e-5; nnx.LayerNorm's default is 1e-6
    fm = bridge.to_flax(m)
    assert fm.epsilon == 1e-5
    x = torch.randn(4, 16) * 1e-3                         # variance ~1e-6: eps matters at 1e-1 relative
    check_parity("LayerNorm", fm(x.numpy()), m(x).detach())


def test_batch_norm_momentum_and_running_stats_follow_torch():
    m = nn.BatchNorm2d(5, momentum=0.1).train()           # torch 0.1 ⇔ Flax decay 0.9
    fm = bridge.to_flax(m)
    assert fm.momentum == 0.9
    for _ in range(3):
        x = torch.randn(4, 5, 3, 3) * 3 + 2
        check_parity("BatchNorm", from_cl(fm(to_cl(x))), m(x).detach())
    check_parity("BatchNorm stats", fm.mean[...], m.running_mean)
    check_parity("BatchNorm stats", fm.var[...], m.running_var)   # unbiased batch variance, as torch
    assert bridge.from_flax(fm)["num_batches_tracked"].item() == m.num_batches_tracked.item() == 3
    fm.eval(), m.eval()
    x = torch.randn(4, 5, 3, 3)
    check_parity("BatchNorm", from_cl(fm(to_cl(x))), m(x).detach())

"""Composed models: converted with `to_flax`, trained with `nnx.Optimizer`, exported with `from_flax`
and loaded into torch (strict), whose outputs must equal the NNX model's. The same SGD steps taken in
torch land on the same weights, which checks gradients and BatchNorm's train-mode statistics too."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx
from torch import nn

import bridge
from tests.conftest import assert_close
from tests.converters.nnx.helpers import assert_round_trip, from_cl, to_cl


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):               # only submodule calls and `+`: valid on jax arrays as it stands
        y = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class TransformerBlock(nn.Module):
    def __init__(self, d=16, heads=4):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


def transformer_block_nnx(self, x):      # the NNX forward: nnx.MultiHeadAttention takes (q) for self-attention
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=11, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.block = TransformerBlock(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(self.block(self.emb(ids)))


def train_both(model, fm, batches, loss_t, loss_j, lr=0.1):
    """The same SGD steps in torch and in NNX (nnx.Optimizer + optax); returns both loss sequences."""
    opt_t = torch.optim.SGD(model.parameters(), lr=lr)
    opt_j = nnx.Optimizer(fm, optax.sgd(lr), wrt=nnx.Param)

    @nnx.jit
    def step(fm, opt, x, y):
        loss, grads = nnx.value_and_grad(lambda f: loss_j(f(x), y))(fm)
        opt.update(fm, grads)
        return loss

    got, ref = [], []
    for x_t, x_j, y in batches:
        got.append(float(step(fm, opt_j, x_j, jnp.asarray(y.numpy()))))
        opt_t.zero_grad()
        loss = loss_t(model(x_t), y)
        loss.backward()
        opt_t.step()
        ref.append(loss.item())
    return got, ref


def export_and_check(model, fm, trained, x_t, x_j, out=lambda y: y):
    """from_flax → torch (strict load) → torch outputs equal NNX outputs; torch-trained weights agree too."""
    sd = bridge.from_flax(fm)
    assert list(sd) == list(model.state_dict())
    for k, v in sd.items():                                   # SGD in torch reached the same weights
        assert_close(v, trained[k], what=k) if v.is_floating_point() else torch.equal(v, trained[k])
    model.load_state_dict(sd, strict=True)
    model.eval(), fm.eval()
    return assert_close(out(np.asarray(fm(x_j))), model(x_t).detach(), what="exported model")


def test_resnet_trains_in_nnx_and_exports_to_torch():
    model = ResNet().train()
    fm = bridge.to_flax(model, forwards={BasicBlock: BasicBlock.forward, ResNet: ResNet.forward})
    assert type(fm.blocks.layers[1]).__name__ == "BasicBlock"
    assert fm.blocks.layers[1].shortcut.layers[0].kernel.shape == (1, 1, 8, 16)
    assert_round_trip(model, fm)
    xs = [torch.randn(6, 3, 8, 8) for _ in range(3)]
    batches = [(x, to_cl(x), torch.randint(0, 5, (6,))) for x in xs]
    ce = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()  # noqa: E731
    got, ref = train_both(model, fm, batches, nn.functional.cross_entropy, ce)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    export_and_check(ResNet(), fm, trained, x, to_cl(x))


def test_transformer_block_trains_in_nnx_and_exports_to_torch():
    model = TinyLM().train()
    fm = bridge.to_flax(model, forwards={TransformerBlock: transformer_block_nnx, TinyLM: TinyLM.forward})
    assert fm.block.attn.query.kernel.shape == (16, 4, 4)
    assert_round_trip(model, fm)
    ids = [torch.randint(0, 11, (4, 7)) for _ in range(4)]
    batches = [(i[:, :-1], jnp.asarray(i[:, :-1].numpy()), i[:, 1:]) for i in ids]
    ce_t = lambda logits, y: nn.functional.cross_entropy(logits.reshape(-1, 11), y.reshape(-1))  # noqa: E731
    ce_j = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()  # noqa: E731
    got, ref = train_both(model, fm, batches, ce_t, ce_j, lr=0.5)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert got[-1] < got[0]
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 11, (3, 9))
    export_and_check(TinyLM(), fm, trained, x, jnp.asarray(x.numpy()))


def test_resnet_outputs_channels_last():
    model = ResNet().eval()
    fm = bridge.to_flax(model, forwards={BasicBlock: BasicBlock.forward, ResNet: ResNet.forward})
    x = torch.randn(2, 3, 8, 8)
    feats = fm.blocks(fm.stem(to_cl(x)))
    assert_close(from_cl(feats), model.blocks(model.stem(x)).detach(), what="feature maps")
    assert jax.tree.leaves(nnx.state(fm, nnx.BatchStat))


class _SharedLayer(nn.Module):
    """One Linear registered under two names and run twice, plus a Sequential holding one layer twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = self.a
        self.seq = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.seq.append(self.seq[0])

    def forward(self, x):
        return self.seq(self.b(self.a(x)))


def test_a_module_registered_twice_stays_one_module():
    """torch's forward runs it under both names and its state_dict lists both: NNX holds it once (one
    gradient, the sum over its uses), and from_flax writes both names back."""
    torch.manual_seed(0)
    model, x = _SharedLayer(), torch.randn(3, 6)
    fm = bridge.to_flax(model, forwards={_SharedLayer: _SharedLayer.forward})
    assert_round_trip(model, fm)
    assert fm.a is fm.b and fm.seq.layers[0] is fm.seq.layers[2]
    assert_close(fm(jnp.asarray(x.numpy())), model(x).detach())
    graphdef, params, rest = nnx.split(fm, nnx.Param, ...)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(jnp.asarray(x.numpy())) ** 2))(params)
    (model(x) ** 2).sum().backward()
    assert_close(grads["a"]["kernel"][...].T, model.a.weight.grad, what="shared a")
    assert_close(grads["seq"]["layers"][0]["kernel"][...].T, model.seq[0].weight.grad, what="shared seq[0]")

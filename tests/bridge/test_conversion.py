"""bridge.convert(static=...): tensor inputs whose values decide shapes (LLaVA-NeXT's image sizes) are captured
as Python values; the program, specialized to them, matches torch, and calls with other values are refused."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import torch

import bridge
from bridge.errors import CaptureError, InputError
from tests.conftest import assert_close, full_only

C = 4


class Crops(torch.nn.Module):
    """Each image cropped to its own size (read from a tensor; tall ones transposed, a Python branch on the
    values), its pixels projected and pooled together."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(C, 8)

    def forward(self, images, sizes):
        sizes = sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes   # as Hugging Face's code takes both
        crops = [images[b, :h, :w] if h <= w else images[b, :h, :w].transpose(0, 1)
                 for b, (h, w) in enumerate(sizes)]
        rows = [c.reshape(-1, C) * (i + 1) for i, c in enumerate(crops)]
        return self.lin(torch.cat(rows)).tanh().mean(0)


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, 6, C, generator=g), torch.tensor([[3, 6], [5, 2]])


def test_static_input_is_captured_as_its_value():
    torch.manual_seed(0)
    model = Crops()
    images, sizes = _inputs(0)
    with pytest.raises(CaptureError, match=r"static=\('sizes',\)"):   # the hint names the input
        bridge.convert(model, (), {"images": images, "sizes": sizes})
    jm = bridge.convert(model, (), {"images": images, "sizes": sizes}, static=("sizes",))
    other, _ = _inputs(1)
    ref = model(other, sizes).detach()
    run = jax.jit(lambda p, x: jm.apply(p, images=x))   # left out: the captured value
    assert_close(run(jm.params, jnp.asarray(other.numpy())), ref)
    for same in (sizes.numpy(), sizes.tolist(), jnp.asarray(sizes.numpy())):   # given again, concretely
        assert_close(jm.apply(jm.params, images=jnp.asarray(other.numpy()), sizes=same), ref)
    with pytest.raises(InputError, match="captured with 3"):
        jm.apply(jm.params, images=jnp.asarray(other.numpy()), sizes=[[2, 6], [5, 2]])
    with pytest.raises(InputError, match="static"):
        jax.jit(lambda p, x, s: jm.apply(p, images=x, sizes=s))(jm.params, jnp.asarray(other.numpy()),
                                                                 jnp.asarray(sizes.numpy()))
    with pytest.raises(CaptureError, match="no keyword input"):
        bridge.convert(model, (), {"images": images, "sizes": sizes}, static=("size",))


@full_only
def test_llava_next_converts_with_static_image_sizes():
    import transformers as tf
    V = 128
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32,
                  patch_size=8, model_type="clip_vision_model")
    text = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, model_type="llama")
    config = tf.LlavaNextConfig(text_config=text, vision_config=vision, image_token_index=V - 1,
                                image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]])
    torch.manual_seed(0)
    model = tf.LlavaNextForConditionalGeneration(config).eval()
    sizes = torch.tensor([[32, 32], [32, 64]])   # two aspect ratios: 36 and 52 image tokens

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, V - 4, (2, 60), generator=g)
        ids[0, 2:38], ids[1, 2:54] = V - 1, V - 1
        return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 3, 32, 32, generator=g), "image_sizes": sizes}
    jm = bridge.convert(model, (), inputs(0), static=("image_sizes",))
    kw = inputs(1)
    with torch.no_grad():
        ref = model(**kw).logits
    got = jax.jit(jm.apply)(jm.params, **{k: jnp.asarray(v.numpy()) for k, v in kw.items() if k != "image_sizes"})
    assert_close(got["logits"], ref)

"""Small models used across the tests, each built from a config with random init.

`MODELS[name]()` returns a Case: the torch module, example (args, kwargs), how to build
inputs of another batch/sequence size, and which output to compare.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import transformers


@dataclasses.dataclass
class Case:
    module: torch.nn.Module
    inputs: Callable[[int, int], tuple[tuple, dict]]   # (batch, seq) -> (args, kwargs)
    dynamic: str = "batch+seq"
    output_key: str | None = None                      # dict output to compare (None: the tensor itself)


def _tokens(vocab, types=False, mask=True, low=0):
    def make(b, s):
        kw = {"input_ids": torch.randint(low, vocab, (b, s))}
        if mask:
            am = torch.ones(b, s, dtype=torch.long)
            am[0, : s // 3] = 0  # left padding on the first example
            kw["attention_mask"] = am
        if types:
            kw["token_type_ids"] = (torch.arange(s) >= s // 2).long().expand(b, s).contiguous()
        return (), kw
    return make


def gpt2() -> Case:
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return Case(transformers.GPT2LMHeadModel(cfg), _tokens(128, mask=False), output_key="logits")


def gpt2_masked() -> Case:
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return Case(transformers.GPT2LMHeadModel(cfg), _tokens(128), output_key="logits")


def llama() -> Case:
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return Case(transformers.LlamaForCausalLM(cfg), _tokens(128), output_key="logits")


def bert() -> Case:
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)
    return Case(transformers.BertModel(cfg), _tokens(128, types=True), output_key="last_hidden_state")


class CNN(torch.nn.Module):
    """Conv2d (stride, padding, dilation, groups), BatchNorm2d, MaxPool2d, AdaptiveAvgPool2d, Dropout."""

    def __init__(self, classes=10):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=4), torch.nn.BatchNorm2d(16), torch.nn.GELU(),
            torch.nn.MaxPool2d(2), torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d((1, 1)))
        self.dropout = torch.nn.Dropout(0.25)
        self.head = torch.nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.dropout(torch.flatten(self.features(x), 1)))


def cnn() -> Case:
    m = CNN()
    with torch.no_grad():  # non-trivial running stats so eval mode is a real test
        for bn in (m.features[1], m.features[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return Case(m, lambda b, s: ((torch.randn(b, 3, 16, 16),), {}), dynamic="batch")


class MLP(torch.nn.Module):
    def __init__(self, d_in=32, hidden=64, d_out=8):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.GELU(approximate="tanh"),
                                       torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, d_out))

    def forward(self, x):
        return torch.log_softmax(self.net(x), dim=-1)


def mlp() -> Case:
    return Case(MLP(), lambda b, s: ((torch.randn(b, 32),), {}), dynamic="batch")


MODELS = {"gpt2": gpt2, "gpt2_masked": gpt2_masked, "llama": llama, "bert": bert, "cnn": cnn, "mlp": mlp}


class MaskedPool(torch.nn.Module):
    """Token ids and an integer mask cast inside forward (the graph checks the input's int64 dtype)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.out = torch.nn.Linear(16, 4)

    def forward(self, input_ids, attention_mask):
        keep = attention_mask.to(dtype=torch.bool)
        h = self.emb(input_ids) * keep[..., None]
        return self.out(torch.nn.functional.gelu(h.sum(1) / keep.sum(1, keepdim=True)))


def masked_pool_factory():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 7))
    return MaskedPool().eval(), (), {"input_ids": ids, "attention_mask": (ids > 5).long()}


def mlp_factory():
    """`package.module:factory` form for the CLI: (module, example args)."""
    torch.manual_seed(0)
    return MLP().eval(), (torch.randn(2, 32),)

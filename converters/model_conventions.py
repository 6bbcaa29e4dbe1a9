"""How a model's own conventions are kept while torch.export traces it: Hugging Face's KV-cache switch and
output-recording hooks, and values forward caches on the model (which tracing would leave fake).

Example:
    >>> with config_cache_off(model, kwargs), no_fake_leftovers(model):
    ...     ep = torch.export.export(model, (), {**kwargs, **hf_kwargs(model, kwargs)})
"""
from __future__ import annotations

import contextlib
import inspect
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensor

from bridge.errors import InputError
from converters.caches import has_cache


def hf_kwargs(module: torch.nn.Module, kwargs: dict) -> dict:
    """Hugging Face models: turn the KV cache off unless the caller chose otherwise (or passed a cache)."""
    extra = {}
    params = inspect.signature(module.forward).parameters
    if getattr(module, "config", None) is not None and "use_cache" in params and "use_cache" not in kwargs \
            and not has_cache((), kwargs):
        extra["use_cache"] = False
    return extra


@contextlib.contextmanager
def no_fake_leftovers(module: torch.nn.Module):
    """What forward caches on the model while torch.export traces it (a functools.cached_property of a helper
    object: Chameleon's img2bpe_mapping_tensor) is a fake tensor, which torch would then compute with: such
    values are put back as they were (or dropped, so torch computes them again)."""
    owners = list(module.modules())
    owners += [v for m in owners[:] for v in vars(m).values()
               if hasattr(v, "__dict__") and not isinstance(v, (torch.nn.Module, torch.Tensor, type))]
    before = [(o, dict(vars(o))) for o in owners]
    try:
        yield
    finally:
        for owner, old in before:
            for key, value in list(vars(owner).items()):
                if isinstance(value, FakeTensor) or (isinstance(value, (tuple, list)) and any(
                        isinstance(v, FakeTensor) for v in value)):
                    if key in old and old[key] is not value:
                        vars(owner)[key] = old[key]
                    else:
                        del vars(owner)[key]


@contextlib.contextmanager
def meta_stand_ins(module: torch.nn.Module):
    """Parameters and buffers on the meta device (built under `bridge.empty_weights()`) traced as CPU tensors of
    the same shape, strides and dtype: torch.export refuses an op that meets a meta weight with a CPU input or
    buffer. Tracing reads no values, so the stand-ins are never written and take address space, not memory;
    the meta tensors are put back after (a tensor registered twice keeps one stand-in, so ties stay ties)."""
    swapped, stand_ins = [], {}
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for name, t in list(table.items()):
                if t is None or not t.is_meta:
                    continue
                if id(t) not in stand_ins:
                    real = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
                    is_param = isinstance(t, torch.nn.Parameter)
                    stand_ins[id(t)] = torch.nn.Parameter(real, t.requires_grad) if is_param else real
                swapped.append((table, name, t))
                table[name] = stand_ins[id(t)]
    try:
        yield
    finally:
        for table, name, t in swapped:
            table[name] = t


def install_output_hooks(module: torch.nn.Module) -> None:
    """transformers installs its output-recording hooks on the first forward that records outputs (CLIPSeg's
    decoder reads the vision tower's hidden states), under a threading lock strict export cannot trace: each
    outermost Hugging Face model gets them up front, as its first eager call would give them."""
    hooks = sys.modules.get("transformers.utils.output_capturing")
    install = getattr(hooks, "maybe_install_capturing_hooks", None)
    # a model that ran already has them where it records outputs: installing from its root would hook those
    # parts a second time (transformers checks only the root's flag), and each output would be recorded twice
    if install is None or any(getattr(m, "_output_capturing_hooks_installed", False) for m in module.modules()):
        return
    from transformers import PreTrainedModel
    if isinstance(module, PreTrainedModel):
        install(module)
        return
    for child in module.children():
        install_output_hooks(child)


@contextlib.contextmanager
def config_cache_off(module: torch.nn.Module, kwargs: dict):
    """Hugging Face models whose forward passes `use_cache` on only through **kwargs read it from the config:
    turned off there while capturing (as a keyword it would hit torch.export's **kwargs dynamic-shape bug)."""
    config = getattr(module, "config", None)
    if "use_cache" in kwargs or not getattr(config, "use_cache", False) or has_cache((), kwargs):
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def static_cache(model, batch_size: int, max_cache_len: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu"):
    """A Hugging Face `StaticCache` for `model` whose state is all tensors, sliding-window layers included.

    transformers' static sliding-window and chunked layers keep their length as a Python int, so no traced
    program can carry them. Here those layers hold all `max_cache_len` positions like full-attention layers;
    the model's own mask still applies the window or chunk (its positions are absolute), so the logits are
    the same and one converted program runs the prompt and every next token under `jax.jit`.

    Example:
        >>> cache = bridge.static_cache(model, batch_size=2, max_cache_len=64)
        >>> jm = bridge.convert(model, kwargs={"input_ids": ids, "cache": cache, "use_cache": True},
        ...                     dynamic="batch+seq")    # `past_key_values` in older transformers
        >>> out = jm(input_ids=ids.numpy(), cache=bridge.as_jax_inputs(cache))   # then out["cache"] each step
    """
    import transformers
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    config = getattr(model, "config", model)
    if not isinstance(config, transformers.PretrainedConfig):
        raise InputError(f"static_cache: {type(model).__name__} has no Hugging Face config; pass a transformers "
                         "model or its config")
    for name, n in (("batch_size", batch_size), ("max_cache_len", max_cache_len)):
        if not isinstance(n, int) or n < 1:
            raise InputError(f"static_cache: {name} must be a positive int, got {n!r}")
    text = config.get_text_config(decoder=True)
    cache = transformers.StaticCache(config=config, max_cache_len=max_cache_len)
    cache.layers = [StaticLayer(max_cache_len=max_cache_len) if isinstance(layer, StaticSlidingWindowLayer)
                    else layer for layer in cache.layers]
    dtype = dtype or getattr(model, "dtype", torch.float32)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache.early_initialization(batch_size, heads, head_dim, dtype, torch.device(device))
    return cache

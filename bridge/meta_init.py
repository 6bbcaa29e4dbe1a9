"""Build torch modules without materialising their parameters, for `convert(..., weights=path)`.

Example:
    >>> with bridge.empty_weights():
    ...     model = transformers.GPT2LMHeadModel(cfg)      # parameters on the meta device, buffers real
    >>> jm = bridge.convert(model, kwargs={"input_ids": ids}, weights="model.safetensors")
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def empty_weights(include_buffers: bool = False):
    """Parameters created inside go to the meta device (no memory); buffers stay real unless asked.

    Non-persistent buffers (rotary frequencies, position ids) are computed in __init__ and are not in
    checkpoints, so they are kept real by default.
    """
    if include_buffers:
        with torch.device("meta"):
            yield
        return
    original = torch.nn.Module.register_parameter

    def register_parameter(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original

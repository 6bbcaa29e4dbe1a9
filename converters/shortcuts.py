"""Checks and shortcuts in torch's and Hugging Face's own Python that no traced program can carry, switched off
while capturing. None changes a result:

- torch.distributions validates arguments and samples (raise if any is out of support): valid inputs give the
  same values. A distribution built with validate_args=True still fails, with a hint.
- nn.Transformer* compare a mask without is_causal to a causal one (`_detect_is_causal_mask`) only to pick a
  faster kernel: the mask is applied as given.
- FlexAttention refuses CPU inputs that require grad (torch has no CPU backward for it); JAX differentiates the
  lowering, so only its other checks (devices) run.
- Hugging Face's masks test `fast_all(attention_mask)` only to leave out a padding mask of all ones, and FSMT's
  `make_padding_mask` tests `.any()` only to leave out one that masks nothing: the mask is applied as given.
- Gamma.rsample (Chi2's too) clamps its draw in place through a detached alias, which autograd does not see; a
  traced program would make the clamp the value and lose the draw's gradient. It clamps out of place here, the
  gradient passed through as torch's autograd passes it.

Example:
    >>> with shortcuts_off():
    ...     ep = torch.export.export(model, args)
"""
from __future__ import annotations

import contextlib
import sys
from unittest import mock

import torch
import torch.nn.attention.flex_attention


def _gamma_rsample(self, sample_shape=torch.Size()):
    """Gamma.rsample's draw, clamped away from 0 as torch does, with the gradient of the unclamped draw."""
    shape = self._extended_shape(sample_shape)
    value = torch._standard_gamma(self.concentration.expand(shape)) / self.rate.expand(shape)
    return value + (value.clamp(min=torch.finfo(value.dtype).tiny) - value).detach()


def _replacements() -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement given the original) for everything switched off."""
    flex = torch.nn.attention.flex_attention
    table = [
        (torch.distributions.Distribution, "_validate_args", lambda original: False),
        (torch.nn.modules.transformer, "_detect_is_causal_mask",
         lambda original: lambda mask, is_causal=None, size=None: is_causal is True),
        (flex, "_validate_device", lambda original: lambda q, k, v: original(q.detach(), k.detach(), v.detach())),
        (torch.distributions.Gamma, "rsample", lambda original: _gamma_rsample),
    ]
    for module, name, replacement in _HF:   # only modules already in use
        if hasattr(sys.modules.get(module), name):
            table.append((sys.modules[module], name, replacement))
    return table


_HF = [
    ("transformers.masking_utils", "fast_all", lambda original: lambda tensor: False),
    ("transformers.models.fsmt.modeling_fsmt", "make_padding_mask",
     lambda original: lambda input_ids, padding_idx=1: input_ids.eq(padding_idx)),
]


@contextlib.contextmanager
def shortcuts_off():
    with contextlib.ExitStack() as stack:
        for owner, name, replacement in _replacements():
            stack.enter_context(mock.patch.object(owner, name, replacement(getattr(owner, name))))
        yield

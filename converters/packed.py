"""Packed sequences through capture: `pack_padded_sequence` → LSTM / GRU / RNN → `pad_packed_sequence`.

A PackedSequence holds sum(lengths) rows and batch sizes read from the lengths' values, which torch.export
cannot trace (the RNN reads `int(batch_sizes[0])`). While capturing, a packed sequence keeps its padded,
time-major tensor (sorted by length, as torch sorts) with the lengths beside it; an RNN given one calls one op,
`bridge::packed_rnn`, whose lowering (converters/ops/rnn.py) freezes each sequence's state past its length, as
packing does; `pad_packed_sequence` fills the padding with `padding_value` and restores the batch order.
The padded output keeps the input's time length T (torch's is the longest length: the same when the batch is
padded to its longest sequence, or with `total_length=T`). Reading `packed.data` in other ways is refused.
A PackedSequence given as an input becomes a PackedInput (padded batch, lengths), packed again inside forward.

Example:
    >>> with routing_packed():
    ...     ep = torch.export.export(model, (x, lengths), strict=False)
"""
from __future__ import annotations

import contextlib
import inspect
import typing

import torch
from torch.nn.utils.rnn import PackedSequence
from torch.overrides import TorchFunctionMode

from bridge.errors import CaptureError

_MODES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


@torch.library.custom_op("bridge::packed_rnn", mutates_args=())
def packed_rnn(mode: str, x: torch.Tensor, lengths: torch.Tensor, hx: list[torch.Tensor], params: list[torch.Tensor],
               has_biases: bool, num_layers: int, dropout: float, train: bool,
               bidirectional: bool) -> list[torch.Tensor]:
    """torch's packed RNN on a padded, time-major `x` (T, B, I) with `lengths` sorted longest first: the padded
    output (zeros past each length) and the final states."""
    data, batch_sizes = torch._VF._pack_padded_sequence(x, lengths.cpu(), False)
    fn = getattr(torch._VF, mode)   # lstm / gru / rnn_tanh / rnn_relu, the packed overloads
    out = fn(data, batch_sizes, tuple(hx) if mode == "lstm" else hx[0], params, has_biases, num_layers, dropout,
             train, bidirectional)
    padded, _ = torch._VF._pad_packed_sequence(out[0], batch_sizes, False, 0.0, x.shape[0])
    return [padded.clone(), *(h.clone() for h in out[1:])]


@packed_rnn.register_fake
def _(mode, x, lengths, hx, params, has_biases, num_layers, dropout, train, bidirectional):
    dirs = 2 if bidirectional else 1
    return [x.new_empty(x.shape[0], x.shape[1], dirs * hx[0].shape[-1]), *(torch.empty_like(h) for h in hx)]


class _Packing(TorchFunctionMode):
    """Packing makes a padded stand-in; unpacking pads it; nothing else may read it."""

    def __init__(self):
        super().__init__()
        self.lengths: dict[int, torch.Tensor] = {}   # id(stand-in data) -> its sorted lengths
        self.kept: list = []                         # keeps the ids unique while capturing
        self.inside = False                          # bridge's own code handling a stand-in

    def register(self, data, lengths):
        self.lengths[id(data)] = lengths
        self.kept.append(data)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.inside:
            return func(*args, **kwargs)
        if name == "_pack_padded_sequence":
            x, lengths, batch_first = args
            data = x.transpose(0, 1) if batch_first else x.view_as(x)   # never the caller's own tensor
            self.register(data, lengths)
            return data, lengths.new_zeros(data.shape[0])   # (T,) batch sizes: only their count is read
        if name == "_pad_packed_sequence" and id(args[0]) in self.lengths:
            return self._padded(*args)
        if self.lengths and name not in ("__get__", "size", "dim") and any(
                id(a) in self.lengths for a in torch.utils._pytree.tree_leaves((args, kwargs))):
            raise CaptureError(f"{name or func} reads a PackedSequence's data: bridge keeps packed sequences "
                               "padded while capturing, so only nn.LSTM / GRU / RNN and pad_packed_sequence may "
                               "take them; pad the sequence first (pad_packed_sequence)")
        return func(*args, **kwargs)

    def _padded(self, data, batch_sizes, batch_first, padding_value, total_length):
        lengths = self.lengths[id(data)]
        steps = torch.arange(data.shape[0], device=data.device)
        valid = (steps[:, None] < lengths.to(data.device)[None, :]).reshape(*data.shape[:2], *[1] * (data.dim() - 2))
        out = torch.where(valid, data, torch.full((), padding_value, dtype=data.dtype, device=data.device))
        if total_length > data.shape[0]:
            out = torch.cat([out, out.new_full((total_length - data.shape[0], *data.shape[1:]), padding_value)])
        return (out.transpose(0, 1) if batch_first else out), lengths

    def rnn(self, module, packed: PackedSequence, hx):
        self.inside = True
        try:
            return self._rnn(module, packed, hx)
        finally:
            self.inside = False

    def _rnn(self, module, packed: PackedSequence, hx):
        data, lengths = packed.data, self.lengths[id(packed.data)]
        dirs = 2 if module.bidirectional else 1
        shape = (module.num_layers * dirs, data.shape[1])
        if hx is None:
            zeros = data.new_zeros(*shape, module.hidden_size)
            hx = (data.new_zeros(*shape, module.proj_size or module.hidden_size), zeros) \
                if module.mode == "LSTM" else zeros
        elif packed.sorted_indices is not None:   # the caller's states follow the caller's batch order
            hx = module.permute_hidden(hx, packed.sorted_indices)
        states = list(hx) if isinstance(hx, tuple) else [hx]
        weights = [getattr(module, n) for n in module._flat_weights_names]   # the parameters export traces
        out = torch.ops.bridge.packed_rnn(_MODES[module.mode], data, lengths, states, weights,
                                          module.bias, module.num_layers, float(module.dropout), module.training,
                                          module.bidirectional)
        self.register(out[0], lengths)
        result = PackedSequence(out[0], packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        hidden = tuple(out[1:]) if module.mode == "LSTM" else out[1]
        return result, module.permute_hidden(hidden, packed.unsorted_indices)


@contextlib.contextmanager
def routing_packed():
    """Packed sequences stay padded, and RNNs given one call bridge::packed_rnn, while this is active."""
    mode = _Packing()
    originals = {cls: cls.forward for cls in (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN)}

    def routed(original):
        def forward(self, input, hx=None):
            if isinstance(input, PackedSequence) and id(input.data) in mode.lengths:
                return mode.rnn(self, input, hx)
            return original(self, input, hx)
        return forward

    for cls, original in originals.items():
        cls.forward = routed(original)
    try:
        with mode:
            yield
    finally:
        for cls, original in originals.items():
            cls.forward = original


class PackedInput(typing.NamedTuple):
    """A PackedSequence given as an input, as the converted program takes it: the padded batch (B, T, *) in the
    caller's order and the lengths (B,). `packed_inputs` makes it from torch's; JAX callers build it themselves."""
    padded: typing.Any
    lengths: typing.Any


def packed_inputs(tree):
    """`tree` with every PackedSequence replaced by its PackedInput (torch tensors)."""
    def one(x):
        if not isinstance(x, PackedSequence):
            return x
        padded, lengths = torch.nn.utils.rnn.pad_packed_sequence(x, batch_first=True)
        return PackedInput(padded, lengths)
    return torch.utils._pytree.tree_map(one, tree, is_leaf=lambda x: isinstance(x, PackedSequence))


def repacking(module: torch.nn.Module, example):
    """While capturing: forward receives PackedSequences again, packed from the PackedInputs it is given (with
    routing_packed active, a padded stand-in), so the program's inputs are the padded batch and the lengths."""
    from converters.structure import patched_forward
    is_packed = lambda x: isinstance(x, PackedInput)   # noqa: E731
    if not any(map(is_packed, torch.utils._pytree.tree_leaves(example, is_leaf=is_packed))):
        return contextlib.nullcontext()

    def repack(tree):
        def one(x):
            if not isinstance(x, PackedInput):
                return x
            return torch.nn.utils.rnn.pack_padded_sequence(x.padded, x.lengths, batch_first=True,
                                                           enforce_sorted=False)
        return torch.utils._pytree.tree_map(one, tree, is_leaf=lambda x: isinstance(x, PackedInput))

    def wrapper(forward):
        def packed_forward(*args, **kwargs):
            args, kwargs = repack((args, kwargs))
            return forward(*args, **kwargs)
        packed_forward.__signature__ = inspect.signature(forward)
        return packed_forward
    return patched_forward(module, wrapper)


"""Lowerings by op family; importing this package registers all of them."""
from converters.ops import (  # noqa: F401
    activation, backward, conv, creation, distance, elementwise, factorize, fft, indexing, linalg, loss, nn,
    numeric, polynomials, pool, quantize, random, reduction, resample, scatter, shape, solvers, sorting, special,
    symbolic,
    control_flow, ctc, custom_grad, custom_ops, flex_attention, rnn, transformer,
)

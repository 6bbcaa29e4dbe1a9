"""Named skip lists of the OpInfo sweep (tests/converters/ops/test_opinfo.py, scripts/op_coverage.py).

Keys are OpInfo names plus variant ("max.reduction_with_dim"); every value says why.

SKIPS is kept by hand: ops the test suite does not run at all (a crash, a hang). They count as failures
in docs/op_coverage.md unless torch.export cannot capture them.
NOT_EXPORTABLE, XFAIL_FORWARD and XFAIL_GRAD are regenerated from a full sweep by
`python scripts/op_coverage.py --all --write-skips` (NOT_EXPORTABLE: torch.export captures no sample,
so the op is outside the coverage denominators; XFAIL_*: known failures, marked xfail, not strict).
"""

# kept by hand
SKIPS: dict[str, str] = {
    'jiterator_2inputs_2outputs': 'jiterator kernels run on CUDA/ROCm only; torch eager cannot run them on CPU',
    'jiterator_4inputs_with_extra_args': 'jiterator kernels run on CUDA/ROCm only; torch eager cannot run them on CPU',
    'jiterator_binary': 'jiterator kernels run on CUDA/ROCm only; torch eager cannot run them on CPU',
    'jiterator_binary_return_by_ref': 'jiterator kernels run on CUDA/ROCm only; torch eager cannot run them on CPU',
    'jiterator_unary': 'jiterator kernels run on CUDA/ROCm only; torch eager cannot run them on CPU',
}

# kept by hand: why an op cannot pass (prefixed to its generated entries)
REASONS: dict[str, str] = {
    '__getitem__': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes)',
    'argwhere': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes)',
    'as_strided_scatter': "torch's own backward for `self` is wrong (OpInfo marks its gradient test expectedFailure): we return the true derivative",
    'bincount': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes)',
    'chalf': 'complex32 has no JAX dtype; torch eager cannot run these samples either',
    'combinations': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes)',
    'hash_tensor': 'returns uint64 hashes of the float64 bit patterns; JAX holds neither without jax_enable_x64, which the sweep leaves off',
    'linalg.lstsq': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes)',
    'linalg.lstsq.grad_oriented': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes)',
    'masked.normalize': 'normalizing over one or two elements: the true gradient is ~0 and torch and JAX both return rounding noise (float64 torch disagrees with float32 torch by as much); relative error divides noise by noise',
    'masked_select': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes)',
    'native_layer_norm': 'normalizing over one or two elements: the true gradient is ~0 and torch and JAX both return rounding noise (float64 torch disagrees with float32 torch by as much); relative error divides noise by noise',
    'nn.functional.ctc_loss': "torch's backward assumes log_probs came from log_softmax and returns the gradient as seen through it; we return the true derivative (the two agree upstream of a log_softmax: tests/converters/test_ctc.py)",
    'nn.functional.cosine_similarity': 'normalizing over one or two elements: the true gradient is ~0 and torch and JAX both return rounding noise (float64 torch disagrees with float32 torch by as much); relative error divides noise by noise',
    'nn.functional.group_norm': 'normalizing over one or two elements: the true gradient is ~0 and torch and JAX both return rounding noise (float64 torch disagrees with float32 torch by as much); relative error divides noise by noise',
    'nn.functional.layer_norm': 'normalizing over one or two elements: the true gradient is ~0 and torch and JAX both return rounding noise (float64 torch disagrees with float32 torch by as much); relative error divides noise by noise',
    'nn.functional.normalize': 'normalizing over one or two elements: the true gradient is ~0 and torch and JAX both return rounding noise (float64 torch disagrees with float32 torch by as much); relative error divides noise by noise',
    'nn.functional.rms_norm': 'normalizing over one or two elements: the true gradient is ~0 and torch and JAX both return rounding noise (float64 torch disagrees with float32 torch by as much); relative error divides noise by noise',
    'nonzero': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes)',
    'repeat_interleave': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes)',
    'tensor_split': 'data-dependent output shape: split points given as a tensor input become unbacked sizes, which cannot run under jax.jit (static shapes)',
    'unique': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes)',
    'unique_consecutive': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes)',
    'unravel_index': 'int64 values beyond the int32 range need jax_enable_x64, which the sweep leaves off',
}

# generated: torch.export captures none of the samples
NOT_EXPORTABLE: dict[str, str] = {
    'allclose': 'export-fail: [float32 sample 0] non-strict: DataDependentOutputException: aten.allclose.default',
    'corrcoef': 'export-fail: [float32 sample 0] non-strict: DataDependentOutputException: aten.equal.default',
    'cov': 'export-fail: [float32 sample 0] non-strict: DataDependentOutputException: aten.equal.default',
    'equal': 'export-fail: [float32 sample 0] non-strict: DataDependentOutputException: aten.equal.default',
    'linalg.lstsq': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes) [export-fail: [float32 sample 0] non-strict: DynamicOutputShapeException: aten.linalg_lstsq.default]',
    'linalg.lstsq.grad_oriented': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes) [export-fail: [float32 sample 0] non-strict: DynamicOutputShapeException: aten.linalg_lstsq.default]',
}

# generated: forward fails (xfail, not strict)
XFAIL_FORWARD: dict[str, str] = {
    '__getitem__': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes) [lowering-error: [float32 sample 14] LoweringError: indexing with a boolean mask has a data-dependent output shape; it cannot run under jax.jit (traced values have static shapes)]',
    'argwhere': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes) [lowering-error: [float32 sample 0] LoweringError: nonzero has a data-dependent output shape; it cannot run under jax.jit (traced values have static shapes)]',
    'bincount': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes) [unsupported: [int64 sample 0] missing lowerings: aten.bincount.default]',
    'combinations': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes) [lowering-error: [float32 sample 0] LoweringError: masked_select has a data-dependent output shape; it cannot run under jax.jit (traced values have static shapes)]',
    'hash_tensor': 'returns uint64 hashes of the float64 bit patterns; JAX holds neither without jax_enable_x64, which the sweep leaves off [unsupported: [float32 sample 0] missing lowerings: aten.hash_tensor.default]',
    'masked_select': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes) [lowering-error: [float32 sample 0] LoweringError: masked_select has a data-dependent output shape; it cannot run under jax.jit (traced values have static shapes)]',
    'nn.functional.multi_head_attention_forward': 'mismatch: [bfloat16 sample 24] output 0: 3/12 elements off; max abs err 4, max rel err 0.146444; worst at (0, 1): got 3.1875 vs 3.73438 (vs torch in float32: 3/12 elements off; max abs err 4.22723, ma…',
    'nonzero': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes) [lowering-error: [float32 sample 0] LoweringError: nonzero has a data-dependent output shape; it cannot run under jax.jit (traced values have static shapes)]',
    'repeat_interleave': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes) [lowering-error: [float32 sample 3] LoweringError: repeat_interleave without output_size has a data-dependent output shape; it cannot run under jax.jit (traced values have static shapes)]',
    'sparse.mm.reduce': 'lowering-error: [float32 sample 0] conversion: RuntimeError: Sparse CSR tensors do not have strides',
    'sparse.sampled_addmm': 'lowering-error: [float32 sample 0] conversion: RuntimeError: Sparse CSR tensors do not have strides',
    'tensor_split': 'data-dependent output shape: split points given as a tensor input become unbacked sizes, which cannot run under jax.jit (static shapes) [lowering-error: [float32 sample 0] LoweringError: aten.slice.Tensor failed (input shapes [(5, 5, 5), ()]): TracerIntegerConversionError: The __index__() method was called on traced array with shape in…]',
    'to_sparse': 'unsupported: [float32 sample 0] missing lowerings: aten._to_dense.default, aten._to_sparse.default, aten._to_sparse.sparse_dim',
    'unique': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes) [unsupported: [float32 sample 0] missing lowerings: aten._unique2.default, aten.unique_dim.default]',
    'unique_consecutive': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes) [unsupported: [float32 sample 0] missing lowerings: aten.unique_consecutive.default]',
    'unravel_index': 'int64 values beyond the int32 range need jax_enable_x64, which the sweep leaves off [mismatch: [int64 sample 4] output 1: 1/1 elements differ, e.g. at (): got 0 vs 9223372036854775806]',
}

# generated: grad fails (xfail, not strict)
XFAIL_GRAD: dict[str, str] = {
    'as_strided_scatter': "torch's own backward for `self` is wrong (OpInfo marks its gradient test expectedFailure): we return the true derivative [mismatch: [float32 sample 0] grad of input 0 (1,): rel err 1 > 0.0001 (vs float64 torch: 1)]",
    'combinations': 'data-dependent output shape: torch.export gives the result an unbacked size, which cannot run under jax.jit (static shapes) [lowering-error: [float32 sample 0] jax.grad: LoweringError: masked_select has a data-dependent output shape; it cannot run under jax.jit (traced values have static shapes)]',
    'masked.normalize': 'normalizing over one or two elements: the true gradient is ~0 and torch and JAX both return rounding noise (float64 torch disagrees with float32 torch by as much); relative error divides noise by noise [mismatch: [float32 sample 17] grad of input 0 (): rel err 3.73e+03 > 0.0001 (vs float64 torch: 3.73e+03)]',
    'native_layer_norm': 'normalizing over one or two elements: the true gradient is ~0 and torch and JAX both return rounding noise (float64 torch disagrees with float32 torch by as much); relative error divides noise by noise [mismatch: [float32 sample 10] grad of input 1 (1,): rel err 1 > 0.0001 (vs float64 torch: 0.015)]',
    'nn.functional.ctc_loss': "torch's backward assumes log_probs came from log_softmax and returns the gradient as seen through it; we return the true derivative (the two agree upstream of a log_softmax: tests/converters/test_ctc.py) [mismatch: [float32 sample 0] grad of input 0 (50, 16, 20): rel err 0.997 > 0.0001 (vs float64 torch: 0.997)]",
    'nn.functional.cosine_similarity': 'normalizing over one or two elements: the true gradient is ~0 and torch and JAX both return rounding noise (float64 torch disagrees with float32 torch by as much); relative error divides noise by noise [mismatch: [float32 sample 3] grad of input 1 (): rel err 2.98e+04 > 0.0001 (vs float64 torch: 2.98e+04)]',
    'nn.functional.group_norm': 'normalizing over one or two elements: the true gradient is ~0 and torch and JAX both return rounding noise (float64 torch disagrees with float32 torch by as much); relative error divides noise by noise [mismatch: [float32 sample 20] grad of input 0 (1, 2): rel err 1 > 0.0001 (vs float64 torch: 3.74)]',
    'nn.functional.layer_norm': 'normalizing over one or two elements: the true gradient is ~0 and torch and JAX both return rounding noise (float64 torch disagrees with float32 torch by as much); relative error divides noise by noise [mismatch: [float32 sample 5] grad of input 0 (1, 2): rel err 0.3 > 0.0001 (vs float64 torch: 0.164)]',
    'nn.functional.normalize': 'normalizing over one or two elements: the true gradient is ~0 and torch and JAX both return rounding noise (float64 torch disagrees with float32 torch by as much); relative error divides noise by noise [mismatch: [float32 sample 2] grad of input 0 (1, 2, 4, 5): rel err 1.21 > 0.0001 (vs float64 torch: 2.31e+06)]',
    'sparse.mm.reduce': 'lowering-error: [float32 sample 0] conversion: RuntimeError: Sparse CSR tensors do not have strides',
    'sparse.sampled_addmm': 'lowering-error: [float32 sample 0] conversion: RuntimeError: Sparse CSR tensors do not have strides',
    'tensor_split': 'data-dependent output shape: split points given as a tensor input become unbacked sizes, which cannot run under jax.jit (static shapes) [lowering-error: [float32 sample 0] jax.grad: LoweringError: aten.slice.Tensor failed (input shapes [(5, 5, 5), ()]): TracerIntegerConversionError: The __index__() method was called on traced array wit…]',
    'to_sparse': 'unsupported: [float32 sample 0] missing lowerings: aten._to_dense.default, aten._to_sparse.default, aten._to_sparse.sparse_dim',
}

"""The Triton interpreter's fp32 -> bf16 rounding, made to match the GPU's.

Triton defines a narrowing float cast (``x.to(tl.bfloat16)``, or a store of fp32 values into
a bf16 pointer) as round-to-nearest-even, and GPUs compile it to ``cvt.rn.bf16.f32``. The
interpreter (``TRITON_INTERPRET=1``, 3.6 to 3.9 at least) implements that cast by dropping
the low 16 bits: round toward zero, up to one bf16 ulp off instead of half an ulp, and
always towards zero, so the errors of successive layers add up instead of cancelling.

The tests run the Triton kernels in the interpreter to check their math; with
:func:`install_nearest_rounding` the interpreter rounds as a GPU does, so a kernel's bf16
accuracy is judged by what it computes, not by the interpreter's cast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

_TRUNCATING_CAST = None


def _interpreter():
    from triton.runtime import interpreter

    return interpreter


def _round_to_nearest(self, src, dst_type):
    """``create_fp_trunc`` rounding fp32 -> bf16 to nearest even (torch's cast), else unchanged."""
    import triton.language as tl

    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        values = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
        bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return _interpreter().TensorHandle(bits.reshape(src.data.shape), dst_type.scalar)
    return _TRUNCATING_CAST(self, src, dst_type)


def install_nearest_rounding() -> None:
    """Make the interpreter's fp32 -> bf16 casts round to nearest even (idempotent)."""
    global _TRUNCATING_CAST
    builder = _interpreter().InterpreterBuilder
    if _TRUNCATING_CAST is None:
        _TRUNCATING_CAST = builder.create_fp_trunc
    builder.create_fp_trunc = _round_to_nearest


@contextlib.contextmanager
def interpreter_truncates() -> Iterator[None]:
    """Within the block the interpreter casts fp32 -> bf16 by truncation again (its own way)."""
    builder = _interpreter().InterpreterBuilder
    installed = builder.create_fp_trunc
    builder.create_fp_trunc = _TRUNCATING_CAST or installed
    try:
        yield
    finally:
        builder.create_fp_trunc = installed

"""GPU-only tests (marker ``gpu``, tests/conftest.py MARKS): skipped without CUDA.

The Triton kernels (also summing shared block gradients) and the two-phase path on CUDA tensors
against the fp64 reference, bitwise determinism of the Triton backward, FLA's ``chunk_kda``
against the fp64 recurrence. The comparisons are the GPU check kit's
(``tools/gpu_check_cases.py``), at smaller shapes. Run on a GPU machine with
``TRITON_INTERPRET=0 python -m pytest -m gpu`` (tests/conftest.py defaults ``TRITON_INTERPRET``
to 1, which would run Triton's CPU interpreter instead of the compiled kernels);
``scripts/gpu_check.sh`` does.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path

import pytest
import torch

SHAPE = (256, 2, 2304)
compiled_triton = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" and torch.cuda.is_available(),  # no CUDA: conftest says so
    reason="TRITON_INTERPRET=1 runs Triton's CPU interpreter: run TRITON_INTERPRET=0 python -m pytest -m gpu",
)


@pytest.fixture
def cases(monkeypatch):
    """The kit's comparison module (tools/ on the path, as the tools import each other)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    return importlib.import_module("gpu_check_cases")


@compiled_triton
@pytest.mark.parametrize("block_h", [None, 512], ids=["single_tile", "tiled"])
@pytest.mark.parametrize("n", [1, 2, 5, 9])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_kernels_match_the_fp64_reference(cases, dtype, n, block_h):
    case = cases.fused_case(n, SHAPE, dtype, "cuda", block_h=block_h, seed=n)
    failed = {name: e for name, e in case["errors"].items() if not e["ok"]}
    assert not failed, failed


@compiled_triton
@pytest.mark.parametrize("hidden", [1000, 4096])
def test_triton_kernels_odd_and_wide_hidden(cases, hidden):
    case = cases.fused_case(3, (64, 2, hidden), "bf16", "cuda", seed=hidden)
    assert case["ok"], case


@compiled_triton
def test_triton_backward_is_bitwise_deterministic(cases):
    case = cases.fused_case(9, (2048, 1, 2304), "bf16", "cuda", seed=3)
    assert case["deterministic"]


@compiled_triton
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"]
)
def test_triton_kernels_sum_shared_block_gradients(dtype, tol):
    """``auto``'s shared block gradients on CUDA: the Triton backward kernels add into one buffer
    per block (tests/test_shared_gradients.py runs the same check on CPU and in the interpreter)."""
    from test_shared_gradients import assert_shared_sums_match

    from attnres_megatron.ops.triton_aggregate import aggregate_fused

    assert_shared_sums_match(aggregate_fused, dtype, tol, device="cuda")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_two_phase_on_cuda_matches_the_fp64_reference(cases, dtype):
    case = cases.two_phase_case(4, 4, SHAPE, dtype, "cuda", seed=4)
    assert case["ok"], case["errors"]


def test_fla_chunk_kda_matches_the_fp64_recurrence(cases):
    error = cases.fla_import_error()
    if error is not None:
        pytest.skip(f"flash-linear-attention does not import: {error}")
    outcome = cases.check_kda(dataclasses.replace(cases.GPU, kda_shape=(1, 256, 2, 64, 64)))
    assert outcome.status == "passed", outcome.reason
    assert {row["backend"] for row in outcome.figures["rows"]} == {"torch", "fla", "fla-naive"}

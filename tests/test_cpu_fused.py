"""The fused C++ CPU kernels (``--attn-res-impl fused`` on CPU tensors) against the reference."""

from __future__ import annotations

import os

import pytest
import torch

from attnres_megatron.ops import aggregate_reference
from attnres_megatron.ops.cpu_fused import aggregate_cpu_fused
from attnres_megatron.ops.dispatch import one_pass_function

EPS = 1e-6


def inputs(n: int, dtype: torch.dtype, shape=(9, 2, 40), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    sources = [
        (torch.randn(shape, generator=generator, dtype=torch.float64) * (1 + i)).to(dtype).requires_grad_()
        for i in range(n)
    ]
    query = torch.randn(shape[-1], generator=generator, dtype=stats).requires_grad_()
    gain = (torch.rand(shape[-1], generator=generator, dtype=stats) + 0.5).requires_grad_()
    grad = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return sources, query, gain, grad


def value_and_grads(fn, sources, query, gain, grad):
    out = fn(sources, query, gain, EPS)
    return out, torch.autograd.grad(out, [query, gain, *sources], grad)


def oracle(sources, query, gain, grad):
    """The reference op in fp64 on fp64 copies."""
    leaves = [s.detach().double().requires_grad_() for s in sources]
    q, g = (t.detach().double().requires_grad_() for t in (query, gain))
    return value_and_grads(aggregate_reference, leaves, q, g, grad.double())


@pytest.mark.parametrize("n", [1, 2, 5, 11])
def test_fp64_exact(n):
    sources, query, gain, grad = inputs(n, torch.float64, seed=n)
    out, grads = value_and_grads(aggregate_cpu_fused, sources, query, gain, grad)
    want, want_grads = oracle(sources, query, gain, grad)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"]
)
def test_low_precision_close_to_fp64(dtype, tol):
    sources, query, gain, grad = inputs(4, dtype, seed=3)
    out, grads = value_and_grads(aggregate_cpu_fused, sources, query, gain, grad)
    want, want_grads = oracle(sources, query, gain, grad)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads[2:])
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    for got, expected in zip(grads, want_grads):
        scale = expected.abs().max()
        assert (got.double() - expected).abs().max() <= tol * scale


def test_backward_is_bitwise_deterministic_and_thread_count_independent():
    sources, query, gain, grad = inputs(5, torch.float32, shape=(300, 2, 64), seed=9)
    threads, runs = torch.get_num_threads(), []
    try:  # twice with every core (at least two threads), then with one thread
        for count in (max(2, os.cpu_count() or 1),) * 2 + (1,):
            torch.set_num_threads(count)
            runs.append(value_and_grads(aggregate_cpu_fused, sources, query, gain, grad)[1])
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_non_contiguous_sources_and_partial_input_grads():
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(2, 9, 40, generator=generator, dtype=torch.float64)
    view = base.transpose(0, 1).requires_grad_(False)  # [9, 2, 40], not contiguous
    other = torch.randn(9, 2, 40, generator=generator, dtype=torch.float64).requires_grad_()
    query = torch.randn(40, generator=generator, dtype=torch.float64).requires_grad_()
    gain = torch.ones(40, dtype=torch.float64).requires_grad_()
    grad = torch.randn(9, 2, 40, generator=generator, dtype=torch.float64)
    out = aggregate_cpu_fused([view, other], query, gain, EPS)
    got = torch.autograd.grad(out, [query, gain, other], grad)
    want_out = aggregate_reference([view, other], query, gain, EPS)
    want = torch.autograd.grad(want_out, [query, gain, other], grad)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_fused_impl_routes_cpu_tensors_to_the_cpp_kernels():
    sources, query, gain, grad = inputs(3, torch.float64, seed=5)
    torch.testing.assert_close(
        one_pass_function("fused")(sources, query, gain, EPS),
        aggregate_cpu_fused(sources, query, gain, EPS),
        rtol=0,
        atol=0,
    )


def test_build_failure_names_the_fix(monkeypatch, tmp_path):
    from attnres_megatron.ops.cpu_extension import cpu_extension

    def broken(*args, **kwargs):
        raise OSError("no C++ compiler")

    cpu_extension.cache_clear()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no verified library to load instead
    monkeypatch.setattr("torch.utils.cpp_extension.load_inline", broken)
    try:
        with pytest.raises(RuntimeError, match="--attn-res-impl torch"):
            cpu_extension()
    finally:
        cpu_extension.cache_clear()


@pytest.mark.parametrize(
    ("dtype", "shape", "tol"),
    [(torch.float64, (1024, 1, 1024), 1e-11), (torch.float32, (1100, 1, 1001), 1e-4)],
    ids=["fp64_aligned_rows", "fp32_odd_rows"],
)
def test_streaming_stores_for_large_tensors(dtype, shape, tol):
    """Outputs of 4 MiB and more are written with streaming stores (aligned rows) or memcpy
    (rows off a 32-byte boundary, tails): fused and two-phase still equal the fp64 reference."""
    sources, query, gain, grad = inputs(3, dtype, shape=shape, seed=17)
    assert sources[0].nbytes >= 4 << 20
    assert_fused_and_two_phase_match(sources, query, gain, grad, tol)


TILE_BYTES = 256 << 10
"""``kTileBytes`` of ``csrc/rows.h``: the kernels read rows in tiles of this many bytes."""


def test_rows_spanning_several_tiles_fp64():
    """The kernels read ``TILE_BYTES / (row bytes x tensors read)`` rows per tile, tensor by tensor:
    with 16 KiB fp64 rows that is 5 rows forward (3 sources), 4 backward (and the gradient), 8 in
    two-phase's phase 1 (2 blocks), 4 in its block gradients (and 2 sublayer gradients); 300
    tokens (2 threads of 150, 64 gradient chunks of 5) end in partial tiles everywhere. Fused and
    two-phase still equal the fp64 reference."""
    hidden, row_bytes = 2048, 2048 * 8
    assert [TILE_BYTES // (row_bytes * k) for k in (3, 4, 2)] == [5, 4, 8]
    sources, query, gain, grad = inputs(3, torch.float64, shape=(300, 1, hidden), seed=23)
    assert_fused_and_two_phase_match(sources, query, gain, grad, 1e-11)


def assert_fused_and_two_phase_match(sources, query, gain, grad, tol: float) -> None:
    """The fused kernels on ``sources``, and two-phase with the first two as blocks and the third
    as a sublayer's partial, equal the fp64 reference within ``tol`` (gradients: ``tol`` of their
    largest entry)."""
    from attnres_megatron.ops.two_phase import TwoPhaseBlockAggregator

    out, grads = value_and_grads(aggregate_cpu_fused, sources, query, gain, grad)
    want, want_grads = oracle(sources, query, gain, grad)
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())

    blocks, partial = sources[:2], sources[2]
    agg = TwoPhaseBlockAggregator(blocks, [query, query], [gain, gain], EPS, backend="cpp")
    mixed = [agg.mix(0, None), agg.mix(1, partial)]
    leaves = [query, gain, *sources]
    got = torch.autograd.grad(mixed, leaves, [grad, grad])
    refs = [aggregate_reference(blocks, query, gain, EPS), aggregate_reference(sources, query, gain, EPS)]
    want = torch.autograd.grad(refs, leaves, [grad, grad])
    for a, b in zip(mixed, refs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())

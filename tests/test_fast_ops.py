"""Tests for the fast AttnRes operators: two-phase block computation and the fused Triton kernel.

CPU only. The Triton kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set
below before anything imports Triton); the Triton tests are skipped if Triton is missing.
"""

from __future__ import annotations

import os

# The tests pass CPU tensors, so the Triton kernels must run in the interpreter. Set this
# before the first ``import triton`` (Triton reads it when a kernel is decorated/launched).
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util
import sys
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from attnres_megatron.ops import aggregate_reference
from attnres_megatron.ops.two_phase import TwoPhaseBlockAggregator, phase_one, phase_two

EPS = 1e-6
HAS_TRITON = importlib.util.find_spec("triton") is not None
requires_triton = pytest.mark.skipif(
    not HAS_TRITON,
    reason="triton is not installed (pip install triton); its kernels run on CPU via TRITON_INTERPRET=1",
)


def rand(shape: Sequence[int], gen: torch.Generator, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    """Random leaf tensor (drawn in fp64 for reproducibility across dtypes) requiring grad."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def params(
    hidden: int, count: int, gen: torch.Generator, dtype: torch.dtype
) -> tuple[list[Tensor], list[Tensor]]:
    """``count`` random (query, gain) leaf pairs."""
    queries = [rand((hidden,), gen, dtype) for _ in range(count)]
    gains = [
        (1.0 + 0.3 * torch.randn(hidden, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
        for _ in range(count)
    ]
    return queries, gains


def assert_all_close(got: Sequence[Tensor | None], want: Sequence[Tensor | None], **tol: float) -> None:
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), k
        if a is not None:
            torch.testing.assert_close(a, b, **tol, msg=lambda m, k=k: f"tensor {k}: {m}")


# --------------------------------------------------------------------------------------------
# Two-phase computation
# --------------------------------------------------------------------------------------------

TWO_PHASE_CASES = [(1, 1), (1, 4), (2, 1), (3, 2), (4, 6), (9, 6), (5, 16)]


def run_block(
    n: int,
    n_sub: int,
    with_partial: bool,
    dtype: torch.dtype,
    seed: int,
    shape: Sequence[int] = (5, 2, 16),
    kernels: str = "auto",
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """One block: two-phase mixes vs ``aggregate_reference``; returns (outs, refs, grads, ref_grads)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = shape[-1]
    blocks = [rand(shape, gen, dtype, 0.5 + 0.25 * i) for i in range(n)]
    queries, gains = params(hidden, n_sub, gen, dtype)
    partials = [rand(shape, gen, dtype, 1.5) for _ in range(n_sub)]

    def partial(j: int) -> Tensor | None:
        return partials[j] if (with_partial or n == 0) else None

    agg = TwoPhaseBlockAggregator(blocks, queries, gains, EPS, backend=kernels)
    outs = [agg.mix(j, partial(j)) for j in range(n_sub)]
    refs = []
    for j in range(n_sub):
        sources = blocks + ([partials[j]] if partial(j) is not None else [])
        refs.append(aggregate_reference(sources, queries[j], gains[j], EPS))
    upstream = [torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(n_sub)]
    leaves = [*blocks, *queries, *gains, *partials]
    grads = torch.autograd.grad(outs, leaves, upstream, allow_unused=True)
    ref_grads = torch.autograd.grad(refs, leaves, upstream, allow_unused=True)
    return outs, refs, list(grads), list(ref_grads)


KERNELS = pytest.mark.parametrize("kernels", ["cpp", "torch"])


@KERNELS
@pytest.mark.parametrize("with_partial", [True, False], ids=["partial", "no_partial"])
@pytest.mark.parametrize(("n", "n_sub"), TWO_PHASE_CASES)
def test_two_phase_matches_reference_fp64(n: int, n_sub: int, with_partial: bool, kernels: str) -> None:
    outs, refs, grads, ref_grads = run_block(
        n, n_sub, with_partial, torch.float64, seed=100 * n + n_sub, kernels=kernels
    )
    for out in outs:
        assert out.dtype == torch.float64
    assert_all_close(outs, refs, rtol=1e-12, atol=1e-12)
    assert_all_close(grads, ref_grads, rtol=1e-10, atol=1e-11)


@KERNELS
@pytest.mark.parametrize("with_partial", [True, False], ids=["partial", "no_partial"])
@pytest.mark.parametrize(("n", "n_sub"), TWO_PHASE_CASES)
def test_two_phase_matches_reference_fp32(n: int, n_sub: int, with_partial: bool, kernels: str) -> None:
    outs, refs, grads, ref_grads = run_block(
        n, n_sub, with_partial, torch.float32, seed=7 + n + n_sub, kernels=kernels
    )
    assert_all_close(outs, refs, rtol=1e-5, atol=1e-5)
    assert_all_close(grads, ref_grads, rtol=1e-4, atol=1e-4)


@KERNELS
def test_two_phase_no_completed_blocks_returns_partial(kernels: str) -> None:
    outs, refs, grads, ref_grads = run_block(0, 2, True, torch.float64, seed=3, kernels=kernels)
    assert_all_close(outs, refs, rtol=0, atol=0)
    assert_all_close(grads, ref_grads, rtol=1e-12, atol=1e-12)


@KERNELS
def test_two_phase_bf16_close_to_reference(kernels: str) -> None:
    outs, refs, grads, ref_grads = run_block(
        4, 3, True, torch.bfloat16, seed=11, shape=(6, 2, 32), kernels=kernels
    )
    assert all(o.dtype == torch.bfloat16 for o in outs)
    assert_all_close(outs, refs, rtol=2 * 2.0**-8, atol=1e-2)
    assert_all_close(grads, ref_grads, rtol=2e-2, atol=2e-2)


def test_phase_one_stats_and_phase_two_without_partial() -> None:
    """o_j / d_j is the inter-block softmax mix; m_j is the max block logit."""
    gen = torch.Generator().manual_seed(5)
    blocks = [rand((4, 3, 8), gen, torch.float64) for _ in range(3)]
    queries, gains = params(8, 2, gen, torch.float64)
    stats = phase_one(blocks, torch.stack(queries).detach(), torch.stack(gains).detach(), EPS)
    assert len(stats) == 2 and stats.o is not None and stats.o.shape == (2, 4, 3, 8)
    for j in range(2):
        ref = aggregate_reference(blocks, queries[j], gains[j], EPS)
        torch.testing.assert_close(stats.o[j] / stats.d[j].unsqueeze(-1), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.m[j], stats.logits[j].max(0).values)
        torch.testing.assert_close(phase_two(stats[j], None, queries[j], gains[j], EPS), ref)


@KERNELS
def test_two_phase_saves_only_references_and_scalars(kernels: str) -> None:
    """Backward keeps the sources and per-token scalars, never a [T, h] fp32 accumulator."""
    gen = torch.Generator().manual_seed(9)
    s, b, h = 16, 2, 32
    blocks = [rand((s, b, h), gen, torch.float32) for _ in range(4)]
    partial = rand((s, b, h), gen, torch.float32)
    queries, gains = params(h, 3, gen, torch.float32)
    agg = TwoPhaseBlockAggregator(blocks, queries, gains, EPS, backend=kernels)
    packed: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        agg.mix(1, partial)
    sources = [*blocks, partial]
    big = [t for t in packed if t.numel() >= s * b * h]
    assert all(any(t is src for src in sources) for t in big), [tuple(t.shape) for t in big]


@KERNELS
def test_aggregator_releases_stats_after_last_mix(kernels: str) -> None:
    gen = torch.Generator().manual_seed(2)
    blocks = [rand((3, 1, 8), gen, torch.float32) for _ in range(2)]
    queries, gains = params(8, 2, gen, torch.float32)
    agg = TwoPhaseBlockAggregator(blocks, queries, gains, EPS, backend=kernels)
    agg.mix(0, None)
    agg.mix(1, blocks[0])
    with pytest.raises(RuntimeError, match="already mixed"):
        agg.mix(0, None)
    keep = TwoPhaseBlockAggregator(blocks, queries, gains, EPS, release_after_last=False, backend=kernels)
    first = keep.mix(0, None)
    keep.mix(1, None)
    torch.testing.assert_close(keep.mix(0, None), first)


def block_inputs(n: int, n_sub: int, seed: int, dtype=torch.float64, shape=(7, 2, 24)):
    """``n`` blocks, ``n_sub`` (query, gain) pairs and partials, and upstream gradients."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [rand(shape, gen, dtype, 0.5 + 0.25 * i) for i in range(n)]
    queries, gains = params(shape[-1], n_sub, gen, dtype)
    partials = [rand(shape, gen, dtype, 1.5) for _ in range(n_sub)]
    upstream = [torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(n_sub)]
    return blocks, queries, gains, partials, upstream


def test_two_phase_cpp_block_grads_once_per_backward_pass() -> None:
    """Block gradients are computed once per backward pass (phase-1 backward), from the
    sublayers that ran backward in it: two passes double them; a pass over some sublayers
    gives only theirs."""
    blocks, queries, gains, partials, upstream = block_inputs(3, 3, seed=21)
    agg = TwoPhaseBlockAggregator(blocks, queries, gains, EPS, backend="cpp")
    outs = [agg.mix(j, partials[j] if j else None) for j in range(3)]
    refs = [
        aggregate_reference(blocks + ([partials[j]] if j else []), queries[j], gains[j], EPS)
        for j in range(3)
    ]
    want = torch.autograd.grad(refs, blocks, upstream, retain_graph=True)
    torch.autograd.backward(outs, upstream, retain_graph=True)
    torch.autograd.backward(outs, upstream)
    for block, expected in zip(blocks, want):
        torch.testing.assert_close(block.grad, 2 * expected, rtol=1e-12, atol=1e-12)
    outs = _mix_all(blocks, queries, gains, partials)
    some = torch.autograd.grad([outs[0], outs[2]], blocks, [upstream[0], upstream[2]])
    want_some = torch.autograd.grad([refs[0], refs[2]], blocks, [upstream[0], upstream[2]])
    assert_all_close(list(some), list(want_some), rtol=1e-12, atol=1e-12)


def _mix_all(blocks, queries, gains, partials, kernels: str = "cpp") -> list[Tensor]:
    agg = TwoPhaseBlockAggregator(blocks, queries, gains, EPS, backend=kernels)
    return [agg.mix(j, partials[j] if j else None) for j in range(len(queries))]


def test_two_phase_cpp_backward_is_bitwise_deterministic_across_thread_counts() -> None:
    blocks, queries, gains, partials, upstream = block_inputs(
        4, 3, seed=5, dtype=torch.float32, shape=(300, 2, 64)
    )
    leaves = [*blocks, *queries, *gains, *partials[1:]]

    def grads() -> tuple[Tensor, ...]:
        return torch.autograd.grad(_mix_all(blocks, queries, gains, partials), leaves, upstream)

    threads, runs = torch.get_num_threads(), []
    try:  # twice with every core (at least two threads), then with one thread
        for count in (max(2, os.cpu_count() or 1),) * 2 + (1,):
            torch.set_num_threads(count)
            runs.append(grads())
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_two_phase_cpp_non_contiguous_blocks_and_frozen_inputs() -> None:
    gen = torch.Generator().manual_seed(13)
    base = rand((2, 7, 24), gen, torch.float64)
    view = base.transpose(0, 1)  # [7, 2, 24], not contiguous
    frozen = rand((7, 2, 24), gen, torch.float64).detach()
    blocks = [view, frozen]
    queries, gains = params(24, 2, gen, torch.float64)
    partials = [None, rand((7, 2, 24), gen, torch.float64)]
    upstream = [torch.randn(7, 2, 24, generator=gen, dtype=torch.float64) for _ in range(2)]
    outs = _mix_all(blocks, queries, gains, partials)
    refs = [
        aggregate_reference(blocks + ([partials[j]] if j else []), queries[j], gains[j], EPS)
        for j in range(2)
    ]
    assert_all_close(outs, refs, rtol=1e-12, atol=1e-12)
    leaves = [base, *queries, *gains, partials[1]]
    assert_all_close(
        list(torch.autograd.grad(outs, leaves, upstream)),
        list(torch.autograd.grad(refs, leaves, upstream)),
        rtol=1e-10,
        atol=1e-11,
    )


def test_two_phase_kernels_fall_back_to_eager_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from attnres_megatron.ops import cpu_extension, dispatch

    def broken() -> None:
        raise RuntimeError("C++ kernels unavailable; use --attn-res-impl torch")

    monkeypatch.setattr(cpu_extension, "cpu_extension", broken)
    blocks, queries, gains, partials, _ = block_inputs(2, 2, seed=1)
    with pytest.raises(RuntimeError, match="--attn-res-impl torch"):
        TwoPhaseBlockAggregator(blocks, queries, gains, EPS, backend="cpp")
    dispatch._warn_fallback.cache_clear()
    with pytest.warns(UserWarning, match="eager"):
        agg = TwoPhaseBlockAggregator(blocks, queries, gains, EPS)
    torch.testing.assert_close(agg.mix(0, None), aggregate_reference(blocks, queries[0], gains[0], EPS))
    with pytest.raises(ValueError, match="two-phase backend"):
        TwoPhaseBlockAggregator(blocks, queries, gains, EPS, backend="triton")


# --------------------------------------------------------------------------------------------
# Fused Triton kernel (interpreter on CPU)
# --------------------------------------------------------------------------------------------


def make_sources(
    n: int, seq: int, batch: int, hidden: int, dtype: torch.dtype, gen: torch.Generator
) -> list[Tensor]:
    """Non-contiguous ``[s, b, h]`` leaves: alternately transposed ``[b, s, h]`` storage and a
    hidden-strided slice, with distinct scales."""
    out = []
    for i in range(n):
        scale = 0.5 + 0.25 * i
        if i % 3 == 0:
            base = torch.randn(batch, seq, hidden, generator=gen, dtype=torch.float64) * scale
            leaf = base.to(dtype).requires_grad_()
            out.append(leaf.transpose(0, 1))
        elif i % 3 == 1:
            base = torch.randn(seq, batch, 2 * hidden, generator=gen, dtype=torch.float64) * scale
            leaf = base.to(dtype).requires_grad_()
            out.append(leaf[..., ::2])
        else:
            out.append(rand((seq, batch, hidden), gen, dtype, scale))
    return out


def fused_and_reference_grads(
    n: int,
    dtype: torch.dtype,
    block_h: int | None,
    seq: int = 7,
    batch: int = 3,
    hidden: int = 20,
    seed: int = 0,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    """Fused output/grads vs fp64 reference on the same (rounded) inputs; grads w.r.t. q, g, sources."""
    from attnres_megatron.ops.triton_aggregate import aggregate_fused

    gen = torch.Generator().manual_seed(seed)
    sources = make_sources(n, seq, batch, hidden, dtype, gen)
    (query,), (gain,) = params(hidden, 1, gen, torch.float32)
    grad_out = torch.randn(seq, batch, hidden, generator=gen, dtype=torch.float64).to(dtype).double()
    out = aggregate_fused(sources, query, gain, EPS, block_h=block_h)
    assert out.dtype == dtype and out.shape == (seq, batch, hidden)
    grads = torch.autograd.grad(out, [query, gain, *sources], grad_out.to(dtype))
    leaves = [t.detach().double().requires_grad_() for t in (query, gain, *sources)]
    ref = aggregate_reference(leaves[2:], leaves[0], leaves[1], EPS)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    return out, ref, list(grads), list(ref_grads)


@requires_triton
@pytest.mark.parametrize("block_h", [None, 8], ids=["single_tile", "tiled"])
@pytest.mark.parametrize("n", range(1, 9))
def test_fused_matches_reference_fp32(n: int, block_h: int | None) -> None:
    out, ref, grads, ref_grads = fused_and_reference_grads(n, torch.float32, block_h, seed=n)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@requires_triton
@pytest.mark.parametrize(
    ("dtype", "ulp"), [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)], ids=["bf16", "fp16"]
)
@pytest.mark.parametrize("block_h", [None, 8], ids=["single_tile", "tiled"])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_fused_low_precision(n: int, block_h: int | None, dtype: torch.dtype, ulp: float) -> None:
    out, ref, grads, ref_grads = fused_and_reference_grads(n, dtype, block_h, hidden=32, seed=20 + n)
    tol = {"rtol": 2 * ulp, "atol": 1e-4 if dtype == torch.float16 else 1e-3}
    torch.testing.assert_close(out.double(), ref, **tol)
    for got, want in zip(grads[2:], ref_grads[2:]):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol)
    for got, want in zip(grads[:2], ref_grads[:2]):  # query/gain grads stay fp32
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)


@requires_triton
@pytest.mark.parametrize("block_h", [None, 16], ids=["single_tile", "tiled"])
def test_fused_many_tokens_and_deterministic_backward(block_h: int | None) -> None:
    """Several token blocks per backward program; two backward runs are bitwise identical."""
    from attnres_megatron.ops.triton_aggregate import aggregate_fused

    gen = torch.Generator().manual_seed(4)
    sources = make_sources(4, 100, 2, 40, torch.float32, gen)
    (query,), (gain,) = params(40, 1, gen, torch.float32)
    grad_out = torch.randn(100, 2, 40, generator=gen)
    runs = []
    for _ in range(2):
        out = aggregate_fused(sources, query, gain, EPS, block_h=block_h)
        runs.append(torch.autograd.grad(out, [query, gain, *sources], grad_out))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ref = aggregate_reference(sources, query, gain, EPS)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ref_grads = torch.autograd.grad(ref, [query, gain, *sources], grad_out)
    assert_all_close(runs[0], ref_grads, rtol=1e-4, atol=1e-4)


@requires_triton
def test_fused_other_layouts_and_limits() -> None:
    from attnres_megatron.ops.triton_aggregate import MAX_SOURCES, aggregate_fused

    gen = torch.Generator().manual_seed(6)
    (query,), (gain,) = params(12, 1, gen, torch.float32)
    for shape in [(12,), (5, 12), (2, 3, 2, 12)]:
        sources = [rand(shape, gen, torch.float32) for _ in range(3)]
        torch.testing.assert_close(
            aggregate_fused(sources, query, gain, EPS), aggregate_reference(sources, query, gain, EPS)
        )
    with pytest.raises(ValueError, match="at least one"):
        aggregate_fused([], query, gain, EPS)
    too_many = [torch.randn(2, 12) for _ in range(MAX_SOURCES + 1)]
    with pytest.raises(ValueError, match="at most"):
        aggregate_fused(too_many, query, gain, EPS)
    sixteen = too_many[:MAX_SOURCES]
    torch.testing.assert_close(
        aggregate_fused(sixteen, query, gain, EPS), aggregate_reference(sixteen, query, gain, EPS)
    )


def test_missing_triton_gives_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Triton the module still imports; using it raises the install hint."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.find_spec("attnres_megatron.ops.triton_aggregate")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a fresh copy, imported while triton is unavailable
    message = "--attn-res-impl fused needs Triton: pip install 'attnres-megatron[triton]'"
    with pytest.raises(ImportError, match=r"attn-res-impl fused needs Triton: pip install") as info:
        module.require_triton()
    assert message in str(info.value) and "TRITON_INTERPRET=1" in str(info.value)
    with pytest.raises(ImportError, match="needs Triton"):
        module.aggregate_fused([torch.randn(2, 4)], torch.zeros(4), torch.ones(4), EPS)

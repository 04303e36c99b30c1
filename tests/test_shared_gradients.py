"""Completed blocks' gradients summed in place by the backward kernels of their readers
(``--attn-res-impl auto`` in training, C++ kernels on CPU, Triton kernels on GPU, here under
Triton's interpreter): same gradients as autograd's sum, one buffer."""

from __future__ import annotations

import os

# The Triton cases pass CPU tensors: set before anything imports Triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util

import pytest
import torch
from test_dispatch import EPS, inputs
from test_model import make_config
from test_recompute import BLOCK, RECOMPUTE_MODES, assert_same, loss_and_grads

from attnres_megatron.layers import mixers
from attnres_megatron.ops import cpu_fused, dispatch
from attnres_megatron.ops.cpu_fused import aggregate_cpu_fused
from attnres_megatron.ops.dispatch import choose, sums_gradients_in_place
from attnres_megatron.ops.reference import aggregate_reference
from attnres_megatron.ops.shared_gradients import SharedGradient


def readers_of_two_blocks(aggregate, blocks, partials, queries, gains, upstream):
    """Three sublayers reading ``blocks`` (and their own partial): sum of their weighted outputs."""
    total = 0
    for partial, query, gain, grad in zip(partials, queries, gains, upstream):
        total = total + (aggregate([*blocks, partial], query, gain) * grad).sum()
    return total


def three_readers(dtype, device: str = "cpu"):
    """Two shared blocks, three readers with their own partial, query, gain and upstream gradient."""
    parts = [inputs(3, dtype, seed=seed) for seed in (1, 2, 3)]

    def leaf(t):
        return t.detach().to(device).requires_grad_() if device != "cpu" else t

    blocks = [leaf(b) for b in parts[0][0][:2]]
    partials = [leaf(p[0][2]) for p in parts]
    queries, gains = [leaf(p[1]) for p in parts], [leaf(p[2]) for p in parts]
    return blocks, partials, queries, gains, [p[3].to(device) for p in parts]


def shared_aggregation(kernels: str):
    """``fn(sources, query, gain, eps, shared)`` of the C++ kernels or of the Triton kernels (run
    by Triton's interpreter on these CPU tensors)."""
    if kernels == "cpp":
        return aggregate_cpu_fused
    from attnres_megatron.ops.triton_aggregate import aggregate_fused

    return aggregate_fused


requires_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)"
)


@pytest.mark.parametrize(
    ("kernels", "dtype", "tol"),
    [
        ("cpp", torch.float64, 1e-12),
        ("cpp", torch.float32, 2e-5),
        ("cpp", torch.bfloat16, 3e-2),
        pytest.param("triton", torch.float32, 2e-5, marks=requires_triton),
        pytest.param("triton", torch.bfloat16, 3e-2, marks=requires_triton),
    ],
)
def test_shared_block_gradients_equal_the_fp64_reference(kernels, dtype, tol):
    """Three readers of two blocks: the last to run backward writes each block's gradient and the
    others add into it (a kernel that wrote instead of adding, or added to an unwritten buffer,
    would give other sums)."""
    assert_shared_sums_match(shared_aggregation(kernels), dtype, tol)


def assert_shared_sums_match(aggregate, dtype: torch.dtype, tol: float, device: str = "cpu") -> None:
    """``aggregate(sources, query, gain, eps, shared)`` over :func:`three_readers` on ``device``:
    every gradient equals the fp64 reference's, and the shared buffers were handed on."""
    blocks, partials, queries, gains, upstream = three_readers(dtype, device)
    leaves = [*blocks, *partials, *queries, *gains]
    shared = [SharedGradient(b) for b in blocks]

    def ours(sources, query, gain):
        return aggregate(sources, query, gain, EPS, (*shared, None))

    got = torch.autograd.grad(readers_of_two_blocks(ours, blocks, partials, queries, gains, upstream), leaves)
    copies = [t.detach().cpu().double().requires_grad_() for t in leaves]
    n = len(blocks)

    def reference(sources, query, gain):
        return aggregate_reference(sources, query, gain, EPS)

    total = readers_of_two_blocks(
        reference,
        copies[:n],
        copies[n : n + 3],
        copies[n + 3 : n + 6],
        copies[n + 6 :],
        [g.cpu().double() for g in upstream],
    )
    want = torch.autograd.grad(total, copies)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu().double(), b, rtol=tol, atol=tol)
    assert all(s.gradient.buffer is None for s in shared)  # handed on and released


def test_later_readers_add_into_the_first_gradient(monkeypatch):
    """In backward the last reader writes the block gradient, the earlier ones add into it."""
    blocks, partials, queries, gains, upstream = three_readers(torch.float32)
    shared = [SharedGradient(b) for b in blocks]
    real = cpu_fused.cpu_extension()
    seen = []

    class Recording:
        def __getattr__(self, name):
            return getattr(real, name)

        def fused_backward(self, *args):
            accumulate = args[-1]
            seen.append([t.data_ptr() if t.numel() else None for t in accumulate])
            return real.fused_backward(*args)

    monkeypatch.setattr(cpu_fused, "cpu_extension", lambda: Recording())

    def ours(sources, query, gain):
        return aggregate_cpu_fused(sources, query, gain, EPS, (*shared, None))

    readers_of_two_blocks(ours, blocks, partials, queries, gains, upstream).backward()
    assert len(seen) == 3
    assert seen[0] == [None, None, None]  # the last reader: fresh gradients
    assert seen[1][:2] == seen[2][:2] and None not in seen[1][:2]  # one buffer per block
    assert seen[1][2] is None and seen[2][2] is None  # partials are never shared
    for block in blocks:  # autograd got one gradient per block: the shared buffer
        assert block.grad is not None and block.grad.data_ptr() in seen[1][:2]


def test_a_reader_returning_its_own_gradient_through_the_alias_is_added():
    """A reader that takes a block's alias but returns its own gradient (a plain call): autograd
    sums it for the alias and the collecting node adds it to the shared buffer (fp64, against
    the reference; the other readers add in place)."""
    blocks, partials, queries, gains, upstream = three_readers(torch.float64)
    shared = [SharedGradient(b) for b in blocks]
    aliases = [s.alias for s in shared]
    total = 0
    for index, (partial, query, gain, grad) in enumerate(zip(partials, queries, gains, upstream)):
        if index == 1:  # the plain reader, between two in-place ones in backward
            mixed = aggregate_reference([*aliases, partial], query, gain, EPS)
        else:
            mixed = aggregate_cpu_fused([*blocks, partial], query, gain, EPS, (*shared, None))
        total = total + (mixed * grad).sum()
    got = torch.autograd.grad(total, blocks)
    want = torch.autograd.grad(
        readers_of_two_blocks(
            lambda sources, query, gain: aggregate_reference(sources, query, gain, EPS),
            blocks,
            partials,
            queries,
            gains,
            upstream,
        ),
        blocks,
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_second_backward_of_a_kept_graph_starts_from_zero():
    blocks, partials, queries, gains, upstream = three_readers(torch.float64)
    shared = [SharedGradient(b) for b in blocks]

    def ours(sources, query, gain):
        return aggregate_cpu_fused(sources, query, gain, EPS, (*shared, None))

    total = readers_of_two_blocks(ours, blocks, partials, queries, gains, upstream)
    (first,) = torch.autograd.grad(total, blocks[:1], retain_graph=True)
    (second,) = torch.autograd.grad(total, blocks[:1])
    assert torch.equal(first, second)


@pytest.mark.parametrize("fields", [dict(attention_residuals="full"), BLOCK], ids=["full", "block_S3"])
@pytest.mark.parametrize("mode", ["none", "full_uniform_1", "selective_attn_res"])
def test_auto_training_equals_the_plain_kernels(reseed, monkeypatch, fields, mode):
    """fp32 model: ``auto`` (shared block gradients) against ``fused`` (autograd sums), and how
    many blocks shared their gradient."""
    made = []
    real = mixers.SharedGradient
    monkeypatch.setattr(mixers, "SharedGradient", lambda t: made.append(t) or real(t))
    plain = loss_and_grads(reseed, torch.float32, num_layers=3, **fields, attn_res_impl="fused")
    assert not made
    shared = loss_and_grads(
        reseed, torch.float32, num_layers=3, **fields, attn_res_impl="auto", **RECOMPUTE_MODES[mode]
    )
    assert_same(shared, plain, 1e-5)  # autograd adds the final mix's part in another order
    config = make_config(num_layers=3, **fields)
    per_block = config.attn_res_sublayers_per_block
    sealed_before_last = (2 * config.num_layers - 1) // per_block  # blocks the last sublayer reads
    if mode.startswith("full_"):  # one layer per recompute group: the recomputed groups made their own
        assert len(made) >= 1 + sealed_before_last
    else:  # the embedding and every sealed block (with attn_res recompute: for the output mix only)
        assert len(made) == 1 + sealed_before_last


def test_the_choice_and_its_log_line(monkeypatch):
    assert sums_gradients_in_place("auto", "one-pass", "cpu", torch.float32)
    assert not sums_gradients_in_place("fused", "one-pass", "cpu", torch.float32)
    assert not sums_gradients_in_place("auto", "two-phase", "cpu", torch.float32)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)  # a GPU with Triton, faked
    assert sums_gradients_in_place("auto", "one-pass", "cuda", torch.bfloat16)
    assert not sums_gradients_in_place("auto", "one-pass", "cuda", torch.float64)  # the eager op
    assert choose("auto", "cuda", torch.bfloat16).describe() == (
        "AttnRes aggregation: --attn-res-impl auto -> one-pass with the Triton kernels "
        "(cuda, bfloat16, block gradients summed in place)"
    )
    assert dispatch.shared_gradient_function("cuda", dispatch.MAX_TRITON_SOURCES) is not None
    assert dispatch.shared_gradient_function("cuda", dispatch.MAX_TRITON_SOURCES + 1) is None
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert not sums_gradients_in_place("auto", "one-pass", "cuda", torch.bfloat16)
    with torch.no_grad():
        assert not sums_gradients_in_place("auto", "one-pass", "cpu", torch.float32)
        assert "in place" not in choose("auto", "cpu", torch.float32).describe()
    assert choose("auto", "cpu", torch.float32, "full").describe() == (
        "AttnRes aggregation: --attn-res-impl auto -> one-pass with the C++ kernels "
        "(cpu, float32, block gradients summed in place)"
    )


def test_no_reference_cycle_keeps_a_step_alive():
    """After backward and the step's end, the shared gradients are freed without the cyclic GC."""
    import gc
    import weakref

    def one_step():
        blocks, partials, queries, gains, upstream = three_readers(torch.float32)
        shared = [SharedGradient(b) for b in blocks]

        def ours(sources, query, gain):
            return aggregate_cpu_fused(sources, query, gain, EPS, (*shared, None))

        readers_of_two_blocks(ours, blocks, partials, queries, gains, upstream).backward()
        return [weakref.ref(s) for s in shared] + [weakref.ref(s.gradient) for s in shared]

    gc.disable()
    try:
        assert all(ref() is None for ref in one_step())
    finally:
        gc.enable()


def test_calls_beyond_the_kernels_source_limit_fall_back_to_plain_calls(reseed, monkeypatch):
    """Mixes with more sources than the shared-gradient kernels take (the Triton kernels' 128 on
    GPU; faked here as 3) run as plain calls whose block gradients autograd adds: same gradients."""
    real = dispatch.shared_gradient_function
    limited = []

    def at_most_three(device_type, num_sources):
        limited.append(num_sources > 3)
        return None if num_sources > 3 else real(device_type, num_sources)

    monkeypatch.setattr(mixers, "shared_gradient_function", at_most_three)
    fields = dict(attention_residuals="full")
    shared = loss_and_grads(reseed, torch.float32, num_layers=3, **fields, attn_res_impl="auto")
    assert any(limited) and not all(limited)
    plain = loss_and_grads(reseed, torch.float32, num_layers=3, **fields, attn_res_impl="fused")
    assert_same(shared, plain, 1e-5)

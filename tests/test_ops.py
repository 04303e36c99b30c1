"""Correctness and memory tests for the AttnRes depth-aggregation operators (CPU only)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from attnres_megatron.ops import aggregate, aggregate_reference

EPS = 1e-6
SHAPE = (3, 2, 8)  # Megatron layout [s, b, h]


def oracle(sources: Sequence[Tensor], query: Tensor, gain: Tensor, eps: float) -> Tensor:
    """Independent fp64 statement of the math, written with plain differentiable torch ops."""
    values = [v.double() for v in sources]
    q, g = query.double(), gain.double()
    logits = []
    for v in values:
        rms = torch.sqrt((v * v).mean(dim=-1, keepdim=True) + eps)
        logits.append((q * (g * v / rms)).sum(dim=-1))
    peak = torch.stack(logits).max(dim=0).values.detach()
    weights = [torch.exp(logit - peak) for logit in logits]
    total = sum(weights)
    return sum((w / total).unsqueeze(-1) * v for w, v in zip(weights, values))


def make_inputs(
    n: int,
    shape: Sequence[int] = SHAPE,
    dtype: torch.dtype = torch.float64,
    param_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Random leaf sources (with distinct scales) and non-zero query/gain, all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    param_dtype = dtype if param_dtype is None else param_dtype
    hidden = shape[-1]
    sources = [
        (torch.randn(*shape, generator=gen, dtype=torch.float64) * (0.5 + 0.25 * i))
        .to(dtype)
        .requires_grad_()
        for i in range(n)
    ]
    query = torch.randn(hidden, generator=gen, dtype=torch.float64).to(param_dtype)
    gain = (1.0 + 0.3 * torch.randn(hidden, generator=gen, dtype=torch.float64)).to(param_dtype)
    return sources, query.requires_grad_(), gain.requires_grad_()


def value_and_grads(
    fn, sources: Sequence[Tensor], query: Tensor, gain: Tensor, grad_out: Tensor
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Forward ``fn`` and return (output, grads w.r.t. (query, gain, *sources))."""
    out = fn(sources, query, gain, EPS)
    grads = torch.autograd.grad(out, (query, gain, *sources), grad_out.to(out.dtype))
    return out, grads


def oracle_value_and_grads(
    sources: Sequence[Tensor], query: Tensor, gain: Tensor, grad_out: Tensor
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """fp64 oracle output and grads, evaluated on fp64 copies of the (possibly rounded) inputs."""
    leaves = [t.detach().double().requires_grad_() for t in (query, gain, *sources)]
    q, g, *srcs = leaves
    out = oracle(srcs, q, g, EPS)
    return out, torch.autograd.grad(out, leaves, grad_out.double())


def upstream(shape: Sequence[int], seed: int = 1) -> Tensor:
    """Fixed random upstream gradient in fp64."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("n", range(1, 11))
def test_gradcheck_fp64(n: int) -> None:
    sources, query, gain = make_inputs(n, seed=n)

    def fn(q: Tensor, g: Tensor, *srcs: Tensor) -> Tensor:
        return aggregate(srcs, q, g, EPS)

    assert torch.autograd.gradcheck(fn, (query, gain, *sources), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("fn", [aggregate, aggregate_reference], ids=["aggregate", "reference"])
def test_matches_oracle_fp64(fn, n: int) -> None:
    sources, query, gain = make_inputs(n, shape=(5, 3, 16), seed=10 + n)
    grad_out = upstream((5, 3, 16))
    out, grads = value_and_grads(fn, sources, query, gain, grad_out)
    expected, expected_grads = value_and_grads(oracle, sources, query, gain, grad_out)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_zero_query_gives_mean_and_query_grad(n: int) -> None:
    sources, _, gain = make_inputs(n, shape=(4, 2, 16), dtype=torch.float32, seed=20 + n)
    query = torch.zeros(16, requires_grad=True)
    out = aggregate(sources, query, gain, EPS)
    mean = torch.stack([v.detach() for v in sources]).mean(0)
    torch.testing.assert_close(out, mean, rtol=2e-7, atol=2e-7)
    out.backward(upstream((4, 2, 16)).float())
    assert query.grad is not None and gain.grad is not None
    if n > 1:
        assert query.grad.abs().sum() > 0
        # d/d gain = d/d(query*gain) * query, which vanishes at query = 0.
        assert torch.count_nonzero(gain.grad) == 0


@pytest.mark.parametrize(
    ("dtype", "ulp"), [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)], ids=["bf16", "fp16"]
)
@pytest.mark.parametrize("n", [1, 3, 6])
def test_low_precision_matches_fp64_oracle(dtype: torch.dtype, ulp: float, n: int) -> None:
    """Low-precision sources, fp32 query/gain: results within ~1 ulp of the input dtype.

    The op computes in fp32 and rounds once on output, so the error versus the fp64 oracle
    evaluated on the same (already rounded) inputs is half an ulp from the final rounding plus
    fp32 noise. We allow 2 ulp relative (``2 * 2**-8`` for bf16, ``2 * 2**-11`` for fp16) plus
    a small absolute term for entries that cancel towards zero.
    """
    shape = (6, 2, 32)
    sources, query, gain = make_inputs(n, shape=shape, dtype=dtype, param_dtype=torch.float32)
    grad_out = upstream(shape).to(dtype)
    out, grads = value_and_grads(aggregate, sources, query, gain, grad_out)
    expected, expected_grads = oracle_value_and_grads(sources, query, gain, grad_out)

    assert out.dtype == dtype
    tol = {"rtol": 2 * ulp, "atol": 1e-4}
    torch.testing.assert_close(out.double(), expected, **tol)
    for got, want, src in zip(grads[2:], expected_grads[2:], sources):
        assert got.dtype == src.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol)
    # Query/gain gradients stay fp32 and are fp32-accurate.
    for got, want in zip(grads[:2], expected_grads[:2]):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [2, 5])
def test_fp32_accuracy(n: int) -> None:
    shape = (6, 2, 32)
    sources, query, gain = make_inputs(n, shape=shape, dtype=torch.float32, seed=30 + n)
    grad_out = upstream(shape).float()
    out, grads = value_and_grads(aggregate, sources, query, gain, grad_out)
    expected, expected_grads = oracle_value_and_grads(sources, query, gain, grad_out)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def _packed_tensors(fn, sources: Sequence[Tensor], query: Tensor, gain: Tensor) -> list[Tensor]:
    """Run ``fn`` forward and return every tensor autograd saved for backward."""
    packed: list[Tensor] = []

    def pack(tensor: Tensor) -> Tensor:
        packed.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(sources, query, gain, EPS)
    return packed


def _is_source(tensor: Tensor, sources: Sequence[Tensor]) -> bool:
    return any(
        tensor is src
        or (tensor.data_ptr() == src.data_ptr() and tensor.shape == src.shape and tensor.dtype == src.dtype)
        for src in sources
    )


@pytest.mark.parametrize("n", [2, 5])
def test_saved_for_backward_is_lean(n: int) -> None:
    s, b, h = 16, 2, 32
    sources, query, gain = make_inputs(n, shape=(s, b, h), dtype=torch.float32, seed=40 + n)

    packed = _packed_tensors(aggregate, sources, query, gain)
    extra = [t for t in packed if not _is_source(t, sources)]
    assert sum(_is_source(t, sources) for t in packed) == n
    assert all(t.numel() < s * b * h for t in extra), [tuple(t.shape) for t in extra]
    extra_bytes = sum(t.numel() * t.element_size() for t in extra)
    assert extra_bytes <= 2 * n * s * b * 4 + 2 * h * 4

    # The plain-autograd reference keeps full-size intermediates; the check can tell.
    ref_packed = _packed_tensors(aggregate_reference, sources, query, gain)
    ref_extra = [t for t in ref_packed if not _is_source(t, sources)]
    assert any(t.numel() >= s * b * h for t in ref_extra)
    assert sum(t.numel() * t.element_size() for t in ref_extra) > 2 * n * s * b * 4 + 2 * h * 4


def test_single_source_is_identity() -> None:
    sources, query, gain = make_inputs(1, shape=(4, 2, 16), dtype=torch.float32)
    (source,) = sources
    out = aggregate(sources, query, gain, EPS)
    assert torch.equal(out, source.detach())
    grad_out = upstream((4, 2, 16)).float()
    out.backward(grad_out)
    assert torch.equal(source.grad, grad_out)
    for param in (query, gain):
        assert param.grad is not None
        assert param.grad.shape == param.shape
        assert torch.count_nonzero(param.grad) == 0


def test_zero_sources_raises() -> None:
    query, gain = torch.randn(8), torch.ones(8)
    with pytest.raises(ValueError):
        aggregate([], query, gain, EPS)


@pytest.mark.parametrize("layout", ["transposed", "strided_hidden", "2d"])
def test_layouts(layout: str) -> None:
    n, h = 4, 16
    gen = torch.Generator().manual_seed(50)
    if layout == "transposed":  # [b, s, h] storage viewed as [s, b, h]
        bases = [torch.randn(2, 5, h, generator=gen, dtype=torch.float64) for _ in range(n)]
        sources = [base.requires_grad_().transpose(0, 1) for base in bases]
    elif layout == "strided_hidden":  # every other element of a wider hidden dim
        bases = [torch.randn(5, 2, 2 * h, generator=gen, dtype=torch.float64) for _ in range(n)]
        sources = [base.requires_grad_()[..., ::2] for base in bases]
    else:  # [t, h]
        bases = [torch.randn(7, h, generator=gen, dtype=torch.float64) for _ in range(n)]
        sources = [base.requires_grad_() for base in bases]
    if layout != "2d":
        assert not any(src.is_contiguous() for src in sources)
    query = torch.randn(h, generator=gen, dtype=torch.float64, requires_grad=True)
    gain = torch.rand(h, generator=gen, dtype=torch.float64).add(0.5).requires_grad_()

    grad_out = upstream(sources[0].shape)
    out = aggregate(sources, query, gain, EPS)
    grads = torch.autograd.grad(out, (query, gain, *bases), grad_out)
    expected = oracle(sources, query, gain, EPS)
    expected_grads = torch.autograd.grad(expected, (query, gain, *bases), grad_out)
    assert out.shape == sources[0].shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

"""``--attn-res-impl``: one dispatch decides algorithm and backend; ``auto`` picks as documented."""

from __future__ import annotations

import pytest
import torch

from attnres_megatron.ops import dispatch
from attnres_megatron.ops.dispatch import (
    ATTN_RES_IMPLS,
    algorithm_for,
    backend_for,
    choose,
    one_pass_function,
)
from attnres_megatron.ops.reference import aggregate_reference

EPS = 1e-6


def fp64_oracle(sources, query, gain, grad):
    """Output and gradients of the plain-autograd reference on fp64 copies."""
    leaves = [t.detach().double().requires_grad_() for t in (query, gain, *sources)]
    out = aggregate_reference(leaves[2:], leaves[0], leaves[1], EPS)
    return out, torch.autograd.grad(out, leaves, grad.double())


def inputs(n: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sources = [
        (torch.randn(7, 2, 24, generator=generator) * (1 + i)).to(dtype).requires_grad_() for i in range(n)
    ]
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    query = torch.randn(24, generator=generator, dtype=stats).requires_grad_()
    gain = (torch.rand(24, generator=generator, dtype=stats) + 0.5).requires_grad_()
    return sources, query, gain, torch.randn(7, 2, 24, generator=generator).to(dtype)


def test_every_impl_has_an_algorithm():
    assert {impl: algorithm_for(impl, "full") for impl in ATTN_RES_IMPLS} == {
        "auto": "one-pass",
        "torch": "one-pass",
        "fused": "one-pass",
        "two-phase": "two-phase",
        "reference": "one-pass",
    }
    with pytest.raises(ValueError, match="--attn-res-impl must be one of auto"):
        algorithm_for("fast")


BIG = dispatch.TWO_PHASE_MIN_BYTES


@pytest.mark.parametrize(
    ("mode", "device_type", "recompute", "stream_bytes", "want"),
    [
        ("block", "cpu", False, BIG, "two-phase"),
        ("block", "cpu", False, BIG - 1, "one-pass"),  # in cache: per-call overhead dominates
        ("block", "cpu", True, BIG, "one-pass"),  # two-phase frees its statistics: no recompute
        ("full", "cpu", False, BIG, "one-pass"),
        ("block", "cuda", False, BIG, "one-pass"),
    ],
)
def test_auto_algorithm(mode, device_type, recompute, stream_bytes, want):
    assert algorithm_for("auto", mode, device_type, recompute, stream_bytes) == want


def test_the_model_decides_from_its_own_tensors():
    from types import SimpleNamespace

    from attnres_megatron.layers.depth_state import DepthState
    from attnres_megatron.layers.mixers import with_mixers

    config = SimpleNamespace(
        attn_res_impl="auto",
        attention_residuals="block",
        attn_res_recompute=False,
        attn_res_sublayers_per_block=2,
    )
    small = DepthState.from_embedding(torch.zeros(512, 1, 256))  # hidden 256, 512 tokens: 0.5 MiB
    large = DepthState.from_embedding(torch.zeros(1024, 1, 1024))  # 4 MiB

    def mixing(state):
        factory = with_mixers(state, [], config).mixer_factory
        return (
            None
            if factory is None
            else getattr(factory, "__qualname__", type(factory).__name__).split(".")[0]
        )

    assert mixing(small) == "SharedGradients"  # one pass, block gradients summed in place
    assert mixing(large) == "two_phase_factory"
    with torch.no_grad():
        assert mixing(large) is None and mixing(small) is None
    config.attn_res_impl = "fused"
    assert mixing(small) is None and mixing(large) is None


def test_stream_bytes_follow_the_split_sequence():
    from types import SimpleNamespace

    config = SimpleNamespace(
        context_parallel_size=2,
        sequence_parallel=True,
        tensor_model_parallel_size=2,
        hidden_size=256,
        params_dtype=torch.bfloat16,
    )
    assert dispatch.stream_bytes(config, seq_length=4096, micro_batch_size=2) == 4096 * 2 // 4 * 256 * 2


def test_auto_block_on_cpu_without_cpp_is_one_pass(monkeypatch):
    monkeypatch.setattr(dispatch, "cpp_build_error", lambda: "no C++ compiler")
    assert algorithm_for("auto", "block", "cpu") == "one-pass"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_auto_on_cpu_runs_the_cpp_kernels(dtype):
    assert backend_for("auto", "cpu", dtype) == "cpp"
    prefix = "AttnRes aggregation: --attn-res-impl auto -> "
    full, block = (
        choose("auto", "cpu", dtype, mode, stream_bytes=BIG).describe() for mode in ("full", "block")
    )
    assert full.startswith(prefix + "one-pass with the C++ kernels (cpu, ")
    assert block.startswith(prefix + "two-phase with the C++ kernels (cpu, ")
    small = choose("auto", "cpu", dtype, "block", stream_bytes=BIG // 8).describe()
    assert small.startswith(prefix + "one-pass with the C++ kernels (cpu, ")


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_auto_equals_the_reference(n, dtype, tol):
    sources, query, gain, grad = inputs(n, dtype, seed=n)
    out = one_pass_function("auto")(sources, query, gain, EPS)
    grads = torch.autograd.grad(out, [query, gain, *sources], grad)
    want_out, want_grads = fp64_oracle(sources, query, gain, grad)
    torch.testing.assert_close(out.double(), want_out, rtol=tol, atol=tol)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_auto_and_fused_are_the_cpp_kernels_bitwise_on_cpu():
    from attnres_megatron.ops.cpu_fused import aggregate_cpu_fused

    sources, query, gain, _ = inputs(4, torch.float32, seed=3)
    want = aggregate_cpu_fused(sources, query, gain, EPS)
    for impl in ("auto", "fused"):
        assert torch.equal(one_pass_function(impl)(sources, query, gain, EPS), want)


def test_auto_without_a_cpp_toolchain_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(dispatch, "cpp_build_error", lambda: "no C++ compiler")
    dispatch._warn_fallback.cache_clear()
    with pytest.warns(UserWarning, match="--attn-res-impl auto on CPU runs the slower eager ATen op: no C"):
        assert backend_for("auto", "cpu", torch.float32) == "torch"
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        backend_for("fused", "cpu", torch.float32)
    sources, query, gain, _ = inputs(3, torch.float32)
    torch.testing.assert_close(
        one_pass_function("auto")(sources, query, gain, EPS), aggregate_reference(sources, query, gain, EPS)
    )


@pytest.mark.parametrize(
    ("impl", "dtype", "sources", "triton", "want"),
    [
        ("auto", torch.bfloat16, 9, True, "triton"),
        ("auto", torch.float32, 9, False, "torch"),
        ("auto", torch.float64, 9, True, "torch"),
        ("auto", torch.float32, 129, True, "torch"),
        ("fused", torch.bfloat16, 9, True, "triton"),
        ("two-phase", torch.bfloat16, 9, True, "torch"),
        ("torch", torch.bfloat16, 9, True, "torch"),
        ("reference", torch.bfloat16, 9, True, "reference"),
    ],
)
def test_choice_for_gpu_tensors(monkeypatch, impl, dtype, sources, triton, want):
    monkeypatch.setattr(dispatch, "triton_available", lambda: triton)
    assert backend_for(impl, "cuda", dtype, sources) == want


def test_fused_on_gpu_without_triton_names_the_install(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(ImportError, match=r"attnres-megatron\[triton\]"):
        backend_for("fused", "cuda", torch.bfloat16)
    with pytest.raises(TypeError, match="fp64"):
        backend_for("fused", "cuda", torch.float64)


def test_gpu_tensor_path_is_dispatched_per_call(monkeypatch):
    """A faked CUDA device: the call goes to the Triton function, which here is a stand-in."""
    calls = []
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    real = dispatch.backend_function

    def recording(backend):
        calls.append(backend)
        return real("reference")

    monkeypatch.setattr(dispatch, "backend_function", recording)

    class FakeDevice:
        type = "cuda"

    class FakeTensor(torch.Tensor):
        @property
        def device(self):
            return FakeDevice()

    sources, query, gain, _ = inputs(2, torch.float32)
    fake = [s.detach().as_subclass(FakeTensor) for s in sources]
    one_pass_function("auto")(fake, query, gain, EPS)
    assert calls == ["triton"]


def test_two_phase_choice_and_layer_wiring():
    from attnres_megatron.config import AttnResTransformerConfig

    assert choose("two-phase", "cpu", torch.float32).describe() == (
        "AttnRes aggregation: --attn-res-impl two-phase -> two-phase with the C++ kernels (cpu, float32)"
    )
    assert choose("two-phase", "cuda", torch.bfloat16).backend == "torch"
    fields = dict(
        num_layers=4, hidden_size=8, num_attention_heads=2, attention_residuals="block", attn_res_num_blocks=2
    )
    assert AttnResTransformerConfig(**fields).attn_res_impl == "auto"
    with pytest.raises(ValueError, match="--attn-res-impl must be one of"):
        AttnResTransformerConfig(**fields, attn_res_impl="cuda")


def test_without_autograd_auto_is_one_pass_and_the_kernel_is_called_directly():
    """Generation and evaluation: no two-phase statistics, no autograd Function, same values."""
    from attnres_megatron.ops.cpu_fused import aggregate_cpu_fused

    with torch.no_grad():
        assert algorithm_for("auto", "block", "cpu", stream_bytes=BIG) == "one-pass"
    sources, query, gain, _ = inputs(5, torch.float32, seed=4)
    with torch.no_grad():
        fast = aggregate_cpu_fused(sources, query, gain, EPS)
    assert fast.grad_fn is None and fast.shape == sources[0].shape
    assert torch.equal(fast, aggregate_cpu_fused(sources, query, gain, EPS).detach())

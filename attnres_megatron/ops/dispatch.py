"""The one place that decides how the AttnRes depth aggregation runs.

Two separate choices:

* **algorithm**, per forward of a block of layers (from the config and the model's tensors):
  ``one-pass`` (each sublayer mixes all its
  sources in one call) or ``two-phase`` (paper Algorithm 1: the inter-block part of a block's
  ``S`` sublayers in one batched pass, then a per-sublayer merge of the partial sum; Block
  AttnRes only, see :mod:`attnres_megatron.ops.two_phase`);
* **backend**, per call (from the tensors' device and dtype): ``reference`` (plain autograd),
  ``torch`` (the memory-lean eager ATen op), ``cpp`` (the C++ kernels, CPU tensors) or
  ``triton`` (the Triton kernels, CUDA tensors; CPU tensors run Triton's interpreter, a test
  mode only reached by asking for it with :func:`one_pass_function`).

``--attn-res-impl`` picks them (:data:`IMPL_TABLE`); ``auto``, the default, follows what
``docs/benchmarks.md`` measured ("Default aggregation"): on CPU the C++ kernels (the eager op if the
C++ toolchain cannot build them), two-phase for Block AttnRes on large tensors
(:data:`TWO_PHASE_MIN_BYTES`) and one pass otherwise; on GPU one pass with the Triton kernels
(the eager op without Triton, for fp64 or beyond the kernels' source count); one pass in
training with the completed blocks' gradients summed in place by either kernels
(:func:`sums_gradients_in_place`).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

ATTN_RES_IMPLS = ("auto", "torch", "fused", "two-phase", "reference")
"""Values of ``--attn-res-impl``."""

ALGORITHMS = ("one-pass", "two-phase")
BACKENDS = ("reference", "torch", "cpp", "triton")
MAX_TRITON_SOURCES = 128
"""Most sources one Triton call takes (``triton_aggregate.MAX_SOURCES``, kept here so the choice
does not import Triton)."""
TWO_PHASE_BACKENDS = ("auto", "cpp", "torch")
"""Backends of the two-phase passes (``auto``: C++ on CPU tensors when built, else eager)."""

TWO_PHASE_MIN_BYTES = 4 << 20
"""Smallest ``[s, b, h]`` tensor (bytes) for which ``auto`` runs Block AttnRes two-phase on CPU:
the C++ kernels' streaming-store threshold (``csrc/rows.h``), below which tensors stay in cache.
Measured (``docs/benchmarks.md``, "Default aggregation"): per step, one pass and two-phase are
within the machine's noise of each other at 0.5 and 1 MiB (hidden 256 and 512, 512 tokens; the
runs disagree on the sign), while per sublayer two-phase is 2-12 % faster at 18 MiB (hidden 2304,
2048 tokens), where its smaller traffic counts."""

IMPL_TABLE = {
    # impl: (algorithm, CPU backend, GPU backend); "best" = C++ on CPU / Triton on GPU, else torch.
    "auto": ("one-pass", "best", "best"),
    "torch": ("one-pass", "torch", "torch"),
    "fused": ("one-pass", "cpp", "triton"),
    "two-phase": ("two-phase", "cpp", "torch"),
    "reference": ("one-pass", "reference", "reference"),
}

BACKEND_NAMES = {
    "reference": "the plain-autograd reference",
    "torch": "the eager ATen op",
    "cpp": "the C++ kernels",
    "triton": "the Triton kernels",
}


def validate_impl(impl: str) -> None:
    """``ValueError`` naming ``--attn-res-impl`` for an unknown value."""
    if impl not in IMPL_TABLE:
        raise ValueError(f"--attn-res-impl must be one of {', '.join(ATTN_RES_IMPLS)}; got {impl!r}.")


def algorithm_for(
    impl: str,
    attention_residuals: str = "block",
    device_type: str = "cpu",
    attn_res_recompute: bool = False,
    stream_bytes: int = 0,
) -> str:
    """The algorithm ``--attn-res-impl impl`` runs (``one-pass`` or ``two-phase``) for a model in
    mode ``attention_residuals`` whose ``[s, b, h]`` tensors live on ``device_type`` and hold
    ``stream_bytes`` each.

    ``auto`` takes two-phase where it wins: Block AttnRes on CPU with the C++ kernels built,
    tensors of at least :data:`TWO_PHASE_MIN_BYTES` (smaller ones stay in cache, where the
    per-call overhead of two-phase outweighs the traffic it saves), in training (its gain is
    the backward's traffic; without autograd, as in generation, one pass is cheaper), unless the
    aggregation is recomputed (two-phase frees its block statistics after the forward).
    """
    validate_impl(impl)
    if impl != "auto":
        return IMPL_TABLE[impl][0]
    wins = device_type == "cpu" and attention_residuals == "block" and stream_bytes >= TWO_PHASE_MIN_BYTES
    if wins and torch.is_grad_enabled() and not attn_res_recompute and cpp_build_error() is None:
        return "two-phase"
    return "one-pass"


SHARED_GRADIENT_BACKENDS = ("cpp", "triton")
"""Backends whose kernels add into shared block gradients (:mod:`attnres_megatron.ops.shared_gradients`)."""


def sums_gradients_in_place(impl: str, algorithm: str, device_type: str, dtype: torch.dtype) -> bool:
    """Whether one-pass training sums each completed block's gradient in place, in the backward
    kernels of the sublayers that read it (``auto`` with the C++ kernels on CPU or the Triton
    kernels on GPU), instead of each kernel writing a fresh gradient that autograd then adds: one
    read-modify-write of the block's gradient per reader instead of a write and an addition
    (``docs/benchmarks.md``). ``fused`` keeps the plain per-call kernels, for comparison."""
    if impl != "auto" or algorithm != "one-pass" or not torch.is_grad_enabled():
        return False
    return backend_for(impl, device_type, dtype) in SHARED_GRADIENT_BACKENDS


def shared_gradient_function(device_type: str, num_sources: int) -> Optional[Callable]:
    """The aggregation ``fn(sources, query, gain, eps, shared)`` whose kernels add into shared
    block gradients, for ``num_sources`` tensors on ``device_type``; None where the kernels do
    not take that many sources (the Triton kernels' :data:`MAX_TRITON_SOURCES`)."""
    if device_type == "cpu":
        return backend_function("cpp")
    return backend_function("triton") if num_sources <= MAX_TRITON_SOURCES else None


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton imports (checked once)."""
    return importlib.util.find_spec("triton") is not None


def cpp_build_error() -> str | None:
    """``None`` when the C++ CPU kernels are built (building them on first call), else why not."""
    from attnres_megatron.ops.cpu_extension import cpu_extension

    try:
        cpu_extension()
    except RuntimeError as exc:
        return str(exc)
    return None


@functools.cache
def _warn_fallback(what: str, reason: str) -> None:
    warnings.warn(f"{what} runs the slower eager ATen op: {reason}", stacklevel=4)


def backend_for(impl: str, device_type: str, dtype: torch.dtype, num_sources: int = 1) -> str:
    """The backend ``--attn-res-impl impl`` uses for ``num_sources`` tensors of ``device_type``
    and ``dtype``.

    An explicit ``fused`` raises when its kernels are missing; ``auto`` and ``two-phase`` fall
    back to the eager op with a warning naming the reason (``auto`` also for fp64 or more
    sources than the Triton kernels take on GPU).
    """
    validate_impl(impl)
    algorithm, cpu, gpu = IMPL_TABLE[impl]
    wanted = cpu if device_type == "cpu" else gpu
    if wanted in ("reference", "torch"):
        return wanted
    if device_type != "cpu":
        if dtype == torch.float64 or not triton_available() or num_sources > MAX_TRITON_SOURCES:
            if impl == "fused":
                _raise_missing_triton(dtype)
            return "torch"
        return "triton"
    error = cpp_build_error()
    if error is None:
        return "cpp"
    if impl == "fused":
        raise RuntimeError(error)
    _warn_fallback(f"--attn-res-impl {impl} on CPU", error)
    return "torch"


def _raise_missing_triton(dtype: torch.dtype) -> None:
    from attnres_megatron.ops.triton_aggregate import TRITON_MISSING_MESSAGE

    if dtype == torch.float64:
        raise TypeError(
            "--attn-res-impl fused runs fp32/bf16/fp16 on GPU; use --attn-res-impl auto for fp64."
        )
    raise ImportError(TRITON_MISSING_MESSAGE)


def two_phase_backend(requested: str, blocks: Sequence[Tensor]) -> str:
    """``cpp`` or ``torch`` for a two-phase block over ``blocks`` (``requested``: one of
    :data:`TWO_PHASE_BACKENDS`; an explicit ``cpp`` raises when the kernels cannot be built)."""
    if requested not in TWO_PHASE_BACKENDS:
        raise ValueError(f"two-phase backend must be one of {TWO_PHASE_BACKENDS}, got {requested!r}.")
    if requested == "torch" or not blocks or blocks[0].device.type != "cpu":
        return "torch"
    if requested == "cpp":
        from attnres_megatron.ops.cpu_extension import cpu_extension

        cpu_extension()
        return "cpp"
    return backend_for("two-phase", "cpu", blocks[0].dtype)


def backend_function(backend: str) -> Callable:
    """The single-call aggregation ``fn(sources, query, gain, eps)`` of ``backend``."""
    if backend == "reference":
        from attnres_megatron.ops.reference import aggregate_reference

        return aggregate_reference
    if backend == "torch":
        from attnres_megatron.ops.aggregate import aggregate

        return aggregate
    if backend == "cpp":
        from attnres_megatron.ops.cpu_fused import aggregate_cpu_fused

        return aggregate_cpu_fused
    if backend == "triton":
        from attnres_megatron.ops.triton_aggregate import aggregate_fused

        return aggregate_fused
    raise ValueError(f"unknown aggregation backend {backend!r}; one of {', '.join(BACKENDS)}.")


def one_pass_function(impl: str) -> Callable:
    """The single-call aggregation of ``--attn-res-impl impl``: picks the backend per call from
    the first source's device and dtype (one of :data:`BACKENDS` may be given directly)."""
    if impl in BACKENDS:
        return backend_function(impl)
    validate_impl(impl)

    chosen: dict[tuple[str, torch.dtype, bool], Callable] = {}  # decided once per kind of call

    def aggregate_sources(sources: Sequence[Tensor], query: Tensor, gain: Tensor, eps: float) -> Tensor:
        if len(sources) == 0:
            raise ValueError("AttnRes aggregation needs at least one source.")
        first = sources[0]
        key = (first.device.type, first.dtype, len(sources) > MAX_TRITON_SOURCES)
        if key not in chosen:
            chosen[key] = backend_function(backend_for(impl, first.device.type, first.dtype, len(sources)))
        return chosen[key](sources, query, gain, eps)

    return aggregate_sources


@dataclass(frozen=True)
class AggregationChoice:
    """What ``--attn-res-impl`` resolves to for one device and dtype (for the log line)."""

    impl: str
    algorithm: str
    backend: str
    device_type: str
    dtype: torch.dtype
    gradients_in_place: bool = False

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        shared = ", block gradients summed in place" if self.gradients_in_place else ""
        return (
            f"AttnRes aggregation: --attn-res-impl {self.impl} -> {self.algorithm} with "
            f"{BACKEND_NAMES[self.backend]} ({self.device_type}, {dtype}{shared})"
        )


def choose(
    impl: str,
    device_type: str,
    dtype: torch.dtype,
    attention_residuals: str = "block",
    attn_res_recompute: bool = False,
    stream_bytes: int = 0,
) -> AggregationChoice:
    """The algorithm and backend ``impl`` runs on ``device_type`` with ``dtype`` for ``[s, b, h]``
    tensors of ``stream_bytes``."""
    algorithm = algorithm_for(impl, attention_residuals, device_type, attn_res_recompute, stream_bytes)
    backend = backend_for("two-phase" if algorithm == "two-phase" else impl, device_type, dtype)
    in_place = sums_gradients_in_place(impl, algorithm, device_type, dtype)
    return AggregationChoice(impl, algorithm, backend, device_type, dtype, in_place)


def stream_bytes(config, seq_length: int, micro_batch_size: int) -> int:
    """Bytes of one ``[s, b, h]`` tensor on this rank for a Megatron ``config`` (the sequence is
    split over tensor-parallel ranks with sequence parallelism, and over context-parallel ranks)."""
    tokens = seq_length * micro_batch_size // config.context_parallel_size
    if config.sequence_parallel:
        tokens //= config.tensor_model_parallel_size
    return tokens * config.hidden_size * torch.empty(0, dtype=config.params_dtype).element_size()


def choose_for_model(config, device_type: str, seq_length: int, micro_batch_size: int) -> AggregationChoice:
    """What a Megatron ``config``'s ``attn_res_impl`` resolves to for a run of this shape (the log line
    of ``attnres-pretrain`` and the Megatron-LM routes)."""
    return choose(
        config.attn_res_impl,
        device_type,
        config.params_dtype,
        config.attention_residuals,
        config.attn_res_recompute,
        stream_bytes(config, seq_length, micro_batch_size),
    )

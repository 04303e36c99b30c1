"""The checks of the GPU check kit (``tools/gpu_check.py``; not a command).

Each ``check_<name>(scale)`` runs at a :class:`Scale` (the H100 shapes, or tiny CPU shapes for
``--dry-run``) and returns an :class:`Outcome`: a status, figures for the JSON, targets and
markdown lines. ``tests/test_gpu.py`` asserts on the same comparisons on CUDA.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

EPS = 1e-6
ROOT = Path(__file__).resolve().parents[1]
STEP_TARGET = 1.02
"""Block N=8 step time over the baseline's, at most (issue 19)."""
BOUND_TARGET = 0.80
"""Fused kernels' share of the HBM-bandwidth bound, at least (issue 19)."""


@dataclass(frozen=True)
class Tolerance:
    """Elementwise ``|got - want| <= atol + rtol * |want|`` (``atol`` times ``max |want|`` when
    ``scaled``: for sums over all tokens such as the query and gain gradients)."""

    rtol: float
    atol: float
    scaled: bool = False


TOLERANCES = {
    "fp32": {
        "output": Tolerance(2e-5, 2e-5),
        "sources": Tolerance(1e-4, 1e-4),
        "query_gain": Tolerance(1e-4, 1e-4, scaled=True),
    },
    "bf16": {  # 2 bf16 ulps relative: one rounding of the fp32 result, and a neighbour at most
        "output": Tolerance(2.0**-7, 1e-3),
        "sources": Tolerance(2.0**-7, 1e-3),
        "query_gain": Tolerance(2.0**-7, 1e-3, scaled=True),
    },
}
KDA_TOLERANCES = {  # max |got - want| / max |want|
    ("torch", "fp32"): 1e-4,
    ("fla", "fp32"): 5e-3,  # FLA's Triton dots may run fp32 inputs in TF32
    ("torch", "bf16"): 3e-2,
    ("fla", "bf16"): 3e-2,
    ("fla-naive", "fp32"): 1e-4,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Scale:
    """Shapes and repeat counts of one run: :data:`GPU` or the dry run's :data:`TINY`."""

    device: str
    kernel_shape: tuple[int, int, int]
    kernel_sources: tuple[int, ...]
    tiled_sources: tuple[int, ...]
    tiled_block_h: int
    odd_hidden: int
    two_phase_blocks: tuple[int, ...]
    bandwidth_shape: tuple[int, int, int]
    bandwidth_sources: tuple[int, ...]
    warmup: int
    repeats: int
    step_args: tuple[str, ...]
    kda_shape: tuple[int, int, int, int, int]
    pytest_paths: tuple[str, ...]


GPU = Scale(
    device="cuda",
    kernel_shape=(1024, 2, 2304),
    kernel_sources=(1, 2, 5, 9),
    tiled_sources=(2, 9),
    tiled_block_h=512,
    odd_hidden=1000,
    two_phase_blocks=(1, 4, 8),
    bandwidth_shape=(4096, 1, 2304),
    bandwidth_sources=(2, 5, 9),
    warmup=5,
    repeats=30,
    step_args=(
        *("--layers", "8", "--hidden", "2304", "--heads", "18", "--seq", "4096", "--batch", "1"),
        *("--blocks", "8", "--dtype", "bf16", "--device", "cuda", "--steps", "10", "--warmup", "3"),
    ),
    kda_shape=(2, 512, 4, 128, 128),
    pytest_paths=("tests",),
)
TINY = Scale(
    device="cpu",
    kernel_shape=(5, 2, 20),
    kernel_sources=(1, 3),
    tiled_sources=(3,),
    tiled_block_h=8,
    odd_hidden=12,
    two_phase_blocks=(1, 3),
    bandwidth_shape=(32, 1, 64),
    bandwidth_sources=(2,),
    warmup=1,
    repeats=2,
    step_args=(
        *("--layers", "2", "--hidden", "32", "--heads", "4", "--seq", "16", "--batch", "1"),
        *("--blocks", "2", "--dtype", "bf16", "--device", "cpu", "--steps", "1", "--warmup", "0"),
    ),
    kda_shape=(1, 20, 2, 8, 8),
    pytest_paths=("tests/test_gpu.py",),
)


@dataclass
class Outcome:
    """What one check reports: ``passed``, ``failed`` or ``skipped`` (with the reason)."""

    status: str = "passed"
    reason: Optional[str] = None
    figures: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    markdown: list[str] = field(default_factory=list)

    def fail_unless(self, ok: bool, reason: str) -> None:
        """Mark the check failed (keeping the first reason) when ``ok`` is false."""
        if not ok and self.status != "failed":
            self.status, self.reason = "failed", reason


def skipped(reason: str) -> Outcome:
    """An outcome that did not run, and why."""
    return Outcome(status="skipped", reason=reason)


# ---------------------------------------------------------------------------- environment


def package_version(name: str) -> Optional[str]:
    """Installed version of distribution ``name``, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def auto_choice() -> Optional[str]:
    """What ``--attn-res-impl auto`` resolves to for bf16 on CUDA (None without the dispatch)."""
    try:
        from attnres_megatron.ops.dispatch import choose

        return choose("auto", "cuda", torch.bfloat16).describe()
    except ImportError:
        return None
    except Exception as exc:  # reported, not fatal: the checks still run
        return f"{type(exc).__name__}: {exc}"


def environment() -> dict[str, Any]:
    """Device, library versions and the aggregation ``auto`` picks on CUDA."""
    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA device)",
        "device_count": torch.cuda.device_count() if cuda else 0,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "device_memory_gib": round(props.total_memory / 2**30, 1) if props else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "megatron_core": package_version("megatron-core"),
        "fla_core": package_version("fla-core"),
        "flash_linear_attention": package_version("flash-linear-attention"),
        "transformer_engine": package_version("transformer-engine") or package_version("transformer_engine"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "attn_res_impl_auto": auto_choice(),
    }


# ---------------------------------------------------------------------------- comparisons


def closeness(got: Tensor, want: Tensor, tol: Tolerance) -> dict[str, Any]:
    """Worst absolute error, error relative to ``max |want|``, and whether ``tol`` holds."""
    got64, want64 = got.detach().double(), want.detach().double()
    diff = (got64 - want64).abs()
    peak = want64.abs().max().item() if want64.numel() else 0.0
    atol = tol.atol * max(peak, 1.0) if tol.scaled else tol.atol
    excess = (diff - atol - tol.rtol * want64.abs()).max().item() if diff.numel() else 0.0
    worst = diff.max().item() if diff.numel() else 0.0
    return {"max_abs_err": worst, "rel_err": worst / max(peak, 1e-30), "ok": bool(excess <= 0.0)}


def worst(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The combined verdict of several :func:`closeness` results."""
    return {
        "max_abs_err": max(r["max_abs_err"] for r in results),
        "rel_err": max(r["rel_err"] for r in results),
        "ok": all(r["ok"] for r in results),
    }


def fp64_leaves(tensors: Sequence[Tensor]) -> list[Tensor]:
    """fp64 leaf copies (of already-rounded values) for the reference."""
    return [t.detach().double().requires_grad_() for t in tensors]


def randn(shape: Sequence[int], gen: torch.Generator, scale: float = 1.0) -> Tensor:
    """fp64 normal values from a CPU generator (the same on every device)."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def source_leaves(
    n: int, shape: Sequence[int], dtype: torch.dtype, device: str, gen: torch.Generator
) -> list[Tensor]:
    """``n`` ``[s, b, h]`` sources requiring grad in three layouts in turn (contiguous, a
    transposed ``[b, s, h]`` storage, every other column of a ``[s, b, 2h]`` one), scales 0.5+."""
    s, b, h = shape
    sources = []
    for i in range(n):
        scale = 0.5 + 0.25 * i
        if i % 3 == 1:
            leaf = randn((b, s, h), gen, scale).to(device, dtype).requires_grad_()
            sources.append(leaf.transpose(0, 1))
        elif i % 3 == 2:
            leaf = randn((s, b, 2 * h), gen, scale).to(device, dtype).requires_grad_()
            sources.append(leaf[..., ::2])
        else:
            sources.append(randn(shape, gen, scale).to(device, dtype).requires_grad_())
    return sources


def query_gain(hidden: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """A pseudo-query giving logits of standard deviation about 3, and a gain near 1."""
    query = randn((hidden,), gen, 3.0 / hidden**0.5).to(device, dtype).requires_grad_()
    gain = (1.0 + randn((hidden,), gen, 0.3)).to(device, dtype).requires_grad_()
    return query, gain


# ---------------------------------------------------------------------------- (a) Triton kernels


def fused_case(
    n: int, shape: Sequence[int], dtype_name: str, device: str, block_h: Optional[int] = None, seed: int = 0
) -> dict[str, Any]:
    """Triton forward+backward, run twice, against the fp64 reference on the same rounded inputs:
    errors of the output and of the source, query and gain gradients, and bitwise determinism."""
    from attnres_megatron.ops.reference import aggregate_reference
    from attnres_megatron.ops.triton_aggregate import aggregate_fused

    dtype, tol = DTYPES[dtype_name], TOLERANCES[dtype_name]
    gen = torch.Generator().manual_seed(seed)
    sources = source_leaves(n, shape, dtype, device, gen)
    query, gain = query_gain(shape[-1], dtype, device, gen)
    grad_out = randn(shape, gen).to(device, dtype)
    leaves = [query, gain, *sources]
    runs = []
    for _ in range(2):
        out = aggregate_fused(sources, query, gain, EPS, block_h=block_h)
        runs.append([out.detach(), *torch.autograd.grad(out, leaves, grad_out)])
    ref_leaves = fp64_leaves(leaves)
    ref = aggregate_reference(ref_leaves[2:], ref_leaves[0], ref_leaves[1], EPS)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    got = runs[0]
    errors = {
        "output": closeness(got[0], ref, tol["output"]),
        "grad_query": closeness(got[1], ref_grads[0], tol["query_gain"]),
        "grad_gain": closeness(got[2], ref_grads[1], tol["query_gain"]),
        "grad_sources": worst([closeness(a, b, tol["sources"]) for a, b in zip(got[3:], ref_grads[2:])]),
    }
    deterministic = all(torch.equal(a, b) for a, b in zip(*runs))
    return {
        "n": n,
        "shape": list(shape),
        "dtype": dtype_name,
        "path": "single-tile" if block_h is None else f"tiled (block_h={block_h})",
        "errors": errors,
        "deterministic": deterministic,
        "ok": deterministic and all(e["ok"] for e in errors.values()),
    }


def kernel_cases(scale: Scale) -> list[tuple[int, tuple[int, int, int], Optional[int]]]:
    """(n, shape, block_h) of every accuracy case of a dtype."""
    s, b, h = scale.kernel_shape
    cases = [(n, scale.kernel_shape, None) for n in scale.kernel_sources]
    cases += [(n, scale.kernel_shape, scale.tiled_block_h) for n in scale.tiled_sources]
    cases.append((3, (s, b, scale.odd_hidden), None))
    return cases


def error_cells(errors: dict[str, dict[str, Any]]) -> str:
    """Markdown cells of relative errors, a cross where a tolerance fails."""
    return " | ".join(f"{e['rel_err']:.1e}{'' if e['ok'] else ' ✗'}" for e in errors.values())


def tolerance_lines(table: dict[str, dict[str, Tolerance]]) -> list[str]:
    """The stated tolerances, one line per dtype."""
    lines = []
    for dtype_name, tols in table.items():
        parts = [
            f"{name} rtol {t.rtol:.2g}, atol {t.atol:.2g}{' x max|ref|' if t.scaled else ''}"
            for name, t in tols.items()
        ]
        lines.append(f"- {dtype_name}: " + "; ".join(parts))
    return lines


def check_kernels(scale: Scale) -> Outcome:
    """(a) The Triton kernels against the fp64 reference in bf16 and fp32, and determinism."""
    outcome = Outcome()
    cases = [
        fused_case(n, shape, dtype_name, scale.device, block_h, seed=n)
        for dtype_name in DTYPES
        for n, shape, block_h in kernel_cases(scale)
    ]
    outcome.figures = {"cases": cases}
    bad = [f"{c['dtype']} n={c['n']} {c['path']} h={c['shape'][-1]}" for c in cases if not c["ok"]]
    outcome.fail_unless(not bad, "outside tolerance or not deterministic: " + ", ".join(bad))
    outcome.markdown = [
        "Relative error = max |fused - fp64 reference| / max |reference|, on the same rounded inputs; "
        "✗ marks an element outside the tolerance. Tolerances (elementwise atol + rtol x |ref|):",
        *tolerance_lines(TOLERANCES),
        "",
        "| dtype | n | path | h | output | d query | d gain | d sources | two runs bitwise equal |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in cases:
        outcome.markdown.append(
            f"| {c['dtype']} | {c['n']} | {c['path']} | {c['shape'][-1]} | {error_cells(c['errors'])} | "
            f"{'yes' if c['deterministic'] else '**no**'} |"
        )
    return outcome


# ---------------------------------------------------------------------------- two-phase


def two_phase_case(
    n_blocks: int, n_sub: int, shape: Sequence[int], dtype_name: str, device: str, seed: int = 0
) -> dict[str, Any]:
    """One block of ``n_sub`` sublayers through ``TwoPhaseBlockAggregator`` (each with a partial
    sum) against the fp64 reference: errors of the mixes and of every gradient."""
    from attnres_megatron.ops.reference import aggregate_reference
    from attnres_megatron.ops.two_phase import TwoPhaseBlockAggregator

    dtype, tol = DTYPES[dtype_name], TOLERANCES[dtype_name]
    gen = torch.Generator().manual_seed(seed)
    blocks = source_leaves(n_blocks, shape, dtype, device, gen)
    pairs = [query_gain(shape[-1], dtype, device, gen) for _ in range(n_sub)]
    queries, gains = [q for q, _ in pairs], [g for _, g in pairs]
    partials = [randn(shape, gen, 1.5).to(device, dtype).requires_grad_() for _ in range(n_sub)]
    upstream = [randn(shape, gen).to(device, dtype) for _ in range(n_sub)]
    aggregator = TwoPhaseBlockAggregator(blocks, queries, gains, EPS)
    outs = [aggregator.mix(j, partials[j]) for j in range(n_sub)]
    leaves = [*blocks, *queries, *gains, *partials]
    grads = torch.autograd.grad(outs, leaves, upstream)
    ref_leaves = fp64_leaves(leaves)
    b64, q64, g64, p64 = (ref_leaves[i : i + k] for i, k in _spans([n_blocks, n_sub, n_sub, n_sub]))
    refs = [aggregate_reference([*b64, p64[j]], q64[j], g64[j], EPS) for j in range(n_sub)]
    ref_grads = torch.autograd.grad(refs, ref_leaves, [u.double() for u in upstream])
    kinds = ["sources"] * n_blocks + ["query_gain"] * (2 * n_sub) + ["sources"] * n_sub
    grad_errors = [closeness(a, b, tol[k]) for a, b, k in zip(grads, ref_grads, kinds)]
    errors = {
        "output": worst([closeness(o, r, tol["output"]) for o, r in zip(outs, refs)]),
        "grad_blocks": worst(grad_errors[:n_blocks]),
        "grad_query_gain": worst(grad_errors[n_blocks : n_blocks + 2 * n_sub]),
        "grad_partials": worst(grad_errors[n_blocks + 2 * n_sub :]),
    }
    ok = all(e["ok"] for e in errors.values())
    return {"blocks": n_blocks, "sublayers": n_sub, "dtype": dtype_name, "errors": errors, "ok": ok}


def _spans(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(start, size) of consecutive runs of ``sizes``."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return list(zip(starts, sizes))


def check_two_phase(scale: Scale) -> Outcome:
    """The two-phase path (phase 1 over completed blocks, per-sublayer merge) against fp64."""
    outcome = Outcome()
    cases = [
        two_phase_case(n, 4, scale.kernel_shape, dtype_name, scale.device, seed=10 + n)
        for dtype_name in DTYPES
        for n in scale.two_phase_blocks
    ]
    outcome.figures = {"cases": cases}
    bad = [f"{c['dtype']} blocks={c['blocks']}" for c in cases if not c["ok"]]
    outcome.fail_unless(not bad, "outside tolerance: " + ", ".join(bad))
    outcome.markdown = [
        "One block of 4 sublayers, each with a partial sum, through `TwoPhaseBlockAggregator`; "
        f"shape {list(scale.kernel_shape)}; relative errors against the fp64 reference, tolerances "
        "as for the Triton kernels.",
        "",
        "| dtype | completed blocks | mixes | d blocks | d queries, gains | d partials |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        outcome.markdown.append(f"| {c['dtype']} | {c['blocks']} | {error_cells(c['errors'])} |")
    return outcome


# ---------------------------------------------------------------------------- (b) bandwidth


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Milliseconds of each of ``fns`` per round (CUDA events on GPU, the wall clock on CPU);
    every round calls each once, so drifts of the clock or the bandwidth hit all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed_ms(fn, device))
    return times


def _timed_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """One call of ``fn`` in milliseconds."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end)


def kernel_ms(fn: Callable[[], Any], device: torch.device, calls: int = 5) -> Optional[float]:
    """GPU time per call of the Triton forward and backward kernels alone (torch.profiler);
    None on CPU or when the profiler reports none."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    total_us = 0.0
    for event in prof.key_averages():
        if event.key.endswith(("_forward_kernel", "_backward_kernel")):
            total_us += getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
    return total_us / calls / 1e3 if total_us > 0 else None


def forward_backward(
    fn: Callable[..., Tensor], sources: list[Tensor], query: Tensor, gain: Tensor, grad: Tensor
) -> Callable[[], Any]:
    """Closure running one forward and backward of the aggregation ``fn``."""
    leaves = [query, gain, *sources]
    return lambda: torch.autograd.grad(fn(sources, query, gain, EPS), leaves, grad)


def copy_closure(nbytes: int, device: torch.device) -> Callable[[], Any]:
    """Closure copying ``nbytes`` from one device buffer to another (it moves ``2 * nbytes``)."""
    source = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    return lambda: target.copy_(source)


def bandwidth_row(n: int, scale: Scale) -> dict[str, Any]:
    """One source count: the fused op, the torch op and a copy of the same bytes, interleaved."""
    from attnres_megatron.ops.aggregate import aggregate
    from attnres_megatron.ops.triton_aggregate import aggregate_fused

    device, shape = torch.device(scale.device), scale.bandwidth_shape
    gen = torch.Generator().manual_seed(n)
    sources = [randn(shape, gen, 0.5 + 0.1 * i).to(device, torch.bfloat16).requires_grad_() for i in range(n)]
    query, gain = query_gain(shape[-1], torch.bfloat16, scale.device, gen)
    grad = randn(shape, gen).to(device, torch.bfloat16)
    moved = (3 * n + 2) * shape[0] * shape[1] * shape[2] * 2
    fused = forward_backward(aggregate_fused, sources, query, gain, grad)
    fns = {"copy": copy_closure(moved // 2, device), "fused": fused}
    fns["torch"] = forward_backward(aggregate, sources, query, gain, grad)
    times = time_interleaved(fns, device, scale.warmup, scale.repeats)
    best_copy_gbs = moved / min(times["copy"]) / 1e6
    bound_ms = moved / best_copy_gbs / 1e6
    row: dict[str, Any] = {"n": n, "bytes_moved": moved, "copy_best_gbs": best_copy_gbs, "bound_ms": bound_ms}
    for name in ("fused", "torch"):
        median = statistics.median(times[name])
        row[name] = {
            "median_ms": median,
            "min_ms": min(times[name]),
            "max_ms": max(times[name]),
            "gbs": moved / median / 1e6,
            "fraction_of_bound": bound_ms / median,
        }
    kernels = kernel_ms(fused, device)
    row["fused_kernels_ms"] = kernels
    row["fused_kernels_fraction_of_bound"] = None if kernels is None else bound_ms / kernels
    return row


def check_bandwidth(scale: Scale) -> Outcome:
    """(b) Fused forward+backward time against the HBM-bandwidth bound, bf16."""
    outcome = Outcome()
    rows = [bandwidth_row(n, scale) for n in scale.bandwidth_sources]
    outcome.figures = {"shape": list(scale.bandwidth_shape), "dtype": "bf16", "rows": rows}
    for row in rows:
        kernels = row["fused_kernels_fraction_of_bound"]
        value = kernels if kernels is not None else row["fused"]["fraction_of_bound"]
        what = "kernels" if kernels is not None else "op, end to end"
        outcome.targets.append(
            target(f"fused {what} at n={row['n']}: share of the HBM bound", value, ">=", BOUND_TARGET)
        )
    outcome.markdown = [
        f"One forward + backward at {list(scale.bandwidth_shape)} bf16. Bytes moved = (3n + 2) x T x h x 2; "
        f"bound = bytes / the best copy bandwidth of the same bytes, timed in the same {scale.repeats} "
        f"interleaved rounds ({scale.warmup} warm-up calls each; CUDA events). Op times: median "
        "[min-max] over the rounds, end to end (launches and host work included); kernels: the "
        "Triton forward and backward kernels alone (torch.profiler).",
        "",
        "| n | MB moved | copy GB/s (best) | bound (ms) | fused (ms) | fused GB/s | fused / bound "
        "| kernels (ms) | kernels / bound | torch op (ms) | torch / bound |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f, t = r["fused"], r["torch"]
        outcome.markdown.append(
            f"| {r['n']} | {r['bytes_moved'] / 1e6:.0f} | {r['copy_best_gbs']:.0f} | {r['bound_ms']:.3f} | "
            f"{f['median_ms']:.3f} [{f['min_ms']:.3f}-{f['max_ms']:.3f}] | {f['gbs']:.0f} | "
            f"{f['fraction_of_bound']:.2f} | {_fmt(r['fused_kernels_ms'], '.3f')} | "
            f"{_fmt(r['fused_kernels_fraction_of_bound'], '.2f')} | {t['median_ms']:.3f} | "
            f"{t['fraction_of_bound']:.2f} |"
        )
    return outcome


def _fmt(value: Optional[float], spec: str) -> str:
    """``value`` formatted, or a dash."""
    return "-" if value is None else format(value, spec)


def target(name: str, value: Optional[float], op: str, goal: float) -> dict[str, Any]:
    """One figure against its goal (``op`` is ``<=`` or ``>=``)."""
    met = None if value is None else (value <= goal if op == "<=" else value >= goal)
    return {"name": name, "value": value, "op": op, "goal": goal, "met": met}


# ---------------------------------------------------------------------------- (c) step time


def default_impl() -> str:
    """The implementation a user gets: ``auto`` where the dispatch has it, else ``fused``."""
    try:
        from attnres_megatron.ops.dispatch import ATTN_RES_IMPLS
    except ImportError:
        return "fused"
    return "auto" if "auto" in ATTN_RES_IMPLS else "fused"


def round_ratios(samples: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Step time over the baseline's in the same round, round by round."""
    return [s / b for s, b in zip(samples, baseline)]


def check_step(scale: Scale) -> Outcome:
    """(c) Training-step time of the dense proxy: baseline vs Block N=8 vs Full (tools/bench_step.py)."""
    import bench_step

    impls = [default_impl(), "torch"] if scale.device == "cuda" else ["torch"]
    result = bench_step.main([*scale.step_args, "--impls", *impls])
    rows = result["rows"]
    baseline = next(r for r in rows if r["variant"] == "baseline")["samples_ms"]
    outcome = Outcome(figures={"args": list(scale.step_args), "impls": impls, "rows": rows})
    outcome.markdown = [
        f"`python tools/bench_step.py {' '.join(scale.step_args)} --impls {' '.join(impls)}`: dense proxy "
        "(SwiGLU, RMSNorm, local spec), forward + loss + backward + AdamW; every model built first, "
        "then stepped round-robin. Medians; the spread is the range of the per-round ratios.",
        "",
        "| variant | impl | step median (ms) | fwd+bwd (ms) | step / baseline | per-round range |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        ratios = round_ratios(row["samples_ms"], baseline)
        low, high = row.setdefault("ratio_range", [min(ratios), max(ratios)])
        outcome.markdown.append(
            f"| {row['variant']} | {row['impl'] if row['variant'] != 'baseline' else '-'} | "
            f"{row['step_ms']:.1f} | {row['fwd_bwd_ms']:.1f} | {row['ratio_to_baseline']:.3f} | "
            f"{low:.3f}-{high:.3f} |"
        )
        if row["variant"] == "block":
            blocks = scale.step_args[scale.step_args.index("--blocks") + 1]
            name = f"Block N={blocks} step / baseline ({row['impl']})"
            outcome.targets.append(target(name, row["ratio_to_baseline"], "<=", STEP_TARGET))
    return outcome


# ---------------------------------------------------------------------------- (d) KDA


def fla_import_error() -> Optional[str]:
    """None when FLA's ``chunk_kda`` imports, else the error."""
    try:
        importlib.import_module("fla.ops.kda")
    except Exception as exc:  # any failure (missing package, Triton mismatch) means no FLA
        return f"{type(exc).__name__}: {exc}"
    return None


def kda_inputs(shape: Sequence[int], device: str, seed: int = 0) -> dict[str, Tensor]:
    """fp64 KDA inputs ``[b, t, h, d]``: unit-norm keys, log-decay in [-5, 0], beta in (0, 1)."""
    b, t, h, d_k, d_v = shape
    gen = torch.Generator().manual_seed(seed)
    k = randn((b, t, h, d_k), gen)
    values = {
        "q": randn((b, t, h, d_k), gen),
        "k": k / k.norm(dim=-1, keepdim=True),
        "v": randn((b, t, h, d_v), gen),
        "g": -5.0 * torch.rand(b, t, h, d_k, generator=gen, dtype=torch.float64),
        "beta": torch.rand(b, t, h, generator=gen, dtype=torch.float64),
        "initial_state": randn((b, h, d_k, d_v), gen),
    }
    return {name: x.to(device) for name, x in values.items()}


def kda_run(fn: Callable[..., tuple[Tensor, Tensor]], inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Output, final state and the gradients of one fixed fp64 projection of both."""
    leaves = {name: x.detach().clone().requires_grad_() for name, x in inputs.items()}
    o, state = fn(**leaves)
    gen = torch.Generator().manual_seed(1)
    w_o, w_s = randn(o.shape, gen).to(o.device), randn(state.shape, gen).to(o.device)
    loss = (o.double() * w_o).sum() + (state.double() * w_s).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    nan = float("nan")  # a missing gradient fails its comparison
    grads = [torch.full_like(x, nan) if g is None else g for x, g in zip(leaves.values(), grads)]
    return {"o": o.detach(), "state": state.detach(), **{f"d{n}": g for n, g in zip(leaves, grads)}}


def kda_row(backend: str, dtype_name: str, got: dict[str, Tensor], want: dict[str, Tensor]) -> dict[str, Any]:
    """Relative errors of every output and gradient, against the tolerance of ``backend``."""
    limit = KDA_TOLERANCES[backend, dtype_name]
    errors = {name: closeness(got[name], want[name], Tolerance(0.0, 0.0))["rel_err"] for name in got}
    return {
        "backend": backend,
        "dtype": dtype_name,
        "rel_err": errors,
        "tolerance": limit,
        "ok": all(e <= limit for e in errors.values()),
    }


def check_kda(scale: Scale) -> Outcome:
    """(d) FLA's ``chunk_kda`` and ``ops/kda.py``'s chunked form against the fp64 recurrence."""
    from attnres_megatron.ops.kda import kda, kda_recurrent_reference

    fla_error = fla_import_error()
    use_fla = fla_error is None and scale.device == "cuda"
    base = kda_inputs(scale.kda_shape, scale.device)
    rows = []
    for dtype_name, dtype in DTYPES.items():
        rounded = {name: x.to(dtype) for name, x in base.items()}
        want = kda_run(kda_recurrent_reference, {name: x.double() for name, x in rounded.items()})
        for backend in ("torch", "fla") if use_fla else ("torch",):
            got = kda_run(functools.partial(kda, backend=backend), rounded)
            rows.append(kda_row(backend, dtype_name, got, want))
    if use_fla:
        rows.append(fla_naive_row(base))
    outcome = Outcome(figures={"shape": list(scale.kda_shape), "rows": rows, "fla_error": fla_error})
    bad = [f"{r['backend']} {r['dtype']}" for r in rows if not r["ok"]]
    outcome.fail_unless(not bad, "outside tolerance: " + ", ".join(bad))
    if scale.device == "cuda" and fla_error is not None and package_version("fla-core") is not None:
        outcome.fail_unless(False, f"fla-core is installed but does not import: {fla_error}")
    outcome.markdown = kda_markdown(scale, rows, fla_error if not use_fla else None)
    return outcome


def fla_naive_row(base: dict[str, Tensor]) -> dict[str, Any]:
    """FLA's own token loop (forward) against ours: the two references agree on the convention."""
    from fla.ops.kda.naive import naive_recurrent_kda

    from attnres_megatron.ops.kda import kda_recurrent_reference

    inputs = {name: x.float() for name, x in base.items()}
    o_fla, s_fla = naive_recurrent_kda(**inputs, output_final_state=True)
    o_ref, s_ref = kda_recurrent_reference(**base)
    return kda_row("fla-naive", "fp32", {"o": o_fla, "state": s_fla}, {"o": o_ref, "state": s_ref})


def kda_markdown(scale: Scale, rows: list[dict[str, Any]], fla_missing: Optional[str]) -> list[str]:
    """The KDA table."""
    names = list(rows[0]["rel_err"])
    lines = [
        f"`[b, t, h, d_k, d_v]` = {list(scale.kda_shape)}, with an initial state; relative error = "
        "max |got - fp64 recurrence| / max |recurrence| on the same rounded inputs, for the output, "
        "the final state and the gradients of one fixed projection of both. `fla-naive`: FLA's "
        "`naive_recurrent_kda` (fp32, forward) against `kda_recurrent_reference`.",
        "",
        "| backend | dtype | " + " | ".join(names) + " | tolerance |",
        "|---|---|" + "---:|" * len(names) + "---:|",
    ]
    for r in rows:
        cells = " | ".join(_fmt(r["rel_err"].get(n), ".1e") for n in names)
        lines.append(f"| {r['backend']} | {r['dtype']} | {cells} | {r['tolerance']:.0e} |")
    if fla_missing:
        lines += ["", f"FLA not compared: {fla_missing}"]
    return lines


# ---------------------------------------------------------------------------- (e) TE FP8


def te_blocker(scale: Scale) -> Optional[str]:
    """Why the FP8 check cannot run here, or None."""
    from attnres_megatron.models.specs import transformer_engine_available

    if scale.device != "cuda" or not torch.cuda.is_available():
        return "no CUDA device"
    if not transformer_engine_available():
        return "Transformer Engine does not import"
    try:
        from transformer_engine.pytorch.fp8 import check_fp8_support
    except ImportError:  # another TE layout: the run itself will tell
        return None
    supported, reason = check_fp8_support()
    return None if supported else f"FP8 not supported on this device: {reason}"


def fp8_steps() -> list[dict[str, Any]]:
    """Step times of the TE-spec proxy: baseline bf16, baseline FP8 and Block FP8, interleaved."""
    import dataclasses

    from bench_step import make_step
    from proxy_model import VOCAB, ProxyShape, proxy_batch, proxy_config

    from attnres_megatron.models.builder import build_gpt_model

    shape = ProxyShape(layers=4, hidden=2304, heads=18, seq=4096, batch=1, blocks=4)
    batch = proxy_batch(shape, "cuda")
    variants = {"baseline bf16": ("baseline", {}), "baseline fp8": ("baseline", {"fp8": "hybrid"})}
    variants["block fp8"] = ("block", {"fp8": "hybrid"})
    steps, losses = {}, {}
    for label, (variant, fields) in variants.items():
        config = dataclasses.replace(
            proxy_config(variant, shape, impl=default_impl(), dtype="bf16"), **fields
        )
        model = build_gpt_model(config, VOCAB, shape.seq, transformer_impl="transformer_engine")
        model = model.to(device="cuda", dtype=torch.bfloat16).train()
        steps[label] = make_step(model, batch, torch.device("cuda"))
        losses[label] = model(batch[0], batch[1], None, labels=batch[2]).float().mean().item()
    times = time_interleaved(steps, torch.device("cuda"), 2, 5)
    base = statistics.median(times["baseline bf16"])
    return [
        {
            "variant": k,
            "step_ms": statistics.median(v),
            "ratio": statistics.median(v) / base,
            "loss": losses[k],
        }
        for k, v in times.items()
    ]


def check_te_fp8(scale: Scale) -> Outcome:
    """(e) Transformer Engine FP8 (delayed scaling, hybrid format) steps, only where TE imports."""
    from proxy_model import init_single_process

    blocker = te_blocker(scale)
    if blocker is not None:
        return skipped(blocker)
    init_single_process("cuda")
    rows = fp8_steps()
    outcome = Outcome(figures={"rows": rows})
    outcome.fail_unless(all(math.isfinite(r["loss"]) for r in rows), "non-finite loss")
    outcome.markdown = [
        "4-layer proxy, hidden 2304, seq 4096, TE layer spec, `fp8=hybrid` (Megatron's default delayed "
        "recipe); Block with N=4 blocks. Medians of 5 interleaved steps.",
        "",
        "| variant | step (ms) | step / baseline bf16 | first loss |",
        "|---|---:|---:|---:|",
        *(f"| {r['variant']} | {r['step_ms']:.1f} | {r['ratio']:.3f} | {r['loss']:.4f} |" for r in rows),
    ]
    return outcome


# ---------------------------------------------------------------------------- pytest -m gpu


def junit_counts(path: Path) -> dict[str, Any]:
    """Tests, failures, errors and skips of a JUnit XML report; collection errors apart."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "collection_errors": []}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        error = case.find("error")
        if error is not None and "collection failure" in (error.get("message") or ""):
            counts["collection_errors"].append(case.get("name") or case.get("classname") or "?")
            continue
        counts["tests"] += 1
        counts["failures"] += case.find("failure") is not None
        counts["errors"] += error is not None
        counts["skipped"] += case.find("skipped") is not None
    return counts


def check_pytest_gpu(scale: Scale) -> Outcome:
    """``pytest -m gpu``: the GPU-marked tests (tests/test_gpu.py and any others)."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
        command += ["--continue-on-collection-errors", f"--junitxml={report}", *scale.pytest_paths]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        print(done.stdout[-4000:], done.stderr[-2000:], sep="\n", flush=True)
        if not report.exists():
            return Outcome(status="failed", reason=f"pytest exited {done.returncode} without a report")
        counts = junit_counts(report)
    shown = f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')} python -m pytest -m gpu"
    shown += " " + " ".join(scale.pytest_paths)
    outcome = Outcome(figures={"command": shown, **counts})
    ran = counts["tests"] - counts["skipped"]
    outcome.fail_unless(
        counts["failures"] + counts["errors"] == 0, f"{counts['failures']} failed, {counts['errors']} errors"
    )
    outcome.fail_unless(counts["tests"] > 0, "no test marked gpu was collected")
    outcome.markdown = [
        f"`{shown}`: {counts['tests']} "
        f"selected, {ran - counts['failures'] - counts['errors']} passed, {counts['failures']} failed, "
        f"{counts['errors']} errors, {counts['skipped']} skipped."
    ]
    if counts["collection_errors"]:
        outcome.markdown += [
            "",
            "Modules that did not import there: " + ", ".join(counts["collection_errors"]),
        ]
    return outcome


CHECK_FUNCTIONS: dict[str, Callable[[Scale], Outcome]] = {
    "kernels": check_kernels,
    "bandwidth": check_bandwidth,
    "step": check_step,
    "two_phase": check_two_phase,
    "kda": check_kda,
    "te_fp8": check_te_fp8,
    "pytest_gpu": check_pytest_gpu,
}

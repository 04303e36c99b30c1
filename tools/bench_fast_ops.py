#!/usr/bin/env python
"""Benchmark the AttnRes aggregation implementations (forward + backward).

Compares, for ``n`` sources at ``[s, b, h]`` (default ``[2048, 1, 2304]``):

* ``torch``: :func:`attnres_megatron.ops.aggregate` (memory-lean autograd Function);
* ``reference``: :func:`attnres_megatron.ops.aggregate_reference` (plain autograd);
* ``two_phase``: one block of ``S`` sublayers via :class:`TwoPhaseBlockAggregator` with
  ``n - 1`` completed blocks plus a partial per sublayer (``n`` sources each), cost / ``S``:
  the C++ kernels on CPU (``two_phase_eager``: the eager ATen passes, for comparison);
* ``fused``: ``--attn-res-impl fused`` as :mod:`attnres_megatron.ops.dispatch` resolves it: the
  Triton kernels on CUDA, the C++ kernels of ``attnres_megatron.ops.cpu_fused`` on CPU.

It also reports a memory-traffic lower bound: forward moves ``n`` source reads + 1 output
write, backward ``n`` source reads + 1 grad read + ``n`` source-grad writes, i.e.
``(3 n + 2) * T * h * bytes``, divided by the copy bandwidth of the same bytes: a
``Tensor.copy_`` of each of the row's own sources and its gradient into buffers of their own
(``2 * bytes / time``). Per row, the copy and every implementation are timed in rounds (each
called once per round), and each keeps its best time, so a drift of the machine's bandwidth
during the run affects the bound and the ops alike; the bandwidth is reported per row.

On CPU, ``--malloc retain`` (default) applies
:func:`attnres_megatron.compat.cpu_malloc.retain_freed_memory`, as CPU training does, so
steady-state calls reuse heap pages; ``--malloc system`` keeps glibc's defaults, where every
call also pays first-touch page faults on its fresh output and gradient tensors.

Example::

    python tools/bench_fast_ops.py --quick --output bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

from attnres_megatron.compat.cpu_malloc import retain_freed_memory
from attnres_megatron.ops import aggregate, aggregate_reference
from attnres_megatron.ops.dispatch import backend_for, backend_function
from attnres_megatron.ops.two_phase import TwoPhaseBlockAggregator

EPS = 1e-6
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
    """Best (minimum) wall time in milliseconds of each of ``fns``, timed in rounds that call
    each once, so that a drift of the machine's speed hits all of them alike; the minimum is
    the least noisy statistic on a shared machine."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


def same_bytes_copy(tensors: list[Tensor]) -> tuple[Callable[[], Any], int]:
    """Closure copying ``tensors`` (the op's sources and gradient) into buffers of their own, and
    the bytes it moves (each read once and each copy written once: twice their size): the
    bandwidth reference, on the op's own working set."""
    targets = [torch.empty_like(t).fill_(0.0) for t in tensors]

    def copy() -> None:
        with torch.no_grad():
            for target, tensor in zip(targets, tensors):
                target.copy_(tensor)

    return copy, 2 * sum(t.numel() * t.element_size() for t in tensors)


def make_inputs(
    n: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, n_sub: int
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], Tensor]:
    """Sources, ``n_sub`` (query, gain) pairs, and a fixed upstream gradient."""
    gen = torch.Generator(device="cpu").manual_seed(n)
    hidden = shape[-1]

    def leaf(*size: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_()

    sources = [leaf(*shape, scale=0.5 + 0.1 * i) for i in range(n)]
    queries = [(torch.randn(hidden, generator=gen) * 0.1).to(device).requires_grad_() for _ in range(n_sub)]
    gains = [torch.ones(hidden, device=device, requires_grad=True) for _ in range(n_sub)]
    grad = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    return sources, queries, gains, [leaf(*shape) for _ in range(n_sub)], grad


def single_call(fn: Callable[..., Tensor], sources: list[Tensor], query: Tensor, gain: Tensor, grad: Tensor):
    """Closure timing one forward + backward of an aggregate-style ``fn``."""
    leaves = [query, gain, *sources]

    def run() -> None:
        out = fn(sources, query, gain, EPS)
        torch.autograd.grad(out, leaves, grad)

    return run


def two_phase_block(
    sources: list[Tensor],
    queries: list[Tensor],
    gains: list[Tensor],
    partials: list[Tensor],
    grad: Tensor,
    kernels: str = "auto",
):
    """Closure timing one block: phase 1 + ``S`` phase-2 mixes, forward + backward of all."""
    blocks = sources[:-1]
    leaves = [*blocks, *queries, *gains, *partials]

    def run() -> None:
        agg = TwoPhaseBlockAggregator(blocks, queries, gains, EPS, backend=kernels)
        outs = [agg.mix(j, partials[j]) for j in range(len(queries))]
        torch.autograd.grad(outs, leaves, [grad] * len(outs))

    return run


def fused_function(device: torch.device) -> tuple[Optional[Callable], str]:
    """The fused aggregation for ``device`` (C++ on CPU, Triton on CUDA), or why it is missing."""
    try:
        backend = backend_for("fused", device.type, torch.float32)
    except (ImportError, RuntimeError) as exc:
        return None, f"fused kernels skipped: {exc}"
    return backend_function(backend), ""


BOUND_RATIOS = ("torch_ms", "two_phase_ms", "fused_ms")


def fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown table of the results."""
    lines = [
        f"Forward+backward, best of {meta['repeats']} rounds (ms); shape {meta['shape']}, {meta['dtype']}, "
        f"device {meta['device']}, S={meta['sublayers']}, malloc {meta['malloc']}; bound = bytes moved / "
        "best copy bandwidth of the row's own sources and gradient, timed in the same rounds.",
        "",
        "| n | torch `aggregate` | `aggregate_reference` | two-phase (per sublayer) | two-phase eager "
        "| fused | copy GB/s | traffic bound | torch / bound | two-phase / bound | fused / bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratios = [r[key] / r["bound_ms"] if r[key] is not None else None for key in BOUND_RATIOS]
        lines.append(
            f"| {r['n']} | {fmt(r['torch_ms'])} | {fmt(r['reference_ms'])} | {fmt(r['two_phase_ms'])} "
            f"| {fmt(r['two_phase_eager_ms'])} | {fmt(r['fused_ms'])} | {r['copy_bandwidth_gbs']:.1f} "
            f"| {fmt(r['bound_ms'])} | " + " | ".join(f"{fmt(x)}x" for x in ratios) + " |"
        )
    for note in meta["notes"]:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=2304)
    parser.add_argument("--sources", type=int, nargs="+", default=list(range(2, 11)), help="values of n")
    parser.add_argument("--sublayers", type=int, default=6, help="S for the two-phase block")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="n in {2, 6, 10}, 2 repeats, S=3, no reference")
    parser.add_argument(
        "--malloc",
        choices=("retain", "system"),
        default="retain",
        help="CPU: keep freed memory in the heap as CPU training does (retain) or glibc's defaults",
    )
    parser.add_argument("--output", help="write the results as JSON to this path")
    args = parser.parse_args(argv)

    if args.quick:
        args.sources = [n for n in args.sources if n in (2, 6, 10)] or args.sources[:1]
        args.repeats, args.sublayers = min(args.repeats, 2), min(args.sublayers, 3)
    device = torch.device(args.device)
    malloc = "n/a"
    if device.type == "cpu":
        malloc = args.malloc
        if args.malloc == "retain" and not retain_freed_memory():
            malloc = "system (not applied: MALLOC_* thresholds set, or no glibc)"
    dtype = DTYPES[args.dtype]
    shape = (args.seq, args.batch, args.hidden)
    elt = torch.empty(0, dtype=dtype).element_size()
    tokens_bytes = args.seq * args.batch * args.hidden * elt
    fused, fused_note = fused_function(device)
    notes = [fused_note] if fused_note else []
    if args.quick:
        notes.append("--quick: aggregate_reference skipped, S=3, 2 repeats")
    rows = []
    for n in args.sources:
        sources, queries, gains, partials, grad = make_inputs(n, shape, dtype, device, args.sublayers)
        q, g = queries[0], gains[0]
        row: dict[str, Any] = {"n": n}
        copy, copy_bytes = same_bytes_copy([*sources, grad])
        fns = {
            "copy": copy,
            "torch": single_call(aggregate, sources, q, g, grad),
            "two_phase_block": two_phase_block(sources, queries, gains, partials, grad),
        }
        if not args.quick:
            fns["reference"] = single_call(aggregate_reference, sources, q, g, grad)
        if device.type == "cpu":
            fns["two_phase_eager_block"] = two_phase_block(
                sources, queries, gains, partials, grad, kernels="torch"
            )
        if fused is not None:
            fns["fused"] = single_call(fused, sources, q, g, grad)
        best = time_round_robin(fns, device, args.repeats, args.warmup)
        row["torch_ms"] = best["torch"]
        row["reference_ms"] = best.get("reference")
        row["two_phase_block_ms"] = best["two_phase_block"]
        row["two_phase_ms"] = best["two_phase_block"] / args.sublayers
        eager = best.get("two_phase_eager_block")
        row["two_phase_eager_ms"] = None if eager is None else eager / args.sublayers
        row["fused_ms"] = best.get("fused")
        row["copy_ms"] = best["copy"]
        bandwidth = copy_bytes / (best["copy"] * 1e-3) / 1e9
        row["copy_bandwidth_gbs"] = bandwidth
        moved = (3 * n + 2) * tokens_bytes
        row["bytes_moved"] = moved
        row["bound_ms"] = moved / (bandwidth * 1e9) * 1e3
        rows.append(row)
        print(", ".join(f"{k}={fmt(v) if isinstance(v, float) else v}" for k, v in row.items()), flush=True)
        del sources, queries, gains, partials, grad

    meta = {
        "shape": list(shape),
        "dtype": args.dtype,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "sublayers": args.sublayers,
        "repeats": args.repeats,
        "malloc": malloc,
        "copy_bandwidth_gbs": sorted(r["copy_bandwidth_gbs"] for r in rows)[len(rows) // 2],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "notes": notes,
    }
    result = {"meta": meta, "rows": rows}
    print()
    print(markdown(rows, meta))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()

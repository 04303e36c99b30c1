#!/usr/bin/env python
"""Two builds of the C++ AttnRes kernels side by side, their calls alternated on cold inputs.

A variant is a directory holding any of ``rows.h``, ``aggregate.cpp`` and ``two_phase.cpp``;
the package's ``attnres_megatron/ops/csrc`` supplies the files it lacks (a ``rows.h`` variant
keeps the header's include guard). Both are built, or loaded from the kernel cache, as their own
libraries. Each round times the fused forward and backward of both variants, in alternating
order, on inputs rotated over enough sets that every call reads tensors the caches no longer
hold, as in a training step; the same rounds time a copy (one read, one write) and an addition
(two reads, one write) of such cold tensors, what plain streaming reaches. Reported per variant
and pass: the median and range over the rounds (ms), the bandwidth of the bytes the pass must
move, and the median of the per-round ratios B / A. Equal sources give an A / A run: the spread
a real difference must clear. Writes JSON.

Example::

    python tools/bench_kernel_variants.py --a attnres_megatron/ops/csrc --b my_variant --sources 2
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from proxy_model import run_info, write_json

from attnres_megatron.compat.cpu_malloc import retain_freed_memory
from attnres_megatron.ops.cpu_extension import load_cpu_extension
from attnres_megatron.ops.cpu_fused import GRAD_CHUNKS, NO_TENSOR

EPS = 1e-6


def pass_tensors(n: int) -> dict[str, int]:
    """``[T, h]`` tensors each pass must move: forward reads n and writes 1; backward reads n and
    the upstream gradient and writes n; the copy reads and writes 1; the addition reads 2, writes 1."""
    return {"forward": n + 1, "backward": 2 * n + 1, "copy": 2, "add": 3}


class ColdInputs:
    """Sets of sources and an upstream gradient, handed out in turn: a set comes back only after
    every other, ``cold_bytes`` later."""

    def __init__(self, tokens: int, hidden: int, n: int, cold_bytes: int) -> None:
        set_bytes = (n + 2) * tokens * hidden * 4
        count = max(3, math.ceil(cold_bytes / set_bytes) + 1)
        self.sets = [
            (
                [torch.randn(tokens, 1, hidden) for _ in range(n)],
                torch.randn(tokens, 1, hidden),
                torch.zeros(tokens, 1, hidden),
            )
            for _ in range(count)
        ]
        self._next = itertools.cycle(range(count))

    def take(self) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(sources, upstream gradient, a spare output tensor) of the next set."""
        return self.sets[next(self._next)]


def timed_ms(function: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """Milliseconds of one ``function(*args, **kwargs)``."""
    start = time.perf_counter()
    function(*args, **kwargs)
    return (time.perf_counter() - start) * 1e3


def summary(times: list[float], tensor_bytes: float) -> dict[str, Any]:
    median = statistics.median(times)
    return {
        "median_ms": median,
        "min_ms": min(times),
        "max_ms": max(times),
        "gbs": tensor_bytes / median / 1e6,
        "samples_ms": times,
    }


def time_rounds(kernels: dict[str, Any], inputs: ColdInputs, rounds: int, warmup: int, hidden: int) -> dict:
    """Per variant and kernel pass, and for the copy and the addition, the times of each round."""
    query, gain = torch.randn(hidden) * 0.02, torch.ones(hidden)
    names = list(kernels)
    times: dict[tuple[str, str], list[float]] = {}
    for index in range(warmup + rounds):
        order = names if index % 2 == 0 else names[::-1]
        sample: dict[tuple[str, str], float] = {}
        for name in order:
            kernel = kernels[name]
            sources, _, _ = inputs.take()
            sample[name, "forward"] = timed_ms(kernel.fused_forward, sources, query, gain, EPS)
            _, logits, rinv = kernel.fused_forward(inputs.take()[0], query, gain, EPS)
            sources, grad, _ = inputs.take()  # logits of another set: the same work, cold rows
            needs = [True] * len(sources)
            backward = (sources, grad, query, gain, logits, rinv, needs, NO_TENSOR, GRAD_CHUNKS, [])
            sample[name, "backward"] = timed_ms(kernel.fused_backward, *backward)
        (first, *_), _, out = inputs.take()
        sample["-", "copy"] = timed_ms(out.copy_, first)
        (first, *_), second, out = inputs.take()
        sample["-", "add"] = timed_ms(torch.add, first, second, out=out)
        if index >= warmup:
            for key, value in sample.items():
                times.setdefault(key, []).append(value)
    return times


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, type=Path, help="directory of variant A's kernel sources")
    parser.add_argument("--b", required=True, type=Path, help="directory of variant B's kernel sources")
    parser.add_argument("--seq", type=int, default=2048, help="tokens T of the [T, 1, h] tensors")
    parser.add_argument("--hidden", type=int, default=2304)
    parser.add_argument("--sources", type=int, default=2, help="n, the tensors each mix reads")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--cold-bytes", type=int, default=512 << 20, help="bytes touched before a set comes back"
    )
    parser.add_argument("--output", help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    for flag, directory in (("--a", args.a), ("--b", args.b)):
        if not directory.is_dir():
            parser.error(f"{flag} {directory}: not a directory of kernel sources")

    retain_freed_memory()  # as CPU training does: freed outputs stay in the heap
    kernels = {"a": load_cpu_extension(overrides=args.a), "b": load_cpu_extension(overrides=args.b)}
    inputs = ColdInputs(args.seq, args.hidden, args.sources, args.cold_bytes)
    times = time_rounds(kernels, inputs, args.rounds, args.warmup, args.hidden)
    tensor_bytes = args.seq * args.hidden * 4
    moved = pass_tensors(args.sources)
    rows = [
        {"variant": variant, "pass": name, **summary(samples, moved[name] * tensor_bytes)}
        for (variant, name), samples in times.items()
    ]
    ratios = {}
    for name in ("forward", "backward"):
        per_round = [b / a for a, b in zip(times["a", name], times["b", name])]
        ratios[name] = {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round)}
    result = {
        "meta": {
            **run_info("cpu"),
            "shape": [args.seq, 1, args.hidden],
            "sources": args.sources,
            "dtype": "fp32",
        },
        "variants": {"a": str(args.a), "b": str(args.b)},
        "rows": rows,
        "ratio_b_to_a": ratios,
    }
    print(markdown(result))
    write_json(args.output, result)
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| variant | pass | median (ms) | min-max (ms) | GB/s of the bytes moved |",
        "|---|---|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['variant']} | {row['pass']} | {row['median_ms']:.3f} | "
            f"{row['min_ms']:.3f}-{row['max_ms']:.3f} | {row['gbs']:.1f} |"
        )
    for name, ratio in result["ratio_b_to_a"].items():
        lines.append(f"\n{name}: B / A median {ratio['median']:.3f} [{ratio['min']:.3f}-{ratio['max']:.3f}]")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

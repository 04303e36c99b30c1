#!/usr/bin/env python
"""Time of the C++ AttnRes kernel calls inside training steps, against the same calls outside one.

Runs training steps of the dense proxy (one AttnRes variant, ``--attn-res-impl auto`` by
default) with every call of the C++ CPU kernels timed (``time.perf_counter`` around the call),
grouped by kernel and number of sources. Each forward call (``fused_forward``: it writes only a
fresh output) is then repeated at once on the same inputs, and timed again outside any step on
fresh tensors of the same shape: in-step vs repeated shows what the caches hold when a mix runs
in a step, repeated vs outside what the step's heap and thread state cost. Writes JSON.

Example::

    python tools/bench_kernel_calls.py --hidden 256 --output kernel_calls.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Optional

import torch
from bench_step import make_step
from proxy_model import (
    add_shape_args,
    build_proxy,
    init_single_process,
    proxy_batch,
    proxy_config,
    run_info,
    shape_from_args,
    write_json,
)

from attnres_megatron.ops import cpu_fused, cpu_two_phase
from attnres_megatron.ops.cpu_extension import cpu_extension

REPEATED = "fused_forward"
"""The kernel whose calls are repeated in the step and timed outside it (pure: fresh output)."""


class TimedKernels:
    """The C++ kernels, each call timed into ``calls[(kernel, sources)]`` (microseconds)."""

    def __init__(self, kernels: Any) -> None:
        self.kernels = kernels
        self.calls: dict[tuple[str, int], list[float]] = defaultdict(list)
        self.inputs: dict[int, tuple[torch.Size, torch.dtype]] = {}  # sources -> their shape, dtype

    def __getattr__(self, name: str) -> Callable[..., Any]:
        kernel = getattr(self.kernels, name)

        def timed(*args: Any) -> Any:
            sources = len(args[0])
            result = self.time(name, sources, kernel, args)
            if name == REPEATED:
                self.time(f"{name} (repeated)", sources, kernel, args)
                self.inputs.setdefault(sources, (args[0][0].shape, args[0][0].dtype))
            return result

        return timed

    def time(self, name: str, sources: int, kernel: Callable[..., Any], args: tuple) -> Any:
        start = time.perf_counter()
        result = kernel(*args)
        self.calls[name, sources].append((time.perf_counter() - start) * 1e6)
        return result


def outside_step_us(kernels: Any, sources: int, shape: torch.Size, dtype: torch.dtype, calls: int) -> float:
    """Median time of the forward kernel on fresh tensors of the step's shape, outside a step."""
    rows = [torch.randn(shape, dtype=dtype) for _ in range(sources)]
    hidden = shape[-1]
    query, gain = torch.randn(hidden) * 0.1, torch.ones(hidden)
    times = []
    for index in range(calls + 2):
        start = time.perf_counter()
        kernels.fused_forward(rows, query, gain, 1e-6)
        if index >= 2:
            times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser)
    parser.add_argument("--variant", choices=("block", "full"), default="block")
    parser.add_argument("--impl", default="auto", help="--attn-res-impl of the AttnRes variant")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    if args.device != "cpu":
        parser.error("--device: the C++ kernels run on CPU tensors; use --device cpu")

    torch.set_flush_denormal(True)
    shape = shape_from_args(args)
    init_single_process("cpu")
    config = proxy_config(args.variant, shape, impl=args.impl)
    step = make_step(build_proxy(config, shape, "cpu"), proxy_batch(shape, "cpu"), torch.device("cpu"))
    for _ in range(args.warmup):
        step()
    kernels = cpu_extension()
    timed = TimedKernels(kernels)
    modules = (cpu_fused, cpu_two_phase)
    originals = [module.cpu_extension for module in modules]
    for module in modules:
        module.cpu_extension = lambda: timed
    try:
        steps_ms = [step()[1] * 1e3 for _ in range(args.steps)]
    finally:
        for module, original in zip(modules, originals):
            module.cpu_extension = original

    rows = []
    for (name, sources), times in sorted(timed.calls.items()):
        row = {
            "kernel": name,
            "sources": sources,
            "calls_per_step": len(times) / args.steps,
            "median_us": statistics.median(times),
            "ms_per_step": sum(times) / args.steps / 1e3,
        }
        if name == REPEATED:
            row["outside_step_median_us"] = outside_step_us(kernels, sources, *timed.inputs[sources], 20)
        rows.append(row)
    in_step = [row for row in rows if "repeated" not in row["kernel"]]
    result = {
        "meta": {**run_info("cpu"), "variant": args.variant, "impl": args.impl, "shape": vars(shape)},
        "step_ms_median": statistics.median(steps_ms),
        "kernels_ms_per_step": sum(row["ms_per_step"] for row in in_step),
        "rows": rows,
    }
    print(f"step {result['step_ms_median']:.1f} ms, kernels {result['kernels_ms_per_step']:.2f} ms per step")
    for row in rows:
        outside = row.get("outside_step_median_us")
        print(
            f"{row['kernel']:28s} n={row['sources']:2d} {row['calls_per_step']:5.1f}/step "
            f"median {row['median_us']:8.1f} us"
            + ("" if outside is None else f", outside a step {outside:8.1f} us")
        )
    write_json(args.output, result)
    return result


if __name__ == "__main__":
    main()

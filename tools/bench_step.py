#!/usr/bin/env python
"""Training-step time of the dense proxy: baseline vs Block (N blocks) vs Full AttnRes, one run.

Every variant is built once; steps (forward, loss, backward, AdamW update) then run
round-robin over the variants, so slow drifts of a shared machine hit all of them alike.
Reported per variant: the median step time, the forward+backward share of it, and the ratio
to the baseline (of the whole step, and of forward+backward alone, which leaves out the
optimizer step's noise) as the median of the per-round ratios (each variant's step divided by the
baseline's step of the same round) with their minimum and maximum, so a drift of the machine
shows as spread instead of bias. AttnRes variants run with each ``--impls`` aggregation
(``auto``, the default, is what a user gets without the flag). With ``--mix-floors`` each AttnRes
variant is also timed with its depth mixes replaced by stand-ins (:data:`MIX_FLOORS`): the last
source passed on, or one scaled copy of it, which shows what the step costs besides the aggregation.

Example::

    python tools/bench_step.py --output step.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any, Optional

import torch
from bench_fast_ops import synchronize
from proxy_model import (
    add_shape_args,
    add_variant_args,
    build_proxy,
    init_single_process,
    proxy_batch,
    proxy_config,
    run_info,
    shape_from_args,
    write_json,
)


def make_step(model: torch.nn.Module, batch, device: torch.device) -> Callable[[], tuple[float, float]]:
    """One training step; returns (seconds for forward+backward, seconds in total)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    tokens, positions, labels = batch

    def step() -> tuple[float, float]:
        synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(tokens, positions, None, labels=labels).float().mean()
        loss.backward()
        synchronize(device)
        backward_done = time.perf_counter()
        optimizer.step()
        synchronize(device)
        return backward_done - start, time.perf_counter() - start

    return step


MIX_FLOORS: dict[str, Callable[[Any, Any], torch.Tensor]] = {
    # The depth state's bookkeeping alone: the last source passed on (the mix's parameters get
    # no gradient, so the optimizer skips them).
    "identity": lambda module, sources: sources[-1],
    # One elementwise pass per mix, with a gradient (zero) for its parameters.
    "scaled-copy": lambda module, sources: (
        sources[-1] * (1 + 0 * (module.pseudo_query * module.key_gain).sum())
    ),
}
"""``--mix-floors``: stand-ins for the depth mix (``impl`` ``floor:<name>``) that show what an AttnRes
step costs besides the aggregation itself."""
FLOOR = "floor:"


def variants(impls: list[str], kinds: list[str], floors: bool = False) -> list[tuple[str, str]]:
    impls = impls + ([FLOOR + name for name in MIX_FLOORS] if floors else [])
    return [("baseline", "torch")] + [(kind, impl) for kind in kinds for impl in impls]


def with_mix_floor(step: Callable[[], tuple[float, float]], name: str) -> Callable[[], tuple[float, float]]:
    """``step`` with every depth mix replaced by the floor ``name`` (the model built with ``torch``)."""
    from attnres_megatron.layers.depth_attention import DepthAttention

    floor = MIX_FLOORS[name]

    def floored() -> tuple[float, float]:
        original = DepthAttention.forward
        DepthAttention.forward = lambda module, sources, mix=None: floor(module, sources)
        try:
            return step()
        finally:
            DepthAttention.forward = original

    return floored


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | impl | step median (ms) | fwd+bwd median (ms) "
        "| step / baseline: median of rounds [min-max] | fwd+bwd / baseline: median of rounds [min-max] |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        impl = row["impl"] if row["variant"] != "baseline" else "-"
        low, high = row["ratio_range"]
        fb_low, fb_high = row["fwd_bwd_ratio_range"]
        lines.append(
            f"| {row['variant']} | {impl} | {row['step_ms']:.1f} | {row['fwd_bwd_ms']:.1f} | "
            f"{row['ratio_to_baseline']:.3f} [{low:.3f}-{high:.3f}] | "
            f"{row['fwd_bwd_ratio_to_baseline']:.3f} [{fb_low:.3f}-{fb_high:.3f}] |"
        )
    return "\n".join(lines)


def op_self_times(step: Callable[[], Any], steps: int) -> dict[str, float]:
    """Self time per step (ms) of every op the profiler sees over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    return {event.key: event.self_cpu_time_total / 1e3 / steps for event in prof.key_averages()}


def profile_ops(steps: dict, count: int, rows: int) -> dict[str, list[dict[str, Any]]]:
    """Per AttnRes variant, the ops whose self time per step grew most over the baseline's."""
    op_self_times(steps["baseline", "torch"], 1)  # the profiler's own first-use cost, discarded
    times = {key: op_self_times(step, count) for key, step in steps.items()}
    baseline = times["baseline", "torch"]
    tables = {}
    for key, ops in times.items():
        if key == ("baseline", "torch"):
            continue
        names = set(ops) | set(baseline)
        table = [
            {"op": name, "baseline_ms": baseline.get(name, 0.0), "variant_ms": ops.get(name, 0.0)}
            for name in names
        ]
        for row in table:
            row["extra_ms"] = row["variant_ms"] - row["baseline_ms"]
        table.sort(key=lambda row: row["extra_ms"], reverse=True)
        total = {
            "op": "total (all ops)",
            "baseline_ms": sum(baseline.values()),
            "variant_ms": sum(ops.values()),
        }
        total["extra_ms"] = total["variant_ms"] - total["baseline_ms"]
        tables[f"{key[0]} ({key[1]})"] = table[:rows] + [total]
    return tables


def op_markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| op | baseline (ms/step) | variant (ms/step) | extra (ms/step) |", "|---|---:|---:|---:|"]
    for row in table:
        lines.append(
            f"| `{row['op']}` | {row['baseline_ms']:.2f} | {row['variant_ms']:.2f} | {row['extra_ms']:+.2f} |"
        )
    return "\n".join(lines)


def round_ratios(timings: list[float], baseline: list[float]) -> list[float]:
    """Per-round ratios of a variant's step to the baseline's step of the same round."""
    return [t / b for t, b in zip(timings, baseline)]


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser)
    add_variant_args(parser)
    parser.add_argument(
        "--impls",
        nargs="+",
        default=["auto", "torch", "two-phase"],
        help="AttnRes aggregations to time (--attn-res-impl values)",
    )
    parser.add_argument("--steps", type=int, default=7, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--op-profile-steps",
        type=int,
        default=0,
        help="after timing, profile this many steps per variant (torch.profiler) and report, per "
        "ATen op, the self time per step of each variant minus the baseline's",
    )
    parser.add_argument("--op-profile-rows", type=int, default=12, help="ops listed per variant")
    parser.add_argument(
        "--mix-floors",
        action="store_true",
        help="also time each AttnRes variant with its depth mixes replaced by stand-ins "
        f"({', '.join(MIX_FLOORS)}: impl floor:<name>): what the step costs besides the aggregation",
    )
    args = parser.parse_args(argv)

    # Subnormal floats make CPU arithmetic erratically slow (seconds per step in whichever
    # variant happens to produce them early on); GPUs flush them in these kernels anyway.
    torch.set_flush_denormal(True)
    impls = args.impls
    shape = shape_from_args(args)
    init_single_process(args.device)
    batch = proxy_batch(shape, args.device)
    steps = {}
    for variant, impl in variants(impls, args.variants, args.mix_floors):
        floor = impl.removeprefix(FLOOR) if impl.startswith(FLOOR) else None
        config = proxy_config(variant, shape, impl="torch" if floor else impl, dtype=args.dtype)
        step = make_step(build_proxy(config, shape, args.device), batch, torch.device(args.device))
        steps[variant, impl] = with_mix_floor(step, floor) if floor else step
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in steps}
    for index in range(args.warmup + args.steps):
        for key, step in steps.items():
            timing = step()
            if index >= args.warmup:
                samples[key].append(timing)
        print(f"round {index + 1}/{args.warmup + args.steps}", flush=True)

    baseline = [total for _, total in samples["baseline", "torch"]]
    baseline_fwd_bwd = [fwd_bwd for fwd_bwd, _ in samples["baseline", "torch"]]
    rows = []
    for (variant, impl), timings in samples.items():
        totals = [total for _, total in timings]
        ratios = round_ratios(totals, baseline)
        fwd_bwd_ratios = round_ratios([fwd_bwd for fwd_bwd, _ in timings], baseline_fwd_bwd)
        rows.append(
            {
                "variant": variant,
                "impl": impl,
                "step_ms": statistics.median(totals) * 1e3,
                "fwd_bwd_ms": statistics.median([fb for fb, _ in timings]) * 1e3,
                "ratio_to_baseline": statistics.median(ratios),
                "ratio_range": [min(ratios), max(ratios)],
                "round_ratios": ratios,
                "fwd_bwd_ratio_to_baseline": statistics.median(fwd_bwd_ratios),
                "fwd_bwd_ratio_range": [min(fwd_bwd_ratios), max(fwd_bwd_ratios)],
                "samples_ms": [total * 1e3 for total in totals],
                "fwd_bwd_samples_ms": [fwd_bwd * 1e3 for fwd_bwd, _ in timings],
            }
        )
    op_profile = {}
    if args.op_profile_steps:
        op_profile = profile_ops(steps, args.op_profile_steps, args.op_profile_rows)
    result = {
        "meta": {
            "shape": vars(args) | {"impls": impls},
            **run_info(args.device),
        },
        "rows": rows,
        "op_profile": op_profile,
    }
    print()
    print(markdown(rows))
    for name, table in op_profile.items():
        print(f"\n{name} minus baseline, self time per step:\n")
        print(op_markdown(table))
    write_json(args.output, result)
    return result


if __name__ == "__main__":
    main()

"""Check the pipeline planner's cost model against per-stage times measured with ``attnres-profile``.

1. **Calibrate** on one process (no pipeline): ``attnres-profile`` of standard residuals (``none``)
   and the AttnRes variant at ``L`` and ``L / 2`` layers. From the CPU time of each run's compute
   (Megatron's ``forward-compute`` + ``backward-compute`` timers, ``time.thread_time``):
   ``none`` = ``L c + e`` gives the layer cost ``c`` and the embedding/output/loss cost ``e``;
   AttnRes - ``none`` = ``(2L + 1) a + b * sum_j sources(j)`` over the ``2L`` sublayer mixes and
   the final one gives the per-mix cost ``a`` and the per-source cost ``b``. The planner's model
   in units of one layer: ``layer_cost = 1``, ``source_cost = b / (c + 2a)``, ``last_stage_extra =
   (e + a) / (c + 2a)``, no transfer or first-stage cost (receiving is p2p, not compute, and the
   embedding is folded into ``e``).
2. **Plan** the split with that model (``tools/plan_pipeline_stages.py``) and predict each stage's
   compute time, for the plan and for the even split.
3. **Measure** both splits under pipeline parallelism, ``--rounds`` times each, alternating, with
   ``--pipeline-model-parallel-layout`` from the planner: per-stage CPU time of compute (the
   stage's own work, also when the processes outnumber the cores), per-stage wall-clock compute
   and the step time; medians and spread (min..max) over the rounds.

Every profile runs with ``OMP_NUM_THREADS=1`` so that the training thread's CPU time is all of
the compute. Example (about 3 minutes on 2 idle cores):
``python tools/measure_pipeline_balance.py --output-dir balance-cpu --markdown balance.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import plan_pipeline_stages as planner  # noqa: E402  (tools/ is not a package)

sources_at = planner.sources_at


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Planner cost model vs attnres-profile per-stage times.")
    parser.add_argument("--layers", type=int, default=16, help="transformer layers L (even)")
    parser.add_argument("--block-size", type=int, default=1, help="sublayers per block S (1 = Full AttnRes)")
    parser.add_argument("--pp", type=int, default=4, help="pipeline stages of the measured runs")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument(
        "--global-batch-size", type=int, default=32, help="micro-batches = this / micro-batch"
    )
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--timed-steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each split (alternating)")
    parser.add_argument("--output-dir", default="pipeline-balance", help="profiles and result.json")
    parser.add_argument("--markdown", default=None, help="also write the markdown report here")
    args = parser.parse_args(argv)
    if args.layers % 2 or args.layers < 4:
        parser.error("--layers must be even and >= 4 (calibration runs L and L / 2 layers)")
    return args


def variant(args: argparse.Namespace) -> list[str]:
    """The profiler's AttnRes variant flags for the block size."""
    if args.block_size == 1:
        return ["--variants", "full"]
    return ["--variants", "block", "--attn-res-block-size", str(args.block_size)]


def profile(args: argparse.Namespace, name: str, flags: list[str]) -> dict:
    """One ``attnres-profile`` run (CPU, one thread per process); its report."""
    out = Path(args.output_dir) / name
    command = [
        sys.executable,
        "-m",
        "attnres_megatron.profiling.cli",
        *("--device", "cpu", "--hidden-size", str(args.hidden_size)),
        *("--num-attention-heads", str(args.num_attention_heads), "--seq-length", str(args.seq_length)),
        *(
            "--micro-batch-size",
            str(args.micro_batch_size),
            "--global-batch-size",
            str(args.global_batch_size),
        ),
        *("--warmup-steps", str(args.warmup_steps), "--timed-steps", str(args.timed_steps)),
        *("--no-plots", "--output-dir", str(out), *flags),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    load = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    report = json.loads((out / "profile.json").read_text())
    report["load_before"] = load
    print(f"  {name}: {time.perf_counter() - started:.0f} s (load before {load:.2f})", flush=True)
    return report


def single_stage_cpu(report: dict, name: str) -> float:
    """CPU seconds of compute per step of the one stage of a single-process run."""
    (stage,) = next(v for v in report["variants"] if v["name"] == name)["stages"]
    return stage["compute_cpu_s"]


def total_sources(num_layers: int, block: int) -> int:
    """Sources read by the 2L sublayer mixes and the final one."""
    return sum(sources_at(sublayer, block) for sublayer in range(2 * num_layers + 1))


def fit_costs(runs: dict[int, tuple[float, float]], block: int) -> dict:
    """Layer, per-mix, per-source and output costs from the compute of two depths: ``runs`` maps
    layers to (standard residuals, AttnRes) seconds per step. ``none = L c + e``;
    ``AttnRes - none = (2L + 1) a + b * sum_j sources(j)``."""
    short, long = sorted(runs)
    layer = (runs[long][0] - runs[short][0]) / (long - short)
    embed_output = runs[short][0] - short * layer
    rows = [
        (2 * depth + 1, total_sources(depth, block), runs[depth][1] - runs[depth][0])
        for depth in (short, long)
    ]
    (m1, s1, d1), (m2, s2, d2) = rows
    det = m1 * s2 - m2 * s1
    per_mix = (d1 * s2 - d2 * s1) / det
    per_source = (m1 * d2 - m2 * d1) / det
    unit = layer + 2 * per_mix
    cost = planner.CostModel(
        layer_cost=1.0,
        source_cost=per_source / unit,
        transfer_cost=0.0,
        first_stage_extra=0.0,
        last_stage_extra=(embed_output + per_mix) / unit,
    )
    return {
        "layer_s": layer,
        "embedding_output_loss_s": embed_output,
        "per_mix_s": per_mix,
        "per_source_s": per_source,
        "unit_s": unit,
        "cost": cost,
    }


def calibrate(args: argparse.Namespace) -> dict:
    """:func:`fit_costs` from one-process profiles at ``L / 2`` and ``L`` layers."""
    attn = variant(args)[1]
    runs = {}
    for layers in (args.layers // 2, args.layers):
        flags = ["--num-layers", str(layers), "--variants", "none", *variant(args)[1:]]
        report = profile(args, f"calibrate-L{layers}", flags)
        runs[layers] = (single_stage_cpu(report, "none"), single_stage_cpu(report, attn))
    fitted = fit_costs(runs, args.block_size)
    fitted["runs_cpu_s"] = {
        str(depth): {"none": none, attn: with_attn} for depth, (none, with_attn) in runs.items()
    }
    return fitted


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def measure(args: argparse.Namespace, splits: dict[str, planner.Plan]) -> dict:
    """Each split ``--rounds`` times under PP, alternating the order per round."""
    attn = variant(args)[1]
    found = {name: [] for name in splits}
    for round_index in range(args.rounds):
        names = list(splits) if round_index % 2 == 0 else list(splits)[::-1]
        for name in names:
            flags = [
                *("--num-layers", str(args.layers), *variant(args)),
                *("--pipeline-model-parallel-size", str(args.pp)),
                *("--pipeline-model-parallel-layout", splits[name].layout_string),
            ]
            report = profile(args, f"{name}-round{round_index}", flags)
            data = next(v for v in report["variants"] if v["name"] == attn)
            found[name].append(
                {
                    "cpu_s": [stage["compute_cpu_s"] for stage in data["stages"]],
                    "wall_s": [stage["compute_s"] for stage in data["stages"]],
                    "step_s": data["step_time_s"],
                    "imbalance_cpu": data["stage_imbalance_cpu"],
                    "imbalance_wall": data["stage_imbalance"],
                    "load_before": report["load_before"],
                }
            )
    results = {}
    for name, rounds in found.items():
        results[name] = {
            "stage_cpu_s": [summary([r["cpu_s"][stage] for r in rounds]) for stage in range(args.pp)],
            "stage_wall_s": [summary([r["wall_s"][stage] for r in rounds]) for stage in range(args.pp)],
            "imbalance_cpu": summary([r["imbalance_cpu"] for r in rounds]),
            "imbalance_wall": summary([r["imbalance_wall"] for r in rounds]),
            "step_s": summary([r["step_s"] for r in rounds]),
            "load_before": [r["load_before"] for r in rounds],
        }
    return results


def spread(item: dict, scale: float = 1.0, digits: int = 3) -> str:
    low, middle, high = (f"{item[key] * scale:.{digits}f}" for key in ("min", "median", "max"))
    return f"{middle} [{low}..{high}]"


def markdown(
    args: argparse.Namespace, calibration: dict, splits: dict, defaults: dict, measured: dict
) -> str:
    cost = calibration["cost"]
    unit_ms = 1000 * calibration["unit_s"]
    lines = [
        f"Model: GPT, L={args.layers}, S={args.block_size} ({'Full' if args.block_size == 1 else 'Block'} "
        f"AttnRes), hidden {args.hidden_size}, {args.num_attention_heads} heads, sequence {args.seq_length}, "
        f"micro-batch {args.micro_batch_size}, {args.global_batch_size // args.micro_batch_size} "
        f"micro-batches per step, fp32, CPU, one thread per process; PP={args.pp} ({args.pp} processes), "
        f"{args.rounds} rounds per split, {args.timed_steps} timed steps each (medians per round).",
        "",
        "Calibration (one process, CPU seconds of compute per step): layer "
        f"{1000 * calibration['layer_s']:.2f} ms, per aggregation {1000 * calibration['per_mix_s']:.3f} ms, "
        f"per source read {1000 * calibration['per_source_s']:.4f} ms, embedding + output + loss "
        f"{1000 * calibration['embedding_output_loss_s']:.2f} ms; cost model in units of one layer "
        f"({unit_ms:.2f} ms): source {cost.source_cost:.4f}, last-stage extra {cost.last_stage_extra:.3f}, "
        "transfer 0, first-stage extra 0.",
        "",
        "| split | layers per stage | predicted ms per stage | measured CPU ms per stage, median "
        "[min..max] | predicted imbalance | measured imbalance (CPU time) | measured imbalance (wall clock) "
        "| step ms (wall) |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for name, plan in splits.items():
        result = measured[name]
        predicted = ", ".join(f"{unit_ms * value:.0f}" for value in plan.stage_costs)
        stages = ", ".join(spread(item, 1000, 0) for item in result["stage_cpu_s"])
        lines.append(
            f"| {name} | {', '.join(map(str, plan.stage_layers))} | {predicted} | {stages} "
            f"| {plan.imbalance:.3f} | {spread(result['imbalance_cpu'])} "
            f"| {spread(result['imbalance_wall'])} | {spread(result['step_s'], 1000, 0)} |"
        )
    lines += [
        "",
        "With the planner's default cost model (source 0.02, transfer 0.05, last-stage extra 0.5) the "
        "predicted imbalance is "
        + ", ".join(f"{name} {plan.imbalance:.3f}" for name, plan in defaults.items())
        + " (planned split: "
        + ", ".join(map(str, defaults["balanced"].stage_layers))
        + ").",
        "",
        "Load average (1 min) before each run: "
        + "; ".join(
            f"{name} " + ", ".join(f"{x:.2f}" for x in measured[name]["load_before"]) for name in splits
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    print("calibrating (one process):", flush=True)
    calibration = calibrate(args)
    cost = calibration["cost"]
    even = planner.even_plan(args.layers, args.block_size, args.pp, 1, cost)
    balanced = planner.plan_stages(args.layers, args.block_size, args.pp, 1, cost)
    splits = {"even": even, "balanced": balanced}
    defaults = {
        "even": planner.even_plan(args.layers, args.block_size, args.pp),
        "balanced": planner.plan_stages(args.layers, args.block_size, args.pp),
    }
    print(f"splits: even {even.layout_string}, balanced {balanced.layout_string}", flush=True)
    measured = measure(args, splits)
    text = markdown(args, calibration, splits, defaults, measured)
    print(text, end="")
    if args.markdown:
        Path(args.markdown).write_text(text)
    result = {
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "calibration": {**calibration, "cost": asdict(cost)},
        "splits": {name: plan.to_dict() for name, plan in splits.items()},
        "default_cost_splits": {name: plan.to_dict() for name, plan in defaults.items()},
        "measured": measured,
    }
    (Path(args.output_dir) / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The profile report: per-variant median steps and spreads, per-stage times, pipeline boundaries,
ratios to the baseline with their spreads and the warnings of the ratio rule."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Optional

import torch

from attnres_megatron.profiling.precision import PrecisionPlan
from attnres_megatron.profiling.spread import (
    RATIO_RULE,
    paired_ratios,
    ratio_warning,
    representative_index,
    spread,
)

SCHEMA_VERSION = 2
BASELINE = "none"
TIMING_METHOD = (
    "wall clock per step (zero-grad + Megatron forward-backward schedule + optimizer and LR step); "
    "forward and backward are the sums of Megatron's schedule timers 'forward-compute' and "
    "'backward-compute' (config.timers), optimizer is the optimizer.step() interval; other = step - "
    "forward - backward - optimizer (p2p waits, pipeline bubbles, gradient all-reduce, zero-grad). "
    "CUDA is synchronised at every reading. Under pipeline parallelism the step is the slowest rank's "
    "and the split is the bottleneck stage's. On CPU each stage's "
    "compute is also given as CPU time of the training thread inside those two timers "
    "(time.thread_time: the stage's own work, unaffected by other processes sharing the cores), "
    "with its imbalance (slowest / mean)."
)
STATISTIC_METHOD = (
    "every per-step figure of a variant (step, forward, backward, optimizer, other, stages, p2p, "
    "imbalance, tokens/s) comes from one timed step, its median step: the step whose time is the "
    "median of its timed steps (the lower middle one for an even count), so forward + backward + "
    "optimizer + other = step for the reported row; the spread of the step time is the "
    "interquartile range (inclusive quartiles) and the range over all its timed steps"
)
ORDER_METHODS = {
    "interleaved": "every variant built at once; each round runs one step of every variant, the "
    "first variant rotating by one each round, so slow drifts of the machine hit all variants alike",
    "sequential": "one variant after another (--sequential-variants); round i pairs the i-th timed "
    "steps of the variants, taken at different times",
}
RATIO_METHOD = (
    "time ratios (step, forward, backward, optimizer, tokens/s) are medians of the per-round ratios "
    "(round i of the variant over round i of the baseline) with the interquartile range and the range "
    "of those ratios; memory and pipeline bytes are ratios of the reported figures"
)
MEMORY_METHODS = {
    "cuda": "torch.cuda.max_memory_allocated over the timed steps (peak reset after warmup)",
    "cpu": "parameter + gradient-buffer + optimizer-state bytes (unique storages) + peak of the "
    "tensors autograd saves for backward (unique storages, torch.autograd.graph.saved_tensors_hooks, "
    "one instrumented step); transient forward workspace is not included",
}
PIPELINE_BYTES_METHOD = (
    "AttnRes variants: attnres_megatron.pipeline.ledger (bytes of the payloads handed to Megatron's "
    "p2p, forward on the sender, gradients on the receiver); standard residuals: one [s, b, h] hidden "
    "state in the pipeline dtype per micro-batch and direction. Per sending rank, per step."
)
RATIO_METRICS = {
    "step_time": ("step_time_s",),
    "forward": ("forward_s",),
    "backward": ("backward_s",),
    "optimizer": ("optimizer_s",),
    "tokens_per_second": ("tokens_per_second",),
    "peak_memory": ("memory", "peak_bytes"),
    "p2p_bytes": ("pipeline", "p2p_bytes_per_step"),
}


# Ratios paired round by round, and the per-step figure of each.
PAIRED_METRICS = {
    "step_time": "step_s",
    "forward": "forward_s",
    "backward": "backward_s",
    "optimizer": "optimizer_s",
    "tokens_per_second": "tokens_per_second",
}
SPLIT_KEYS = ("forward_s", "backward_s", "optimizer_s")


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    return float(statistics.median(values))


def _representatives(ranks: list[dict]) -> dict[int, dict]:
    """Per pipeline stage, the rank with TP, CP and DP rank 0."""
    reps = {}
    for local in sorted(ranks, key=lambda r: r["rank"]):
        if local["tp_rank"] == local["cp_rank"] == local["dp_rank"] == 0:
            reps.setdefault(local["pp_rank"], local)
    return reps


def memory_summary(local: dict, device: str) -> dict[str, Any]:
    """Peak memory of one rank by the method of its device, with the parts it is made of."""
    m = local["memory"]
    static = m["parameter_bytes"] + m["gradient_bytes"] + m["optimizer_state_bytes"]
    cuda = device == "cuda"
    return {
        "method": "cuda-max-memory-allocated" if cuda else "static-plus-saved-activations",
        "peak_bytes": int(m["cuda_peak_bytes"] if cuda else static + m["peak_saved_activation_bytes"]),
        "parameter_bytes": m["parameter_bytes"],
        "gradient_bytes": m["gradient_bytes"],
        "optimizer_state_bytes": m["optimizer_state_bytes"],
        "peak_saved_activation_bytes": m["peak_saved_activation_bytes"],
    }


def _stage_row(local: dict, device: str, index: int) -> dict[str, Any]:
    """One stage's figures in timed step ``index`` (the variant's median step)."""
    step = local["steps"][index]
    row = {key: step[key] for key in ("step_s", "forward_s", "backward_s", "optimizer_s", "p2p_s")}
    cpu = step["forward_cpu_s"] + step["backward_cpu_s"] if device == "cpu" else None
    return {
        "pp_rank": local["pp_rank"],
        "rank": local["rank"],
        **row,
        "compute_s": row["forward_s"] + row["backward_s"],
        "compute_cpu_s": cpu,
        "peak_memory_bytes": memory_summary(local, device)["peak_bytes"],
        "parameters": local["parameters"],
        "aggregation_calls_per_step": local["aggregation"]["calls_per_step"],
    }


def _boundary_rows(reps: dict[int, dict], index: int) -> list[dict[str, Any]]:
    """Bytes per pipeline boundary (sender chunk -> receiver chunk) and p2p time in step ``index``."""
    pipeline = len(reps)
    first = reps[0]
    interleaved = first["interleaved"]
    rows = []
    for boundary in first["boundaries"]:
        chunk = boundary["sender_chunk"]
        sender, receiver = reps[chunk % pipeline], reps[(chunk + 1) % pipeline]
        row: dict[str, Any] = {
            "boundary": f"{chunk}->{chunk + 1}",
            "sender_pp_rank": sender["pp_rank"],
            "receiver_pp_rank": receiver["pp_rank"],
            "micro_batches": sender["num_micro_batches"],
        }
        if "sources" in boundary:
            sent = sender["ledger"].get(chunk, {})
            returned = receiver["ledger"].get(chunk, {})
            if not sent.get("forward_bytes") or not returned.get("backward_bytes"):
                raise RuntimeError(f"the pipeline byte ledger has no record of boundary {row['boundary']}")
            row.update(
                sources=boundary["sources"],
                sources_naive=boundary["sources_naive"],
                bytes_from="ledger",
                forward_bytes_per_micro_batch=max(sent["forward_bytes"].values()),
                backward_bytes_per_micro_batch=max(returned["backward_bytes"].values()),
                forward_bytes_per_step=sent["forward_total"],
                backward_bytes_per_step=returned["backward_total"],
            )
        else:
            hidden, micro_batches = sender["hidden_state_bytes"], sender["num_micro_batches"]
            row.update(
                sources=1,
                sources_naive=1,
                bytes_from="hidden-state-shape",
                forward_bytes_per_micro_batch=hidden,
                backward_bytes_per_micro_batch=hidden,
                forward_bytes_per_step=hidden * micro_batches,
                backward_bytes_per_step=hidden * micro_batches,
            )
        # Non-interleaved 1F1B talks to each neighbour through its own calls, so the time spent
        # in p2p calls towards the other side of this boundary is attributable; interleaved is not.
        row["sender_p2p_s"] = None if interleaved else sender["steps"][index]["next_rank_p2p_s"]
        row["receiver_p2p_s"] = None if interleaved else receiver["steps"][index]["previous_rank_p2p_s"]
        rows.append(row)
    return rows


def _imbalance(values: list[Optional[float]]) -> Optional[float]:
    """Largest over mean; None when a value is missing (CUDA) or all are zero."""
    if any(value is None for value in values) or not sum(values):
        return None
    return max(values) / (sum(values) / len(values))


def step_split(split: dict, step_s: float, tokens_per_step: int) -> dict[str, Any]:
    """One step's row: its time, the split of one stage, ``other`` = the rest of the step, tokens/s."""
    parts = {key: split[key] for key in SPLIT_KEYS}
    return {
        "step_s": step_s,
        **parts,
        "other_s": step_s - sum(parts.values()),
        "tokens_per_second": tokens_per_step / step_s,
        "started_s": split["started_s"],
    }


def summarize_variant(ranks: list[dict], device: str, tokens_per_step: int) -> dict[str, Any]:
    """One variant's median step (every column from it), spread, memory, stages and boundaries."""
    reps = _representatives(ranks)
    step_times = [max(local["steps"][i]["step_s"] for local in ranks) for i in range(len(ranks[0]["steps"]))]
    chosen = representative_index(step_times)
    stages = [_stage_row(reps[pp], device, chosen) for pp in sorted(reps)]
    bottleneck = max(stages, key=lambda stage: stage["compute_s"])["pp_rank"]
    critical = reps[bottleneck]
    per_step = [
        step_split(split, step_s, tokens_per_step) for split, step_s in zip(critical["steps"], step_times)
    ]
    row = per_step[chosen]
    heaviest = max(ranks, key=lambda local: memory_summary(local, device)["peak_bytes"])
    boundaries = _boundary_rows(reps, chosen) if len(reps) > 1 else []
    compute = [stage["compute_s"] for stage in stages]
    aggregation_s = sum(rep["aggregation"]["forward_s"] for rep in reps.values())
    instrumented_forward = sum(rep["instrumented_step"]["forward_s"] for rep in reps.values())
    one_replica = [local for local in ranks if local["dp_rank"] == local["cp_rank"] == 0]
    first = ranks[0]
    return {
        "name": first["variant"],
        "attention_residuals": first["attention_residuals"],
        "sublayers_per_block": first["sublayers_per_block"],
        "sources_at_output": first["sources_at_output"],
        "parameters": sum(local["parameters"] for local in one_replica),
        "attn_res_parameters": sum(local["attn_res_parameters"] for local in reps.values()),
        "step_time_s": row["step_s"],
        "forward_s": row["forward_s"],
        "backward_s": row["backward_s"],
        "optimizer_s": row["optimizer_s"],
        "other_s": row["other_s"],
        "representative_step": chosen,
        "step_time_spread_s": spread(step_times),
        "tokens_per_step": tokens_per_step,
        "tokens_per_second": row["tokens_per_second"],
        "bottleneck_stage": bottleneck,
        "stage_imbalance": max(compute) / (sum(compute) / len(compute)),
        "stage_imbalance_cpu": _imbalance([stage["compute_cpu_s"] for stage in stages]),
        "steps": per_step,
        "memory": {**memory_summary(heaviest, device), "rank": heaviest["rank"]},
        "aggregation": {
            "calls_per_step": sum(rep["aggregation"]["calls_per_step"] for rep in reps.values()),
            "forward_s": aggregation_s,
            "share_of_forward": aggregation_s / instrumented_forward if instrumented_forward > 0 else 0.0,
        },
        "stages": stages,
        "pipeline": {
            "boundaries": boundaries,
            "p2p_bytes_per_step": sum(
                b["forward_bytes_per_step"] + b["backward_bytes_per_step"] for b in boundaries
            ),
        },
        "losses": [loss for loss in reps[max(reps)]["losses"] if loss is not None],
    }


def _lookup(variant: dict, path: tuple[str, ...]) -> float:
    value: Any = variant
    for key in path:
        value = value[key]
    return value


def round_ratios(variant: dict, base: dict, metric: str) -> Optional[list[float]]:
    """Per-round ratios of a paired metric (None where a baseline round is 0)."""
    key = PAIRED_METRICS[metric]
    return paired_ratios([s[key] for s in variant["steps"]], [s[key] for s in base["steps"]])


def _baseline(variants: list[dict], baseline: Optional[str]) -> Optional[dict]:
    """The baseline variant, or None when it was not profiled."""
    return next((v for v in variants if v["name"] == baseline), None)


def compute_ratios(variants: list[dict], baseline: Optional[str] = BASELINE) -> dict[str, dict]:
    """Each variant's metrics over the baseline's (same run): time metrics the median of their
    per-round ratios, the others the ratio of the reported figures; None where the baseline is 0."""
    base = _baseline(variants, baseline)
    if base is None:
        return {}
    ratios = {}
    for variant in variants:
        row: dict[str, Optional[float]] = {}
        for metric, path in RATIO_METRICS.items():
            if metric in PAIRED_METRICS:
                per_round = round_ratios(variant, base, metric)
                row[metric] = median(per_round) if per_round is not None else None
            else:
                denominator = _lookup(base, path)
                row[metric] = _lookup(variant, path) / denominator if denominator else None
        ratios[variant["name"]] = row
    return ratios


def compute_ratio_spreads(variants: list[dict], baseline: Optional[str] = BASELINE) -> dict[str, dict]:
    """Spread (quartiles, range, rounds) of the per-round ratios of every time metric."""
    base = _baseline(variants, baseline)
    if base is None:
        return {}
    spreads = {}
    for variant in variants:
        per_metric = {metric: round_ratios(variant, base, metric) for metric in PAIRED_METRICS}
        spreads[variant["name"]] = {
            metric: spread(values) if values is not None else None for metric, values in per_metric.items()
        }
    return spreads


def ratio_warnings(
    ratios: dict[str, dict], spreads: dict[str, dict], baseline: Optional[str] = BASELINE
) -> list[dict[str, Any]]:
    """The time ratios of the non-baseline variants that the ratio rule flags, with the reason."""
    flagged = []
    for name, row in spreads.items():
        for metric, metric_spread in row.items():
            ratio = ratios[name][metric]
            if name == baseline or ratio is None or metric_spread is None:
                continue
            reason = ratio_warning(ratio, metric_spread)
            if reason is not None:
                flagged.append(
                    {
                        "variant": name,
                        "metric": metric,
                        "ratio": ratio,
                        "q1": metric_spread["q1"],
                        "q3": metric_spread["q3"],
                        "reason": reason,
                    }
                )
    return flagged


def _environment(device: str) -> dict[str, Any]:
    def package(name: str) -> Optional[str]:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "cpu_count": os.cpu_count() or 1,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": package("megatron-core"),
        "transformer_engine": package("transformer-engine") or package("transformer_engine"),
    }


def build_report(
    args: argparse.Namespace,
    plan: PrecisionPlan,
    device: str,
    gathered: list[list[dict]],
    launcher: str,
    argv: Optional[list[str]] = None,
) -> dict[str, Any]:
    """The JSON report from every rank's results (one list of ranks per variant)."""
    first = gathered[0][0]
    world = len(gathered[0])
    data_parallel = max(local["dp_rank"] for local in gathered[0]) + 1
    tokens_per_step = args.global_batch_size * args.seq_length
    variants = [summarize_variant(ranks, device, tokens_per_step) for ranks in gathered]
    ratios, spreads = compute_ratios(variants), compute_ratio_spreads(variants)
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "attnres-profile",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv) if argv is not None else [],
        "model": {
            "name": args.model,
            "num_layers": first["num_layers"],
            "hidden_size": first["hidden_size"],
            "seq_length": args.seq_length,
            "micro_batch_size": args.micro_batch_size,
            "global_batch_size": args.global_batch_size,
            "num_micro_batches": first["num_micro_batches"],
            "tokens_per_step": tokens_per_step,
        },
        "parallel": {
            "world_size": world,
            "launcher": launcher,
            "tensor": args.tensor_model_parallel_size,
            "pipeline": args.pipeline_model_parallel_size,
            "virtual_stages": args.num_virtual_stages_per_pipeline_rank,
            "context": args.context_parallel_size,
            "expert": args.expert_model_parallel_size,
            "data": data_parallel,
            "sequence_parallel": bool(args.sequence_parallel),
        },
        "environment": _environment(device),
        "precision": plan.as_dict(),
        "steps": {
            "warmup": args.warmup_steps,
            "timed": args.timed_steps,
            "instrumented": 1,
            "traced": 1 if args.torch_profiler else 0,
            "order": "sequential" if args.sequential_variants else "interleaved",
        },
        "methods": {
            "statistic": "median-step",
            "summary": STATISTIC_METHOD,
            "order": ORDER_METHODS["sequential" if args.sequential_variants else "interleaved"],
            "ratios": RATIO_METHOD,
            "ratio_rule": RATIO_RULE,
            "timing": TIMING_METHOD,
            "memory": MEMORY_METHODS["cuda" if device == "cuda" else "cpu"],
            "pipeline_bytes": PIPELINE_BYTES_METHOD,
        },
        "torch_profiler_dir": args.torch_profiler,
        "baseline": BASELINE if any(v["name"] == BASELINE for v in variants) else None,
        "variants": variants,
        "ratios": ratios,
        "ratio_spreads": spreads,
        "ratio_warnings": ratio_warnings(ratios, spreads),
    }

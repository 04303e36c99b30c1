"""The human-readable report: median steps and spreads, ratios to the baseline, stages, boundaries."""

from __future__ import annotations

from typing import Any, Optional

MIB = 1 << 20
HUNDREDTHS_OF_MS = 100_000  # per second: the step table's resolution
UNRESOLVED = " (!)"


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.2f}"


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}x"


def _hundredths(cells: int) -> str:
    """Hundredths of a millisecond as printed ms."""
    return f"{cells / 100:.2f}"


def split_cells(variant: dict[str, Any]) -> list[str]:
    """Step, forward, backward, optimizer and other in ms as printed: the parts are rounded to the
    table's resolution and ``other`` is what remains of the rounded step, so the row adds up as shown."""
    step = round(variant["step_time_s"] * HUNDREDTHS_OF_MS)
    parts = [round(variant[key] * HUNDREDTHS_OF_MS) for key in ("forward_s", "backward_s", "optimizer_s")]
    return [_hundredths(cells) for cells in (step, *parts, step - sum(parts))]


def _interval(low: float, high: float, digits: int, scale: float = 1.0) -> str:
    """``[low-high]``, scaled and rounded."""
    return f"[{scale * low:.{digits}f}-{scale * high:.{digits}f}]"


def ratio_cell(ratio: Optional[float], spread: Optional[dict[str, Any]], flagged: bool) -> str:
    """A ratio with the interquartile range of its per-round ratios, marked when unresolved."""
    if ratio is None:
        return "-"
    cell = _ratio(ratio)
    if spread is not None:
        cell += " " + _interval(spread["q1"], spread["q3"], 3)
    return cell + (UNRESOLVED if flagged else "")


def _ratio_section(report: dict[str, Any]) -> list[str]:
    """The ratios table (time ratios with their spread, unresolved ones marked) and its notes."""
    flagged = {(w["variant"], w["metric"]): w["reason"] for w in report["ratio_warnings"]}
    spreads, base = report["ratio_spreads"], report["baseline"]
    metrics = list(next(iter(report["ratios"].values())))
    lines = [
        f"## Ratios to `{report['baseline']}` (same run)",
        "",
        "Time ratios: median of the per-round ratios [interquartile range]; memory and bytes: ratio of "
        f"the reported figures. `{UNRESOLVED.strip()}`: unresolved by its rounds (see below).",
        "",
    ]
    lines += _table(
        ["variant", *metrics],
        [
            [
                name,
                *(
                    ratio_cell(row[m], None if name == base else spreads[name].get(m), (name, m) in flagged)
                    for m in metrics
                ),
            ]
            for name, row in report["ratios"].items()
        ],
        "---:",
    )
    if flagged:
        lines += [f"**Unresolved ratios {UNRESOLVED.strip()}** ({report['methods']['ratio_rule']}):", ""]
        lines += [f"- {variant} {metric}: {reason}" for (variant, metric), reason in flagged.items()]
        lines += [""]
    return lines


def _mib(value: int) -> str:
    return f"{value / MIB:.2f}"


def _table(header: list[str], rows: list[list[Any]], align: str) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    """Markdown tables of one report (all figures come from the report itself)."""
    model, parallel, precision = report["model"], report["parallel"], report["precision"]
    env = report["environment"]
    te = env["transformer_engine"] or "not installed"
    lines = [
        "# attnres-profile report",
        "",
        f"Model `{model['name']}`: {model['num_layers']} layers, hidden {model['hidden_size']}, sequence "
        f"{model['seq_length']}, micro-batch {model['micro_batch_size']}, global batch "
        f"{model['global_batch_size']} ({model['num_micro_batches']} micro-batches per step, "
        f"{model['tokens_per_step']} tokens per step).",
        f"Parallel: world {parallel['world_size']} ({parallel['launcher']}), TP {parallel['tensor']}"
        f"{' + SP' if parallel['sequence_parallel'] else ''}, PP {parallel['pipeline']}"
        f"{' x VPP ' + str(parallel['virtual_stages']) if parallel['virtual_stages'] else ''}, "
        f"CP {parallel['context']}, EP {parallel['expert']}, DP {parallel['data']}.",
        f"Device: {env['device']}{' (' + env['gpu'] + ')' if env['gpu'] else ''}; torch {env['torch']}, "
        f"megatron-core {env['megatron_core']}, Transformer Engine {te}.",
        f"Precision: requested {precision['requested']}, used {precision['used']}"
        + (f" (fallback: {precision['fallback_reason']})" if precision["fallback_reason"] else "")
        + f"; AttnRes statistics in {precision['attn_res_statistics_dtype']}.",
        f"Steps per variant: {report['steps']['warmup']} warmup, {report['steps']['timed']} timed "
        f"({report['steps']['order']} rounds), 1 instrumented (memory, aggregation time).",
        "",
        "## Step time (median step, ms)",
        "",
        "Every column of a row comes from the same step, the variant's median step, so forward + "
        "backward + optimizer + other = step; IQR and range: step time over all timed steps.",
        "",
    ]
    variants = report["variants"]
    lines += _table(
        [
            "variant",
            "S",
            "step",
            "forward",
            "backward",
            "optimizer",
            "other",
            "step IQR",
            "step range",
            "tokens/s",
            "peak MiB",
        ],
        [
            [
                v["name"],
                v["sublayers_per_block"] or "-",
                *split_cells(v),
                _interval(v["step_time_spread_s"]["q1"], v["step_time_spread_s"]["q3"], 2, 1000),
                _interval(v["step_time_spread_s"]["min"], v["step_time_spread_s"]["max"], 2, 1000),
                f"{v['tokens_per_second']:.0f}",
                _mib(v["memory"]["peak_bytes"]),
            ]
            for v in variants
        ],
        "---:",
    )
    if report["ratios"]:
        lines += _ratio_section(report)
    lines += ["## Memory (MiB)", "", f"Method: {report['methods']['memory']}.", ""]
    lines += _table(
        ["variant", "peak", "parameters", "gradients", "optimizer state", "saved activations (peak)"],
        [
            [
                v["name"],
                *(
                    _mib(v["memory"][k])
                    for k in (
                        "peak_bytes",
                        "parameter_bytes",
                        "gradient_bytes",
                        "optimizer_state_bytes",
                        "peak_saved_activation_bytes",
                    )
                ),
            ]
            for v in variants
        ],
        "---:",
    )
    lines += ["## AttnRes aggregation", ""]
    lines += _table(
        ["variant", "calls per step", "forward ms (instrumented step)", "share of forward"],
        [
            [
                v["name"],
                v["aggregation"]["calls_per_step"],
                _ms(v["aggregation"]["forward_s"]),
                f"{100 * v['aggregation']['share_of_forward']:.1f}%",
            ]
            for v in variants
        ],
        "---:",
    )
    if parallel["pipeline"] > 1:
        lines += ["## Pipeline stages (ms, in each variant's median step)", ""]
        lines += _table(
            [
                "variant",
                "stage",
                "forward",
                "backward",
                "compute (CPU time)",
                "optimizer",
                "p2p",
                "step",
                "peak MiB",
                "imbalance (CPU time)",
            ],
            [
                [
                    v["name"],
                    s["pp_rank"],
                    _ms(s["forward_s"]),
                    _ms(s["backward_s"]),
                    _ms(s["compute_cpu_s"]),
                    _ms(s["optimizer_s"]),
                    _ms(s["p2p_s"]),
                    _ms(s["step_s"]),
                    _mib(s["peak_memory_bytes"]),
                    f"{v['stage_imbalance']:.3f}"
                    + (f" ({v['stage_imbalance_cpu']:.3f})" if v["stage_imbalance_cpu"] is not None else ""),
                ]
                for v in variants
                for s in v["stages"]
            ],
            "---:",
        )
        lines += ["## Pipeline boundaries (per sending rank)", "", report["methods"]["pipeline_bytes"], ""]
        lines += _table(
            [
                "variant",
                "boundary",
                "sources (naive)",
                "fwd bytes/mb",
                "bwd bytes/mb",
                "bytes/step",
                "sender p2p ms",
                "receiver p2p ms",
                "from",
            ],
            [
                [
                    v["name"],
                    b["boundary"],
                    f"{b['sources']} ({b['sources_naive']})",
                    b["forward_bytes_per_micro_batch"],
                    b["backward_bytes_per_micro_batch"],
                    b["forward_bytes_per_step"] + b["backward_bytes_per_step"],
                    _ms(b["sender_p2p_s"]),
                    _ms(b["receiver_p2p_s"]),
                    b["bytes_from"],
                ]
                for v in variants
                for b in v["pipeline"]["boundaries"]
            ],
            "---:",
        )
    methods = report["methods"]
    lines += ["## Method", ""]
    lines += [f"- {methods[key]}." for key in ("summary", "order", "ratios", "ratio_rule")]
    lines += ["", methods["timing"], ""]
    return "\n".join(lines)

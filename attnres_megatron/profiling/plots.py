"""PNG plots of a report (matplotlib, Agg backend): step split per variant with its spread, ratios to
the baseline with theirs, per-stage time, bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_plots(report: dict[str, Any], directory: Path) -> list[Path]:
    """Write the plots for ``report`` into ``directory``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = report["variants"]
    names = [v["name"] for v in variants]
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(variants)
    for key, label in (
        ("forward_s", "forward"),
        ("backward_s", "backward"),
        ("optimizer_s", "optimizer"),
        ("other_s", "other"),
    ):
        heights = [1000 * max(v[key], 0.0) for v in variants]
        ax.bar(names, heights, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    spreads = [v["step_time_spread_s"] for v in variants]
    ax.errorbar(
        names,
        [1000 * v["step_time_s"] for v in variants],
        yerr=_error_bars([v["step_time_s"] for v in variants], spreads, 1000),
        fmt="none",
        ecolor="black",
        capsize=6,
        label="step time IQR",
    )
    ax.set_ylabel("ms per step (median step)")
    ax.set_title("Step time split (median step; error bar: IQR of all steps)")
    ax.legend()
    written.append(_save(fig, directory / "step_breakdown.png", plt))
    if any(name != report["baseline"] for name in report["ratios"]):
        written.append(_ratio_plot(report, directory, plt))

    if report["parallel"]["pipeline"] > 1:
        stages = sorted({s["pp_rank"] for v in variants for s in v["stages"]})
        width = 0.8 / len(variants)
        fig, ax = plt.subplots(figsize=(6, 4))
        for index, variant in enumerate(variants):
            by_stage = {s["pp_rank"]: s for s in variant["stages"]}
            xs = [stage + index * width for stage in stages]
            ax.bar(
                xs, [1000 * by_stage[s]["forward_s"] for s in stages], width, label=f"{variant['name']} fwd"
            )
            ax.bar(
                xs,
                [1000 * by_stage[s]["backward_s"] for s in stages],
                width,
                bottom=[1000 * by_stage[s]["forward_s"] for s in stages],
                label=f"{variant['name']} bwd",
                alpha=0.6,
            )
        ax.set_xticks([s + 0.4 - width / 2 for s in stages], [f"stage {s}" for s in stages])
        ax.set_ylabel("compute ms (median step)")
        ax.set_title("Per-stage forward + backward")
        ax.legend(fontsize="small")
        written.append(_save(fig, directory / "stages.png", plt))

        fig, ax = plt.subplots(figsize=(6, 4))
        boundaries = [b["boundary"] for b in variants[0]["pipeline"]["boundaries"]]
        for index, variant in enumerate(variants):
            rows = variant["pipeline"]["boundaries"]
            ax.bar(
                [i + index * width for i in range(len(rows))],
                [(b["forward_bytes_per_step"] + b["backward_bytes_per_step"]) / (1 << 20) for b in rows],
                width,
                label=variant["name"],
            )
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(boundaries))], boundaries)
        ax.set_ylabel("MiB per step (forward + backward)")
        ax.set_title("Pipeline boundary traffic")
        ax.legend()
        written.append(_save(fig, directory / "pipeline_bytes.png", plt))

    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(variants)
    parts = (
        ("parameter_bytes", "parameters"),
        ("gradient_bytes", "gradients"),
        ("optimizer_state_bytes", "optimizer state"),
        ("peak_saved_activation_bytes", "saved activations"),
    )
    for key, label in parts:
        heights = [v["memory"][key] / (1 << 20) for v in variants]
        ax.bar(names, heights, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.scatter(
        names,
        [v["memory"]["peak_bytes"] / (1 << 20) for v in variants],
        color="black",
        marker="_",
        s=400,
        label="peak",
        zorder=3,
    )
    ax.set_ylabel("MiB (heaviest rank)")
    ax.set_title("Memory")
    ax.legend(fontsize="small")
    written.append(_save(fig, directory / "memory.png", plt))
    return written


def _error_bars(values: list[float], spreads: list[dict], scale: float = 1.0) -> list[list[float]]:
    """Matplotlib's asymmetric ``yerr`` from each value down to q1 and up to q3."""
    return [
        [scale * max(value - s["q1"], 0.0) for value, s in zip(values, spreads)],
        [scale * max(s["q3"] - value, 0.0) for value, s in zip(values, spreads)],
    ]


def _ratio_plot(report: dict[str, Any], directory: Path, plt) -> Path:
    """Step-time ratio of each variant to the baseline with the IQR of its per-round ratios;
    unresolved ratios (the report's ratio warnings) hatched."""
    names = [name for name in report["ratios"] if name != report["baseline"]]
    ratios = [report["ratios"][name]["step_time"] or 0.0 for name in names]
    spreads = [
        report["ratio_spreads"][name]["step_time"] or {"q1": r, "q3": r} for name, r in zip(names, ratios)
    ]
    flagged = {w["variant"] for w in report["ratio_warnings"] if w["metric"] == "step_time"}
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(names, ratios, color="tab:blue")
    for bar, name in zip(bars, names):
        if name in flagged:
            bar.set_hatch("//")
            bar.set_alpha(0.5)
    ax.errorbar(names, ratios, yerr=_error_bars(ratios, spreads), fmt="none", ecolor="black", capsize=6)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    low = min([s["q1"] for s in spreads] + [1.0])
    ax.set_ylim(bottom=max(0.0, low - 0.1 * (max([s["q3"] for s in spreads] + [1.0]) - low) - 0.05))
    ax.set_ylabel(f"step time / {report['baseline']} (median of rounds)")
    ax.set_title("Ratio to the baseline (error bar: IQR; hatched: unresolved)")
    return _save(fig, directory / "step_ratio.png", plt)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

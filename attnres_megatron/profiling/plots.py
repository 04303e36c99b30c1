"""PNG plots of a report (matplotlib, Agg backend): step split per variant, per-stage time, bytes."""

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
    ax.set_ylabel("median ms per step")
    ax.set_title("Step time split")
    ax.legend()
    written.append(_save(fig, directory / "step_breakdown.png", plt))

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
        ax.set_ylabel("median compute ms per step")
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


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

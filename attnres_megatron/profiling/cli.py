"""``attnres-profile``: overhead of Block and Full AttnRes against standard residuals, one run."""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from attnres_megatron.profiling.arguments import default_world_size, parse_profile_args
from attnres_megatron.profiling.launcher import spawn_workers
from attnres_megatron.profiling.markdown import render_markdown
from attnres_megatron.profiling.precision import resolve_precision
from attnres_megatron.profiling.schema import validate_report
from attnres_megatron.training.distributed import resolve_device
from attnres_megatron.training.launch_env import LaunchEnvError, discover_launch_env
from attnres_megatron.training.quiet import hide_cpu_advice, optional_packages_line, quiet_start


def write_outputs(report: dict[str, Any], directory: Path, plots: bool = True) -> list[Path]:
    """Validate the report, then write profile.json, profile.md and (optionally) the PNG plots."""
    validate_report(report)
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "profile.json", directory / "profile.md"]
    written[0].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    written[1].write_text(render_markdown(report), encoding="utf-8")
    if plots:
        from attnres_megatron.profiling.plots import write_plots

        written += write_plots(report, directory)
    return written


def _summary(report: dict[str, Any]) -> str:
    """Log lines: precision, one line per variant (median step, IQR, ratio with its IQR), warnings."""
    precision = report["precision"]
    lines = [
        f"> attnres-profile: precision {precision['used']} (requested {precision['requested']})"
        + (f"; fallback because {precision['fallback_reason']}" if precision["fallback_reason"] else "")
    ]
    for variant in report["variants"]:
        spread = variant["step_time_spread_s"]
        ratio = report["ratios"].get(variant["name"], {}).get("step_time")
        ratio_spread = report["ratio_spreads"].get(variant["name"], {}).get("step_time")
        lines.append(
            f"> {variant['name']:>5}: step {1000 * variant['step_time_s']:.1f} ms "
            f"[IQR {1000 * spread['q1']:.1f}-{1000 * spread['q3']:.1f}] (fwd "
            f"{1000 * variant['forward_s']:.1f}, bwd {1000 * variant['backward_s']:.1f}, opt "
            f"{1000 * variant['optimizer_s']:.1f}, other {1000 * variant['other_s']:.1f}) | "
            f"{variant['tokens_per_second']:.0f} tokens/s | peak "
            f"{variant['memory']['peak_bytes'] / (1 << 20):.1f} MiB"
            + (f" | {ratio:.3f}x baseline step" if ratio is not None else "")
            + (f" [IQR {ratio_spread['q1']:.3f}-{ratio_spread['q3']:.3f}]" if ratio_spread else "")
        )
    return "\n".join(lines + warning_lines(report["ratio_warnings"]))


def warning_lines(warnings: list[dict[str, Any]]) -> list[str]:
    """A log line per unresolved step-time ratio, one more naming the other unresolved ratios."""
    lines = [warning_line(warning) for warning in warnings if warning["metric"] == "step_time"]
    others = [f"{w['variant']} {w['metric']}" for w in warnings if w["metric"] != "step_time"]
    if others:
        lines.append(f"> WARNING: attnres-profile: also unresolved: {', '.join(others)} (see profile.md)")
    return lines


def warning_line(warning: dict[str, Any]) -> str:
    """The log line of one unresolved ratio (the report's ``ratio_warnings``)."""
    return (
        f"> WARNING: attnres-profile: {warning['variant']} {warning['metric']} ratio "
        f"{warning['ratio']:.3f}x is unresolved: {warning['reason']}; run more --timed-steps or on a "
        "quieter machine"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, start workers if needed, profile, write and summarise the report (rank 0)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_start(argv)  # also done on import of the package when started as attnres-profile
    args = parse_profile_args(argv)
    try:
        launch = discover_launch_env()
    except LaunchEnvError as error:
        raise SystemExit(f"error: {error}") from None
    world_size = default_world_size(args)
    if launch.launcher == "single" and world_size > 1:
        resolve_precision(copy.copy(args), resolve_device(args.device))  # refuse FP8 before any worker

        return spawn_workers(argv, world_size, args.device)
    hide_cpu_advice(resolve_device(args.device), args.verbose_warnings)
    missing = optional_packages_line()
    if missing and launch.rank == 0:
        print(f"> {missing}", flush=True)
    from attnres_megatron.profiling.session import run_profile

    report = run_profile(args, argv)
    if report is not None:
        written = write_outputs(report, Path(args.output_dir), plots=not args.no_plots)
        print(_summary(report), flush=True)
        print("> wrote " + ", ".join(str(path) for path in written), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

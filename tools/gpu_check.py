#!/usr/bin/env python
"""GPU check kit: Triton kernels, bandwidth, step time, KDA and FP8 on one GPU, in one command.

Runs the checks of ``tools/gpu_check_cases.py``, each in its own process with a time budget
(one failing, crashing or running out of time does not stop the others), within a deadline
for the whole run, and writes ``gpu_check.json``, ``gpu_check.md`` (ready for docs/gpu.md)
and ``gpu_check.log`` into ``--out``. ``--dry-run`` runs the same code paths on CPU at tiny
shapes (Triton through its interpreter). Usually started by ``scripts/gpu_check.sh``, which
installs the carried wheels first (docs/gpu.md).

Example::

    python tools/gpu_check.py --out runs/gpu_check
    python tools/gpu_check.py --dry-run --out runs/gpu_check_dry
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

SCHEMA_VERSION = 1
JSON_NAME, MARKDOWN_NAME, LOG_NAME = "gpu_check.json", "gpu_check.md", "gpu_check.log"
DEADLINE_S = 450.0
"""The whole run's limit by default (7.5 minutes: the kit must finish within 8 on one H100)."""
MIN_START_S = 20.0
"""A check is not started with less time than this left before the deadline."""
STATUSES = ("passed", "failed", "skipped", "error", "timeout")
TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent


@dataclass(frozen=True)
class Check:
    """One check of the kit: its expected time on one H100 (compiles included) and its budget."""

    name: str
    title: str
    expected_s: float
    budget_s: float

    def command(self) -> str:
        """The command that runs this check alone."""
        return f"bash scripts/gpu_check.sh --only {self.name}"


CHECKS = (  # in order of priority: the deadline cuts the last ones first
    Check("kernels", "(a) Triton kernels vs the fp64 reference, bf16 and fp32, determinism", 60, 150),
    Check("bandwidth", "(b) fused kernel time vs the HBM-bandwidth bound, [4096, 1, 2304] bf16", 30, 90),
    Check("step", "(c) step time: baseline vs Block N=8 vs Full, hidden 2304, seq 4096, bf16", 100, 200),
    Check("two_phase", "two-phase path on CUDA vs the fp64 reference", 15, 60),
    Check("kda", "(d) FLA chunk_kda vs ops/kda.py and the fp64 recurrence", 45, 120),
    Check("te_fp8", "(e) Transformer Engine FP8 steps, only where TE imports", 60, 120),
    Check("pytest_gpu", "pytest -m gpu", 40, 120),
)
BY_NAME = {check.name: check for check in CHECKS}
SEPARATE_IN_DRY_RUN = ("pytest_gpu",)
"""Checks that start a process of their own: in a dry run they run beside the others."""


# ---------------------------------------------------------------------------- the child side


def run_child(names: list[str], result_path: Path, dry_run: bool) -> int:
    """Run ``names`` in this process, rewriting ``result_path`` after each one."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    if dry_run:
        install_interpreter_rounding()
    import gpu_check_cases as cases

    scale = cases.TINY if dry_run else cases.GPU
    results: dict[str, Any] = {"environment": cases.environment(), "checks": {}}
    for name in names:
        print(f"=== {name}", flush=True)
        start = time.monotonic()
        try:
            outcome = asdict(cases.CHECK_FUNCTIONS[name](scale))
        except Exception as exc:  # one failing check must not stop the others
            import traceback

            traceback.print_exc()
            outcome = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
        outcome["seconds"] = round(time.monotonic() - start, 2)
        results["checks"][name] = outcome
        partial = result_path.with_suffix(".partial")
        partial.write_text(json.dumps(results, default=str))
        os.replace(partial, result_path)  # a child killed mid-write leaves the previous file whole
    return 0


def install_interpreter_rounding() -> None:
    """Make Triton's CPU interpreter round fp32 -> bf16 as GPUs do (tests/triton_rounding.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from triton_rounding import install_nearest_rounding

    install_nearest_rounding()


# ---------------------------------------------------------------------------- the parent side


@dataclass
class Running:
    """A started child process running a group of checks."""

    names: list[str]
    process: subprocess.Popen
    result_path: Path
    log_path: Path
    timeout_s: float
    started: float


def child_env(dry_run: bool) -> dict[str, str]:
    """Environment of a child: the repository importable, Triton compiled on GPU and
    interpreted in a dry run (TRITON_INTERPRET is read before the first kernel is built)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="1" if dry_run else "0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if dry_run:
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("TORCH_COMPILE_DISABLE", "1")
    return env


def start_group(names: list[str], dry_run: bool, scratch: Path, timeout_s: float) -> Running:
    """Start a child process running ``names``."""
    tag = "-".join(names)[:60]
    result_path, log_path = scratch / f"{tag}.json", scratch / f"{tag}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", *names, "--result", str(result_path)]
    if dry_run:
        command.append("--dry-run")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=child_env(dry_run),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Running(names, process, result_path, log_path, timeout_s, time.monotonic())


def finish_group(running: Running, log: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Wait for a child (killing its process group past its budget); its environment and results."""
    remaining = max(1.0, running.timeout_s - (time.monotonic() - running.started))
    timed_out = False
    try:
        running.process.wait(timeout=remaining)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(running.process.pid, signal.SIGKILL)
        running.process.wait()
    output = running.log_path.read_text(errors="replace")
    log.write(f"##### {' '.join(running.names)} (exit {running.process.returncode})\n{output}\n")
    found = json.loads(running.result_path.read_text()) if running.result_path.exists() else {}
    checks = found.get("checks", {})
    for name in running.names:
        if name in checks:
            continue
        if timed_out:
            checks[name] = {
                "status": "timeout",
                "reason": f"stopped after its budget of {running.timeout_s:.0f} s",
            }
        else:
            tail = " | ".join(output.strip().splitlines()[-3:])
            checks[name] = {"status": "error", "reason": f"exit {running.process.returncode}: {tail}"}
    return found.get("environment", {}), checks


def groups_for(names: list[str], dry_run: bool) -> list[list[str]]:
    """One process per check on GPU (run one after the other, so timings do not overlap); in a
    dry run one process for the in-process checks and one for each check that starts its own."""
    if not dry_run:
        return [[name] for name in names]
    inline = [n for n in names if n not in SEPARATE_IN_DRY_RUN]
    return [g for g in [inline, *([n] for n in names if n in SEPARATE_IN_DRY_RUN)] if g]


def run_checks(names: list[str], args: argparse.Namespace, log: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every check of ``names`` within the deadline; (environment, results by name)."""
    deadline = time.monotonic() + args.deadline
    environment: dict[str, Any] = {}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        groups = groups_for(names, args.dry_run)
        if args.dry_run:  # tiny shapes: all groups at once
            started = [start_group(g, True, scratch, group_budget(g, deadline)) for g in groups]
        for index, group in enumerate(groups):
            if args.dry_run:
                running = started[index]
            elif deadline - time.monotonic() < MIN_START_S:
                results.update(
                    {n: {"status": "skipped", "reason": "the run's deadline was reached"} for n in group}
                )
                continue
            else:
                running = start_group(group, False, scratch, group_budget(group, deadline))
            env, checks = finish_group(running, log)
            environment = environment or env
            results.update(checks)
    return environment, results


def group_budget(names: list[str], deadline: float) -> float:
    """The budget of a group: its checks' budgets, cut at the deadline."""
    return min(sum(BY_NAME[n].budget_s for n in names), deadline - time.monotonic())


# ---------------------------------------------------------------------------- the report


def build_report(
    names: list[str],
    environment: dict[str, Any],
    results: dict[str, Any],
    args: argparse.Namespace,
    began: float,
) -> dict[str, Any]:
    """The JSON document (schema: tools/gpu_check_schema.json)."""
    checks = []
    for name in names:
        check, result = BY_NAME[name], results[name]
        checks.append(
            {
                "name": name,
                "title": check.title,
                "status": result["status"],
                "reason": result.get("reason"),
                "seconds": result.get("seconds"),
                "expected_s": check.expected_s,
                "budget_s": check.budget_s,
                "command": check.command(),
                "figures": result.get("figures", {}),
                "targets": result.get("targets", []),
                "markdown": "\n".join(result.get("markdown", [])),
            }
        )
    counts = {status: sum(c["status"] == status for c in checks) for status in STATUSES}
    return {
        "schema_version": SCHEMA_VERSION,
        "kit": "attnres-megatron GPU check (scripts/gpu_check.sh)",
        "dry_run": args.dry_run,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - began, 1),
        "deadline_s": args.deadline,
        "environment": environment or fallback_environment(),
        "checks": checks,
        "targets": [dict(t, check=c["name"]) for c in checks for t in c["targets"]],
        "summary": dict(counts, ok=counts["failed"] + counts["error"] + counts["timeout"] == 0),
    }


def fallback_environment() -> dict[str, Any]:
    """Versions from the package metadata, when no check process reported its environment."""
    found = {}
    for key, name in (("torch", "torch"), ("triton", "triton"), ("megatron_core", "megatron-core")):
        try:
            found[key] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[key] = None
    device = "unknown: no check process reported its environment"
    return dict(found, device=device, torch=found["torch"] or "", cuda=None, python=platform.python_version())


def markdown(report: dict[str, Any]) -> str:
    """The summary for docs/gpu.md."""
    env = report["environment"]
    title = (
        "GPU check (dry run on CPU: tiny shapes, no figure here is a GPU figure)"
        if report["dry_run"]
        else "GPU check"
    )
    lines = [f"## {title}", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {env.get(key)} |" for key in ENV_ROWS]
    lines += [f"| run | {report['created']}, {report['seconds']} s (deadline {report['deadline_s']:.0f} s) |"]
    lines += ["", "### Targets", "", "| check | figure | value | target | met |", "|---|---|---:|---|---|"]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"| {t['check']} | {t['name']} | {value} | {t['op']} {t['goal']} | {met} |")
    lines += [
        "",
        "### Checks",
        "",
        "| check | status | seconds | budget (s) | note |",
        "|---|---|---:|---:|---|",
    ]
    for c in report["checks"]:
        seconds = "-" if c["seconds"] is None else c["seconds"]
        lines.append(
            f"| {c['name']} | {c['status']} | {seconds} | {c['budget_s']:.0f} | {c['reason'] or ''} |"
        )
    for c in report["checks"]:
        if c["markdown"]:
            lines += ["", f"### {c['title']}", "", c["markdown"]]
    return "\n".join(lines) + "\n"


ENV_ROWS = (
    "device",
    "compute_capability",
    "device_memory_gib",
    "torch",
    "cuda",
    "triton",
    "python",
    "megatron_core",
    "fla_core",
    "flash_linear_attention",
    "transformer_engine",
    "attn_res_impl_auto",
)


# ---------------------------------------------------------------------------- command line


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """The command line (``--child`` and ``--result`` are the driver's own, for its children)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreted")
    parser.add_argument("--out", default="runs/gpu_check", help="directory for the JSON, markdown and log")
    parser.add_argument("--only", nargs="+", choices=list(BY_NAME), help="run only these checks")
    parser.add_argument("--skip", nargs="+", choices=list(BY_NAME), default=[], help="leave these out")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for the whole run")
    parser.add_argument("--plan", action="store_true", help="print the plan and exit")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def print_plan(names: list[str], dry_run: bool) -> None:
    """Each check, its command, its expected time and budget on one H100."""
    mode = "dry run: tiny shapes on CPU, Triton interpreted" if dry_run else "GPU run"
    print(f"GPU check kit, {mode}; expected seconds on one H100 (compiles included) / budget:")
    for name in names:
        check = BY_NAME[name]
        print(f"  {name:<11} {check.expected_s:>4.0f} / {check.budget_s:>3.0f} s  {check.title}")
        print(f"  {'':<11} {check.command()}")
    total = sum(BY_NAME[n].expected_s for n in names)
    print(f"  expected in all: {total:.0f} s; the run stops at its deadline whatever happens")


def preflight(dry_run: bool) -> list[str]:
    """What stops a GPU run (empty when nothing does); printed, not fatal, in a dry run."""
    problems = []
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        problems.append(
            "megatron-core does not import: install the carried wheels (scripts/gpu_check.sh --help)"
        )
    if not dry_run:
        import torch

        if not torch.cuda.is_available():
            problems.append("no CUDA device: on a CPU machine run --dry-run")
    return problems


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args.child, Path(args.result), args.dry_run)
    names = [n for n in (args.only or list(BY_NAME)) if n not in args.skip]
    print_plan(names, args.dry_run)
    if args.plan:
        return 0
    problems = preflight(args.dry_run)
    for problem in problems:
        print(f"{'note' if args.dry_run else 'error'}: {problem}", file=sys.stderr)
    if problems and not args.dry_run:
        return 2
    began = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOG_NAME, "w") as log:
        environment, results = run_checks(names, args, log)
    report = build_report(names, environment, results, args, began)
    (out / JSON_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / MARKDOWN_NAME).write_text(markdown(report))
    for check in report["checks"]:
        seconds = "-" if check["seconds"] is None else check["seconds"]
        print(f"{check['name']:<11} {check['status']:<8} {seconds:>7} s  {check['reason'] or ''}")
    print(f"wrote {out / JSON_NAME}, {out / MARKDOWN_NAME} and {out / LOG_NAME}")
    return 0 if report["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

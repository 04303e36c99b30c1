"""CPU benchmark of AttnRes depth aggregation (forward + backward) against baselines.

Variants, each timed as one forward plus one backward with a fixed random upstream gradient:

* ``production``: ``attnres_megatron.ops.aggregate`` (memory-lean custom autograd Function);
* ``reference``: ``attnres_megatron.ops.aggregate_reference`` (plain autograd);
* ``residual_add_n``: ``sources[0] + ... + sources[n-1]`` (standard residual stream, n sources);
* ``residual_add_2``: ``h + o`` (one add: the per-sublayer cost of a standard residual).

By default the script re-executes itself once with glibc malloc tuned to keep freed memory
(``--allocator cached``); with stock glibc, large CPU tensors are mmap'ed and unmapped on
every allocation and page faults dominate the timings. ``--allocator system`` disables this.

Example: ``python tools/bench_aggregate.py --dtypes fp32 bf16 --output bench_aggregate.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# glibc settings that keep freed memory in the heap for reuse (no mmap/munmap per large
# tensor), so timings are not dominated by page faults -- closer to a GPU caching allocator.
CACHED_MALLOC_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
    "MALLOC_TOP_PAD_": str(64 << 20),
}
REEXEC_MARKER = "ATTNRES_BENCH_REEXEC"


def maybe_reexec(argv: Sequence[str]) -> None:
    """Re-exec once with ``CACHED_MALLOC_ENV`` before torch loads, unless ``--allocator system``."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--allocator", default="cached")
    requested = pre.parse_known_args(argv)[0].allocator
    if requested != "cached" or os.environ.get(REEXEC_MARKER) or sys.platform != "linux":
        return
    env = {**os.environ, **CACHED_MALLOC_ENV, REEXEC_MARKER: "1"}
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)


if __name__ == "__main__":
    maybe_reexec(sys.argv[1:])

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from attnres_megatron.ops import aggregate, aggregate_reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("production", "reference", "residual_add_n", "residual_add_2")
EPS = 1e-6


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--seq", type=int, default=2048, help="sequence length s")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch size b")
    parser.add_argument("--hidden", type=int, default=2304, help="hidden size h")
    parser.add_argument("--sources", type=int, nargs="+", default=list(range(2, 11)), help="source counts n")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 7; 10 quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--allocator",
        choices=["cached", "system"],
        default="cached",
        help="cached: re-exec with glibc tuned to reuse freed memory (Linux); system: as is",
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI-scale shapes (seq 256, hidden 512) and fewer runs"
    )
    parser.add_argument("--output", type=Path, default=Path("bench_aggregate.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seq, args.hidden = min(args.seq, 256), min(args.hidden, 512)
    if args.repeats is None:
        args.repeats = 10 if args.quick else 7
    if args.warmup is None:
        args.warmup = 1
    if args.repeats < 1 or args.warmup < 0 or min(args.sources) < 1:
        parser.error("need --repeats >= 1, --warmup >= 0 and source counts >= 1")
    return args


def allocator_mode(requested: str) -> str:
    """Allocator setting actually in effect for this process."""
    if requested == "system":
        return "system"
    active = all(os.environ.get(k) == v for k, v in CACHED_MALLOC_ENV.items())
    return (
        "cached (glibc: " + " ".join(f"{k}={v}" for k, v in CACHED_MALLOC_ENV.items()) + ")"
        if active
        else "system (cached malloc settings not applied)"
    )


def dtype_support(dtype: torch.dtype) -> str | None:
    """``None`` if a small matmul plus backward runs in ``dtype`` on this CPU, else the error."""
    try:
        a = torch.randn(16, 16, dtype=dtype, requires_grad=True)
        (a @ a).float().sum().backward()
    except (RuntimeError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def make_step(
    variant: str, sources: list[Tensor], query: Tensor, gain: Tensor, grad_out: Tensor
) -> Callable[[], None]:
    """One forward + backward of ``variant``; grads are returned, never accumulated."""
    if variant == "production":
        inputs = (query, gain, *sources)

        def forward() -> Tensor:
            return aggregate(sources, query, gain, EPS)
    elif variant == "reference":
        inputs = (query, gain, *sources)

        def forward() -> Tensor:
            return aggregate_reference(sources, query, gain, EPS)
    elif variant == "residual_add_n":
        inputs = tuple(sources)

        def forward() -> Tensor:
            out = sources[0]
            for source in sources[1:]:
                out = out + source
            return out
    elif variant == "residual_add_2":
        inputs = (sources[0], sources[1 % len(sources)])

        def forward() -> Tensor:
            return inputs[0] + inputs[1]
    else:
        raise ValueError(f"unknown variant {variant!r}")

    def step() -> None:
        torch.autograd.grad(forward(), inputs, grad_out)

    return step


def time_steps(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Median / min / p90 wall time (ms) per step; steps run round-robin within each repeat."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    stats = {}
    for name, values in times.items():
        values.sort()
        p90 = values[min(len(values) - 1, round(0.9 * (len(values) - 1)))]
        stats[name] = {"median_ms": statistics.median(values), "min_ms": values[0], "p90_ms": p90}
    return stats


def bench_dtype(args: argparse.Namespace, name: str) -> list[dict]:
    """Rows (one per source count) for one dtype."""
    dtype = DTYPES[name]
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.seq, args.batch, args.hidden)
    pool = [torch.randn(shape, generator=gen).to(dtype) for _ in range(max(args.sources))]
    query = (0.02 * torch.randn(args.hidden, generator=gen)).requires_grad_()
    gain = (1.0 + 0.1 * torch.randn(args.hidden, generator=gen)).requires_grad_()
    grad_out = torch.randn(shape, generator=gen).to(dtype)
    rows = []
    for n in args.sources:
        sources = [t.requires_grad_() for t in pool[:n]]
        steps = {v: make_step(v, sources, query, gain, grad_out) for v in VARIANTS}
        row: dict = {"dtype": name, "n": n, **time_steps(steps, args.repeats, args.warmup)}
        prod = row["production"]["median_ms"]
        row["ratio_production_vs_reference"] = prod / row["reference"]["median_ms"]
        row["ratio_production_vs_residual_add_n"] = prod / row["residual_add_n"]["median_ms"]
        row["ratio_production_vs_residual_add_2"] = prod / row["residual_add_2"]["median_ms"]
        rows.append(row)
        print(f"  {name} n={n}: production {prod:.2f} ms", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    """Readable table of medians and ratios."""
    lines = [
        "| dtype | n | production ms | reference ms | residual_add_n ms | residual_add_2 ms "
        "| prod/ref | prod/add_n | prod/add_2 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [row["dtype"], str(row["n"])]
        cells += [f"{row[v]['median_ms']:.2f}" for v in VARIANTS]
        cells += [
            f"{row['ratio_production_vs_reference']:.2f}",
            f"{row['ratio_production_vs_residual_add_n']:.2f}",
            f"{row['ratio_production_vs_residual_add_2']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, write JSON, print a markdown table."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(True)

    notes: list[str] = []
    dtypes = []
    for name in args.dtypes:
        error = dtype_support(DTYPES[name])
        if error is None:
            dtypes.append(name)
        else:
            notes.append(f"{name} skipped: unsupported on this CPU ({error})")

    rows: list[dict] = []
    start = time.perf_counter()
    for name in dtypes:
        rows += bench_dtype(args, name)
    elapsed = time.perf_counter() - start

    result = {
        "metadata": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "shape_sbh": [args.seq, args.batch, args.hidden],
            "sources": args.sources,
            "dtypes_requested": args.dtypes,
            "dtypes_run": dtypes,
            "query_gain_dtype": "fp32",
            "eps": EPS,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "quick": args.quick,
            "allocator": allocator_mode(args.allocator),
            "timing": "time.perf_counter around forward + torch.autograd.grad, milliseconds",
            "elapsed_s": round(elapsed, 2),
            "notes": notes,
        },
        "results": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")

    s, b, h = result["metadata"]["shape_sbh"]
    print(
        f"AttnRes aggregate fwd+bwd, [s={s}, b={b}, h={h}], torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} runs, "
        f"allocator {args.allocator}"
    )
    for note in notes:
        print(f"note: {note}")
    print(markdown(rows))
    print(f"\nwrote {args.output} ({elapsed:.1f} s)")
    return result


if __name__ == "__main__":
    main()

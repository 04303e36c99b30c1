#!/usr/bin/env python
"""Inference cost of the dense proxy: prefill and decode tokens/s and prefill peak memory,
baseline vs Block (N blocks) vs Full AttnRes, one run.

Generation runs as ``attnres-generate`` runs it: Megatron-Core's static KV cache through
``attnres_megatron.inference`` (the model in eval mode, only the last token's logits). Every
variant is built once with its cache; each round then runs, for every variant in turn, a prefill
of ``--seq`` tokens and ``--decode-tokens`` decode steps (greedy), so slow drifts of a shared
machine hit all variants alike. Reported per variant: median prefill and decode tokens/s, and
the time ratios to the baseline as the median of the per-round ratios with their minimum and
maximum (a drift of the machine shows as spread instead of bias).

Peak memory of one prefill, without and with ``--prefill-chunk-size`` chunks: each variant runs
in a fresh Python process with glibc's mmap threshold at 64 KiB (``MALLOC_MMAP_THRESHOLD_``, so a
freed tensor goes back to the OS at once and the resident size follows the live tensors); after
the model is built and a 2-token prefill has set up everything lazy, the kernel's high-water mark
of the resident set (``VmHWM``) is reset through ``/proc/self/clear_refs`` and the prefill's peak
is ``VmHWM`` after it minus ``VmRSS`` before it. The KV cache is counted apart from the tensors it
holds (allocated by the first prefill, the same size chunked or not).

Example::

    python tools/bench_inference.py --output inference.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from bench_fast_ops import synchronize
from proxy_model import (
    ProxyShape,
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

from attnres_megatron.inference import AttnResInferenceWrapper

MMAP_THRESHOLD = str(64 * 1024)
PROBE_FLAG = "--memory-probe"
MEMORY_METHOD = (
    "VmHWM after minus VmRSS before one prefill (high-water mark reset through /proc/self/clear_refs), "
    f"a fresh process per variant with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"
)


def build_wrapper(variant: str, args: argparse.Namespace) -> AttnResInferenceWrapper:
    """The variant's proxy in eval mode, with a KV cache for the prompt and the decode steps."""
    shape = shape_from_args(args)
    config = proxy_config(variant, shape, impl=args.impl, dtype=args.dtype)
    model = build_proxy(config, shape, args.device).eval()
    return AttnResInferenceWrapper(model, shape.batch, shape.seq + args.decode_tokens)


def prompt_buffer(shape: ProxyShape, decode_tokens: int, device: str) -> torch.Tensor:
    """``[b, seq + decode_tokens]`` ids: the prompt, then room for the decoded tokens."""
    tokens, _, _ = proxy_batch(shape, device)
    return torch.cat([tokens, torch.zeros_like(tokens[:, :decode_tokens])], dim=1)


@torch.inference_mode()
def prefill(wrapper: AttnResInferenceWrapper, buffer: torch.Tensor, length: int, chunk: Optional[int] = None):
    """A fresh cache filled with ``buffer[:, :length]``; the seconds it took, the inputs, the logits."""
    wrapper.prep_model_for_inference()
    inputs = wrapper.prep_inference_input(buffer)
    device = buffer.device
    synchronize(device)
    start = time.perf_counter()
    logits = wrapper.prefill(inputs, length, chunk)
    synchronize(device)
    return time.perf_counter() - start, inputs, logits


@torch.inference_mode()
def decode(
    wrapper: AttnResInferenceWrapper, inputs: dict, logits: torch.Tensor, start: int, steps: int
) -> float:
    """Median seconds of ``steps`` greedy decode steps after a prefill of ``start`` tokens."""
    device = logits.device
    times = []
    for position in range(start, start + steps):
        synchronize(device)
        begin = time.perf_counter()
        inputs["tokens"][:, position] = logits[:, -1].argmax(-1)
        logits = wrapper.decode(inputs, position)
        synchronize(device)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def make_round(variant: str, args: argparse.Namespace) -> Callable[[], tuple[float, float]]:
    """One round of a variant: (prefill seconds, median decode step seconds)."""
    shape = shape_from_args(args)
    wrapper = build_wrapper(variant, args)
    buffer = prompt_buffer(shape, args.decode_tokens, args.device)

    def run() -> tuple[float, float]:
        seconds, inputs, logits = prefill(wrapper, buffer, shape.seq)
        return seconds, decode(wrapper, inputs, logits, shape.seq, args.decode_tokens)

    return run


def spread(values: list[float], baseline: list[float]) -> dict[str, Any]:
    """Median of the per-round ratios to the baseline's value of the same round, and their range."""
    ratios = [value / base for value, base in zip(values, baseline)]
    return {"median": statistics.median(ratios), "range": [min(ratios), max(ratios)], "rounds": ratios}


def timing_rows(samples: dict[str, list[tuple[float, float]]], shape: ProxyShape) -> list[dict[str, Any]]:
    """Tokens/s and ratios per variant from the rounds' (prefill, decode step) seconds."""
    base_prefill = [p for p, _ in samples["baseline"]]
    base_decode = [d for _, d in samples["baseline"]]
    rows = []
    for variant, rounds in samples.items():
        prefills, decodes = [p for p, _ in rounds], [d for _, d in rounds]
        rows.append(
            {
                "variant": variant,
                "prefill_ms": statistics.median(prefills) * 1e3,
                "prefill_tokens_per_s": shape.batch * shape.seq / statistics.median(prefills),
                "decode_ms_per_step": statistics.median(decodes) * 1e3,
                "decode_tokens_per_s": shape.batch / statistics.median(decodes),
                "prefill_time_ratio": spread(prefills, base_prefill),
                "decode_time_ratio": spread(decodes, base_decode),
                "prefill_samples_ms": [p * 1e3 for p in prefills],
                "decode_samples_ms": [d * 1e3 for d in decodes],
            }
        )
    return rows


# ---------------------------------------------------------------------------- memory


def resident_kib() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process, in KiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def reset_high_water_mark() -> None:
    """Set ``VmHWM`` back to the current resident size (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


def prefill_peak_mib(
    wrapper: AttnResInferenceWrapper, buffer: torch.Tensor, length: int, chunk: Optional[int]
) -> float:
    """Peak memory growth (MiB) during one prefill into a fresh cache (the cache included): the
    resident set on the CPU, the caching allocator's peak on CUDA."""
    wrapper.inference_context.key_value_memory_dict.clear()
    if buffer.device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        prefill(wrapper, buffer, length, chunk)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = resident_kib()["VmRSS"]
    reset_high_water_mark()
    prefill(wrapper, buffer, length, chunk)
    return (resident_kib()["VmHWM"] - before) / 1024


def kv_cache_mib(wrapper: AttnResInferenceWrapper) -> float:
    """Bytes of the KV cache the last prefill allocated, in MiB."""
    tensors = [t for pair in wrapper.inference_context.key_value_memory_dict.values() for t in pair]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def memory_probe(args: argparse.Namespace) -> dict[str, Any]:
    """In this (fresh) process: the variant's prefill peak without and with chunks."""
    init_single_process(args.device)
    shape = shape_from_args(args)
    wrapper = build_wrapper(args.memory_probe, args)
    buffer = prompt_buffer(shape, args.decode_tokens, args.device)
    prefill(wrapper, buffer, 2)  # lazy set-up (rotary tables, kernels) outside the measurement
    whole = prefill_peak_mib(wrapper, buffer, shape.seq, None)
    chunked = prefill_peak_mib(wrapper, buffer, shape.seq, args.prefill_chunk_size)
    cache = kv_cache_mib(wrapper)
    return {
        "variant": args.memory_probe,
        "kv_cache_mib": cache,
        "prefill_peak_mib": whole,
        "chunked_prefill_peak_mib": chunked,
        "prefill_peak_without_cache_mib": whole - cache,
        "chunked_prefill_peak_without_cache_mib": chunked - cache,
    }


PROBE_SETTINGS = ("layers", "hidden", "heads", "seq", "batch", "blocks", "device", "dtype", "impl")


def probe_argv(args: argparse.Namespace, variant: str) -> list[str]:
    """This run's model, prompt and chunk flags for the probe of ``variant``."""
    argv = [f"--{name}={getattr(args, name)}" for name in PROBE_SETTINGS]
    argv += [f"--decode-tokens={args.decode_tokens}", f"--prefill-chunk-size={args.prefill_chunk_size}"]
    return [*argv, PROBE_FLAG, variant]


def run_memory_probe(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`memory_probe` of ``variant`` in a fresh interpreter with the low mmap threshold."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)
    command = [sys.executable, str(Path(__file__).resolve()), *probe_argv(args, variant)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe of {variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- report


def markdown(rows: list[dict[str, Any]], memory: list[dict[str, Any]], chunk: int) -> str:
    lines = [
        "| variant | prefill tokens/s | prefill time / baseline [min-max] | decode tokens/s "
        "| decode time / baseline [min-max] |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        p, d = row["prefill_time_ratio"], row["decode_time_ratio"]
        lines.append(
            f"| {row['variant']} | {row['prefill_tokens_per_s']:.0f} | {p['median']:.3f} "
            f"[{p['range'][0]:.3f}-{p['range'][1]:.3f}] | {row['decode_tokens_per_s']:.1f} | "
            f"{d['median']:.3f} [{d['range'][0]:.3f}-{d['range'][1]:.3f}] |"
        )
    if memory:
        lines += [
            "",
            f"| variant | KV cache (MiB) | prefill peak (MiB) | chunks of {chunk}: peak (MiB) "
            "| peak without the cache: whole / chunked (MiB) |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in memory:
            lines.append(
                f"| {row['variant']} | {row['kv_cache_mib']:.1f} | {row['prefill_peak_mib']:.1f} | "
                f"{row['chunked_prefill_peak_mib']:.1f} | {row['prefill_peak_without_cache_mib']:.1f} / "
                f"{row['chunked_prefill_peak_without_cache_mib']:.1f} |"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser)  # --seq is the prompt length
    add_variant_args(parser)
    parser.add_argument("--impl", default="auto", help="AttnRes aggregation (--attn-res-impl value)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prefill-chunk-size", type=int, default=128, help="chunk of the memory comparison")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument(PROBE_FLAG, choices=("baseline", "block", "full"), help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_flush_denormal(True)  # as bench_step.py: subnormals make CPU arithmetic erratic
    if args.memory_probe:
        result = memory_probe(args)
        print(json.dumps(result))
        return result
    variants = ["baseline", *args.variants]
    memory = [] if args.no_memory else [run_memory_probe(variant, args) for variant in variants]
    init_single_process(args.device)
    rounds = {variant: make_round(variant, args) for variant in variants}
    samples: dict[str, list[tuple[float, float]]] = {variant: [] for variant in variants}
    for index in range(args.warmup + args.rounds):
        for variant, run in rounds.items():
            timing = run()
            if index >= args.warmup:
                samples[variant].append(timing)
        print(f"round {index + 1}/{args.warmup + args.rounds}", flush=True)
    rows = timing_rows(samples, shape_from_args(args))
    result = {
        "meta": {
            "settings": {k: v for k, v in vars(args).items() if k != "memory_probe"},
            **run_info(args.device),
            "memory_method": MEMORY_METHOD if args.device == "cpu" else "torch.cuda.max_memory_allocated",
        },
        "rows": rows,
        "memory": memory,
    }
    print()
    print(markdown(rows, memory, args.prefill_chunk_size))
    write_json(args.output, result)
    return result


if __name__ == "__main__":
    main()

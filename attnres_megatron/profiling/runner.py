"""One rank's profile: every variant built with the same seed and fed the same batches, their
steps run round-robin (one step of every variant per round) and timed through Megatron's schedule
timers, then one instrumented step per variant for memory and aggregation time."""

from __future__ import annotations

import argparse
import gc
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from attnres_megatron.pipeline.ledger import get_byte_ledger
from attnres_megatron.pipeline.schedule import get_forward_backward_func
from attnres_megatron.profiling.memory import CudaPeakMeter, SavedActivationTracker, static_memory
from attnres_megatron.profiling.nvtx import AggregationProbe, depth_attention_modules, nvtx_range
from attnres_megatron.profiling.precision import PrecisionPlan
from attnres_megatron.profiling.timers import (
    NEXT_RANK_TIMERS,
    P2P_TIMERS,
    PREVIOUS_RANK_TIMERS,
    ScheduleTimers,
    Stopwatch,
)
from attnres_megatron.profiling.variants import variant_args
from attnres_megatron.training.data import DataParallelBatches
from attnres_megatron.training.evaluation import (  # every RNG stream a step can draw from
    restore_rng_states,
    rng_states,
)
from attnres_megatron.training.model_setup import (
    TrainingSetup,
    config_from_args,
    run_schedule,
    setup_training,
)
from attnres_megatron.training.pretrain import forward_step, reduced_loss
from attnres_megatron.training.vocabulary import padded_vocab_size


def reseed(seed: int) -> None:
    """Seed exactly as ``initialize_parallel`` does, so every variant starts from the same RNG."""
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def round_robin_order(variants: Sequence[str], warmup: int, timed: int) -> list[tuple[str, int, str]]:
    """(phase, round, variant) in run order: the warmup rounds, then the timed rounds; each round
    runs one step of every variant, starting one variant later than the round before."""
    rounds = [("warmup", index) for index in range(warmup)] + [("timed", index) for index in range(timed)]
    order = []
    for position, (phase, index) in enumerate(rounds):
        turn = position % len(variants)
        order += [(phase, index, variant) for variant in [*variants[turn:], *variants[:turn]]]
    return order


def variant_groups(variants: Sequence[str], sequential: bool) -> list[list[str]]:
    """The variants alive at once: all of them (interleaved), or one at a time (sequential)."""
    return [[variant] for variant in variants] if sequential else [list(variants)]


class VariantRun:
    """The model, optimizer, RNG streams and instruments of one variant on this rank."""

    def __init__(
        self,
        variant: str,
        args: argparse.Namespace,
        setup: TrainingSetup,
        data: DataParallelBatches,
        device: str,
        meter: CudaPeakMeter,
    ) -> None:
        self.variant = variant
        self.args = args
        self.setup = setup
        self.data = data
        self.device = device
        self.meter = meter
        self.rng = rng_states()  # this variant's own streams, as if it ran alone
        self.clock = Stopwatch(device)
        self.timers = ScheduleTimers(self.clock)
        setup.config.timers = self.timers
        self.probe = AggregationProbe(depth_attention_modules(setup.unwrapped()), self.clock).attach()
        self.schedule = get_forward_backward_func()
        self.last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.step_index = 0
        self.steps: list[dict[str, Any]] = []
        self.losses: list[Optional[float]] = []
        for chunk in setup.chunks:
            chunk.train()

    @contextmanager
    def own_rng(self) -> Iterator[None]:
        """Run the block on this variant's RNG streams, then keep where they got to."""
        restore_rng_states(self.rng)
        try:
            yield
        finally:
            self.rng = rng_states()

    def step(
        self, label: str, region: Optional[AbstractContextManager] = None, record_peak: bool = False
    ) -> dict[str, Any]:
        """One training iteration; returns its time split, start time and loss."""
        setup, args = self.setup, self.args
        with self.own_rng(), self.meter.measure(record_peak):
            batches = self.data.batches(self.step_index)
            self.step_index += 1
            self.timers.reset()
            with nvtx_range(f"attnres-profile/{self.variant}/{label}"):
                start = self.clock.now()
                for chunk in setup.chunks:
                    chunk.zero_grad_buffer()
                setup.optimizer.zero_grad()
                with region or nullcontext():
                    outputs = run_schedule(self.schedule, setup, args, batches, forward_step)
                middle = self.clock.now()
                with nvtx_range("attnres-profile/optimizer"):
                    setup.optimizer.step()
                    setup.scheduler.step(increment=1)
                end = self.clock.now()
        record = {
            "start": start,
            "step_s": end - start,
            "forward_s": self.timers.seconds("forward-compute"),
            "backward_s": self.timers.seconds("backward-compute"),
            "forward_cpu_s": self.timers.cpu_seconds("forward-compute"),
            "backward_cpu_s": self.timers.cpu_seconds("backward-compute"),
            "optimizer_s": end - middle,
            "p2p_s": self.timers.seconds(*P2P_TIMERS),
            "next_rank_p2p_s": self.timers.seconds(*NEXT_RANK_TIMERS),
            "previous_rank_p2p_s": self.timers.seconds(*PREVIOUS_RANK_TIMERS),
            "timers": self.timers.totals(),
            "loss": reduced_loss(outputs) if self.last_stage else None,
        }
        self.losses.append(record["loss"])
        return record

    def close(self) -> None:
        """Remove hooks and timers so nothing of this variant outlives it."""
        self.probe.detach()
        self.setup.config.timers = None


def _rank_info() -> dict[str, int]:
    return {
        "rank": torch.distributed.get_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "cp_rank": parallel_state.get_context_parallel_rank(),
        "dp_rank": parallel_state.get_data_parallel_rank(),
    }


def _boundaries(setup: TrainingSetup) -> list[dict[str, int]]:
    """Chunk boundaries of this model with the sources each carries (cached and naive)."""
    config = setup.config
    layout = getattr(setup.unwrapped()[0].decoder, "attn_res_layout", None)
    chunks = config.pipeline_model_parallel_size * (config.virtual_pipeline_model_parallel_size or 1)
    rows = []
    for index in range(1, chunks):
        row = {"sender_chunk": index - 1, "receiver_chunk": index}
        if layout is not None:
            receiver = layout.chunks[index]
            row.update(
                sources=layout.sources_received(receiver),
                sources_naive=layout.sources_received(receiver, False),
            )
        rows.append(row)
    return rows


def _hidden_state_bytes(args: argparse.Namespace, config) -> int:
    """Bytes of one [s, b, h] hidden state as Megatron sends it between stages (per micro-batch)."""
    rows = args.seq_length // config.context_parallel_size
    if config.sequence_parallel:
        rows //= config.tensor_model_parallel_size
    element = torch.tensor([], dtype=config.pipeline_dtype).element_size()
    return rows * args.micro_batch_size * config.hidden_size * element


def build_variant(
    args: argparse.Namespace,
    variant: str,
    device: str,
    plan: PrecisionPlan,
    data: DataParallelBatches,
) -> VariantRun:
    """This rank's model, optimizer and instruments of ``variant``, from the profile's seed."""
    vargs = variant_args(args, variant)
    try:
        config = config_from_args(vargs, device)
    except ValueError as error:
        raise SystemExit(f"error: variant {variant}: {error}") from None
    for name, value in plan.config_fields().items():
        setattr(config, name, value)
    meter = CudaPeakMeter(enabled=device == "cuda")
    reseed(args.seed)
    with meter.measure(record_peak=False):
        setup = setup_training(vargs, config, padded_vocab_size(vargs), device)
    return VariantRun(variant, vargs, setup, data, device, meter)


def run_rounds(
    runs: dict[str, VariantRun], warmup: int, timed: int, origin: Optional[float] = None
) -> Optional[float]:
    """Warmup and timed steps round-robin; timed steps are kept with their start time
    (``started_s``, seconds since ``origin``: this rank's first timed step unless given) and
    count in the CUDA peak. Returns the origin."""
    for phase, index, variant in round_robin_order(list(runs), warmup, timed):
        timed_step = phase == "timed"
        record = runs[variant].step(f"{phase}{index}", record_peak=timed_step)
        start = record.pop("start")
        if timed_step:
            origin = start if origin is None else origin
            runs[variant].steps.append({**record, "started_s": start - origin})
    return origin


def finish_variant(run: VariantRun, args: argparse.Namespace) -> dict[str, Any]:
    """One instrumented step (memory, aggregation time, pipeline bytes), the traced step if
    asked for, and this rank's results of ``run``."""
    setup, config = run.setup, run.setup.config
    memory = static_memory(setup.chunks, setup.optimizer)
    tracker = SavedActivationTracker(exclude=memory.pop("keys"))
    run.probe.reset(timing=True)
    ledger = get_byte_ledger().reset()
    instrumented = run.step("instrumented", tracker.track())
    ledger.enable(False)
    run.probe.timing = False
    if args.torch_profiler:
        _traced_step(run, args.torch_profiler)
    return {
        **_rank_info(),
        "variant": run.variant,
        "attention_residuals": config.attention_residuals,
        "sublayers_per_block": config.attn_res_sublayers_per_block,
        "sources_at_output": config.attn_res_num_sources_at_output() if config.attn_res_enabled else None,
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "interleaved": bool(config.virtual_pipeline_model_parallel_size),
        "parameters": sum(p.numel() for chunk in setup.chunks for p in chunk.parameters()),
        "attn_res_parameters": sum(p.numel() for _, m in run.probe.modules for p in m.parameters()),
        "steps": run.steps,
        "losses": run.losses,
        "memory": {
            **memory,
            "peak_saved_activation_bytes": tracker.peak,
            "cuda_peak_bytes": run.meter.peak if run.device == "cuda" else None,
        },
        "aggregation": {"calls_per_step": run.probe.calls, "forward_s": run.probe.seconds},
        "instrumented_step": {k: instrumented[k] for k in ("step_s", "forward_s", "backward_s")},
        "ledger": ledger.summary(),
        "boundaries": _boundaries(setup),
        "hidden_state_bytes": _hidden_state_bytes(run.args, config),
        "num_micro_batches": run.data.num_micro_batches,
    }


def profile_variants(
    args: argparse.Namespace, device: str, plan: PrecisionPlan, data: DataParallelBatches
) -> list[dict[str, Any]]:
    """This rank's results of every variant in ``args.variants``, in that order: each group of
    variants is built, stepped round-robin, instrumented and freed before the next group."""
    results, origin = [], None
    for group in variant_groups(args.variants, args.sequential_variants):
        runs: dict[str, VariantRun] = {}
        try:
            for variant in group:
                runs[variant] = build_variant(args, variant, device, plan, data)
            origin = run_rounds(runs, args.warmup_steps, args.timed_steps, origin)
            results += [finish_variant(run, args) for run in runs.values()]
        finally:
            for run in runs.values():
                run.close()
            runs.clear()
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    return results


def _traced_step(run: VariantRun, directory: str) -> dict[str, Any]:
    """One extra step under ``torch.profiler`` written as a TensorBoard trace."""
    from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU]
    if run.device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    handler = tensorboard_trace_handler(
        directory, worker_name=f"{run.variant}-rank{torch.distributed.get_rank()}"
    )
    with profile(activities=activities, record_shapes=True, on_trace_ready=handler):
        return run.step("traced")

"""One rank's profile: every variant built with the same seed, fed the same batches, timed
through Megatron's schedule timers, then one instrumented step for memory and aggregation time."""

from __future__ import annotations

import argparse
import gc
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from attnres_megatron.pipeline.ledger import get_byte_ledger
from attnres_megatron.pipeline.schedule import get_forward_backward_func
from attnres_megatron.profiling.memory import (
    SavedActivationTracker,
    cuda_peak_bytes,
    reset_cuda_peak,
    static_memory,
)
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


class VariantRun:
    """The model, optimizer and instruments of one variant on this rank."""

    def __init__(
        self, args: argparse.Namespace, setup: TrainingSetup, data: DataParallelBatches, device: str
    ) -> None:
        self.args = args
        self.setup = setup
        self.data = data
        self.device = device
        self.clock = Stopwatch(device)
        self.timers = ScheduleTimers(self.clock)
        setup.config.timers = self.timers
        self.probe = AggregationProbe(depth_attention_modules(setup.unwrapped()), self.clock).attach()
        self.schedule = get_forward_backward_func()
        self.last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.step_index = 0
        for chunk in setup.chunks:
            chunk.train()

    def step(self, label: str, region: Optional[AbstractContextManager] = None) -> dict[str, Any]:
        """One training iteration; returns its time split and loss."""
        setup, args = self.setup, self.args
        batches = self.data.batches(self.step_index)
        self.step_index += 1
        self.timers.reset()
        with nvtx_range(f"attnres-profile/{label}"):
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
        return {
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

    def close(self) -> None:
        """Remove hooks and timers so the next variant starts clean."""
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


def profile_variant(
    args: argparse.Namespace,
    variant: str,
    device: str,
    plan: PrecisionPlan,
    data: DataParallelBatches,
) -> dict[str, Any]:
    """Warm up, time, then measure memory and aggregation time of one variant on this rank."""
    vargs = variant_args(args, variant)
    try:
        config = config_from_args(vargs, device)
    except ValueError as error:
        raise SystemExit(f"error: variant {variant}: {error}") from None
    for name, value in plan.config_fields().items():
        setattr(config, name, value)
    reseed(args.seed)
    setup = setup_training(vargs, config, padded_vocab_size(vargs), device)
    get_byte_ledger().reset()
    run = VariantRun(vargs, setup, data, device)
    try:
        losses = []
        for index in range(args.warmup_steps):
            losses.append(run.step(f"{variant}/warmup{index}")["loss"])
        reset_cuda_peak()
        steps = []
        for index in range(args.timed_steps):
            steps.append(run.step(f"{variant}/timed{index}"))
            losses.append(steps[-1]["loss"])
        cuda_peak = cuda_peak_bytes()
        memory = static_memory(setup.chunks, setup.optimizer)
        tracker = SavedActivationTracker(exclude=memory.pop("keys"))
        run.probe.reset(timing=True)
        instrumented = run.step(f"{variant}/instrumented", tracker.track())
        losses.append(instrumented["loss"])
        run.probe.timing = False
        traced = None
        if args.torch_profiler:
            traced = _traced_step(run, variant, args.torch_profiler)
            losses.append(traced["loss"])
        attn_res_params = sum(p.numel() for _, m in run.probe.modules for p in m.parameters())
        result = {
            **_rank_info(),
            "variant": variant,
            "attention_residuals": config.attention_residuals,
            "sublayers_per_block": config.attn_res_sublayers_per_block,
            "sources_at_output": config.attn_res_num_sources_at_output() if config.attn_res_enabled else None,
            "num_layers": config.num_layers,
            "hidden_size": config.hidden_size,
            "interleaved": bool(config.virtual_pipeline_model_parallel_size),
            "parameters": sum(p.numel() for chunk in setup.chunks for p in chunk.parameters()),
            "attn_res_parameters": attn_res_params,
            "steps": steps,
            "losses": losses,
            "memory": {
                **memory,
                "peak_saved_activation_bytes": tracker.peak,
                "cuda_peak_bytes": cuda_peak if device == "cuda" else None,
            },
            "aggregation": {"calls_per_step": run.probe.calls, "forward_s": run.probe.seconds},
            "instrumented_step": {k: instrumented[k] for k in ("step_s", "forward_s", "backward_s")},
            "ledger": get_byte_ledger().summary(),
            "boundaries": _boundaries(setup),
            "hidden_state_bytes": _hidden_state_bytes(args, config),
            "num_micro_batches": data.num_micro_batches,
        }
    finally:
        run.close()
        del run, setup
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def _traced_step(run: VariantRun, variant: str, directory: str) -> dict[str, Any]:
    """One extra step under ``torch.profiler`` written as a TensorBoard trace."""
    from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU]
    if run.device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    handler = tensorboard_trace_handler(
        directory, worker_name=f"{variant}-rank{torch.distributed.get_rank()}"
    )
    with profile(activities=activities, record_shapes=True, on_trace_ready=handler):
        return run.step(f"{variant}/traced")

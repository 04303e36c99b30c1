"""Process groups for ``attnres-pretrain``: torchrun, mpirun, srun or a single process."""

from __future__ import annotations

from datetime import timedelta
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from attnres_megatron.compat.cpu_malloc import retain_freed_memory
from attnres_megatron.compat.registry import install_adaptations
from attnres_megatron.training.launch_env import (
    LOOPBACK,
    LaunchEnv,
    discover_launch_env,
    export_for_torch,
    free_port,
)

DEFAULT_TIMEOUT_MINUTES = 10.0
"""Megatron-LM's ``--distributed-timeout-minutes`` default."""


def resolve_device(requested: str) -> str:
    """'auto' -> cuda when available, else cpu; refuse cuda on a machine without it."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was requested but CUDA is not available; use --device cpu.")
    return requested


def initialize_parallel(
    device: str,
    seed: int,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: Optional[int] = None,
    launch_env: Optional[LaunchEnv] = None,
    backend: Optional[str] = None,
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
) -> None:
    """Start ``torch.distributed`` (``backend``; default gloo on CPU, NCCL on GPU) unless already
    started, then Megatron's parallel groups and RNG (Megatron-LM's seeding: +100 per pipeline stage);
    every group's operations time out after ``timeout_minutes`` (Megatron-LM's
    ``--distributed-timeout-minutes``)."""
    install_adaptations(device)
    if device == "cpu":
        retain_freed_memory()
    if not torch.distributed.is_initialized():
        env = launch_env or discover_launch_env()
        export_for_torch(env)
        if device == "cuda":
            torch.cuda.set_device(env.local_rank)
        torch.distributed.init_process_group(
            backend or ("nccl" if device == "cuda" else "gloo"),
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def shutdown_parallel() -> None:
    """Tear down Megatron's groups and the default process group."""
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def start_single_process(device: str = "cpu", seed: int = 1234) -> None:
    """A world of one process for tools (gloo on a free local port, whatever launcher variables
    say) with Megatron's parallel state and the device's adaptations; kept when one is up."""
    if not torch.distributed.is_initialized():
        port = free_port(LOOPBACK)
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://{LOOPBACK}:{port}", rank=0, world_size=1
        )
    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel(device, seed)

"""Process-group setup for ``attnres-pretrain`` (single process or torchrun)."""

from __future__ import annotations

import os

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from attnres_megatron.compat.cpu_backend import enable_cpu_backend


def resolve_device(requested: str) -> str:
    """'auto' -> cuda when available, else cpu; refuse cuda on a machine without it."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was requested but CUDA is not available; use --device cpu.")
    return requested


def initialize_parallel(
    device: str, seed: int, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1
) -> None:
    """Start ``torch.distributed`` (gloo on CPU, NCCL on GPU), Megatron's groups and RNG."""
    if device == "cpu":
        enable_cpu_backend()
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(
            "nccl" if device == "cuda" else "gloo", rank=rank, world_size=world_size
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    model_parallel_cuda_manual_seed(seed)


def shutdown_parallel() -> None:
    """Tear down Megatron's groups and the default process group."""
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

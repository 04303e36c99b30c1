"""Shared fixtures: one single-rank gloo process group for the in-process tests."""

from __future__ import annotations

import os

# Triton kernels run in its interpreter on CPU; this must be set before anything (Megatron
# included) imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import socket
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=UserWarning)

if importlib.util.find_spec("triton") is not None:
    from triton_rounding import install_nearest_rounding

    install_nearest_rounding()  # the interpreter rounds fp32 -> bf16 as GPUs do


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def single_rank():
    """A world of one process with Megatron's parallel state and the CPU backend."""
    from megatron.core import parallel_state

    from attnres_megatron.compat.cpu_backend import enable_cpu_backend
    from attnres_megatron.training.distributed import initialize_parallel

    enable_cpu_backend()
    # An explicit init_method keeps launcher variables out of os.environ, where
    # subprocesses started by other tests would inherit them.
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    initialize_parallel("cpu", seed=1234)
    yield
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@pytest.fixture
def reseed(single_rank):
    """Reseed torch and Megatron's RNG tracker so each model build starts identically."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    def _reseed(seed: int = 1234) -> None:
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)

    return _reseed

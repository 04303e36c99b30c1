"""Megatron-LM's training loop (``megatron.training.pretrain``) with AttnRes, on GPU and on CPU.

On every device the loop runs its pipeline schedules through the AttnRes wrapper
(:func:`install_attnres_schedule`), and, when ``megatron.core`` is the installed wheel (which
ships the dataset helpers built and no Makefile), Megatron-LM's ``make`` of those helpers is
skipped (:func:`install_prebuilt_dataset_helpers`).

Megatron-LM core_r0.16 asks for CUDA in three ways: ``initialize_megatron`` asserts it;
``_initialize_distributed`` and ``_set_random_seed`` set up model parallelism and the
model-parallel seeds only when ``torch.cuda.device_count() > 0``; and the loop places tensors
with ``device='cuda'``, ``Tensor.cuda()`` and ``torch.cuda`` memory and RNG calls. For
``--device cpu`` on a machine without CUDA the CPU entries of the registry (this module's
``install_*`` functions below the schedule's) answer these from the CPU, and :func:`on_cpu`
runs ``pretrain`` under :class:`~attnres_megatron.compat.cpu_backend.CudaToCpuMode`, which
serves every remaining ``device='cuda'`` placement and ``Tensor.cuda()`` from the CPU.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

from attnres_megatron.compat.cpu_backend import CudaToCpuMode, ModuleStandIn


def install_attnres_schedule() -> None:
    """Point Megatron-LM's loop at the AttnRes schedule (it looks the function up at every call)."""
    from megatron.core import pipeline_parallel
    from megatron.training import training

    from attnres_megatron.pipeline import schedule

    current = getattr(training, "get_forward_backward_func", None)
    if current is schedule.get_forward_backward_func:
        return
    if current is not pipeline_parallel.get_forward_backward_func:
        raise RuntimeError(
            "megatron.training.training.get_forward_backward_func is not Megatron-Core's "
            f"({current!r}); this Megatron-LM is not the core_r0.16 layout the AttnRes pipeline "
            "schedule is installed into."
        )
    training.get_forward_backward_func = schedule.get_forward_backward_func


def _wheel_dataset_helpers() -> Optional[Path]:
    """The built dataset helpers of the installed megatron-core wheel, if it ships them."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("megatron-core")
    except PackageNotFoundError:
        return None
    for name in dist.files or ():
        if name.parent.as_posix() == "megatron/core/datasets" and name.name.startswith("helpers_cpp"):
            return Path(dist.locate_file(name))
    return None


def install_prebuilt_dataset_helpers() -> None:
    """Use built dataset helpers instead of Megatron-LM's ``make`` when they are not built here."""
    import importlib.machinery
    import importlib.util
    import sys

    from megatron.core import datasets
    from megatron.core.datasets import utils

    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is None:
        built = _wheel_dataset_helpers()
        if built is None:
            return  # nothing built anywhere: Megatron-LM's make it is
        name = "megatron.core.datasets.helpers_cpp"
        loader = importlib.machinery.ExtensionFileLoader(name, str(built))
        spec = importlib.util.spec_from_file_location(name, built, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        sys.modules[name] = datasets.helpers_cpp = module
    utils.compile_helpers = lambda: None


def install_initialize_without_cuda() -> None:
    """``pretrain`` calls ``initialize_megatron(..., allow_no_cuda=True)``."""
    from megatron.training import initialize, training

    training.initialize_megatron = functools.partial(initialize.initialize_megatron, allow_no_cuda=True)


def install_distributed_setup_on_cpu() -> None:
    """Model parallelism and its seeds set up as on one GPU per process; no fused-kernel build."""
    from megatron.training import initialize

    # torch.cuda reporting one device, whose set_device is a no-op
    one_device = ModuleStandIn(torch.cuda, device_count=lambda: 1, set_device=lambda device: None)
    initialize.torch = ModuleStandIn(torch, cuda=one_device)
    initialize.fused_kernels = types.SimpleNamespace(load=lambda args: None)


def install_arch_version_on_cpu() -> None:
    """``get_device_arch_version()`` is 10 on the CPU: no CUDA stream-connection requirement."""
    from megatron.training import arguments

    arguments.get_device_arch_version = lambda: 10


def install_no_jit_warmup() -> None:
    """No JIT warm-up (torch >= 2.2 sets no JIT flags; the warm-up only compiles CUDA fusions)."""
    from megatron.training import training

    training.set_jit_fusion_options = lambda: None


def install_loader_generators() -> None:
    """Megatron-LM's data loaders draw their worker base seed from a generator of their own."""
    from megatron.training import training

    build = training.build_pretraining_data_loader

    @functools.wraps(build)
    def build_with_own_generator(dataset: Any, consumed_samples: int) -> Any:
        loader = build(dataset, consumed_samples)
        if isinstance(loader, torch.utils.data.DataLoader) and loader.generator is None:
            loader.generator = torch.Generator().manual_seed(torch.initial_seed())
        return loader

    training.build_pretraining_data_loader = build_with_own_generator


def _zero(*args: Any, **kwargs: Any) -> int:
    return 0


def install_cuda_queries_on_cpu() -> None:
    """Memory statistics (zero), RNG state (the CPU generator's) and cache calls of ``torch.cuda``."""
    for name in (
        "memory_allocated",
        "max_memory_allocated",
        "memory_reserved",
        "max_memory_reserved",
        "device_memory_used",
    ):
        setattr(torch.cuda, name, _zero)
    torch.cuda.memory_stats = lambda *args, **kwargs: {}
    torch.cuda.reset_peak_memory_stats = lambda *args, **kwargs: None
    torch.cuda.empty_cache = lambda: None
    # The CPU generator plays the CUDA one's part; Megatron-LM saves it as the CPU state too.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)


def on_cpu(pretrain: Callable[..., Any]) -> Callable[..., Any]:
    """``pretrain`` running under :class:`CudaToCpuMode`."""

    @functools.wraps(pretrain)
    def pretrain_on_cpu(*args: Any, **kwargs: Any) -> Any:
        with CudaToCpuMode():
            return pretrain(*args, **kwargs)

    return pretrain_on_cpu

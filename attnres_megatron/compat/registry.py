"""Every change this plugin makes to Megatron-Core, Megatron-LM or ``torch.cuda``, in one table.

Each :class:`Adaptation` names its target (what is replaced or wrapped), the releases it is
written for, why it exists and where it applies: ``scope="cpu"`` entries adapt CUDA
assumptions to the CPU and are installed only for ``--device cpu`` on a machine without
CUDA; ``scope="all"`` entries fix defects or plug the AttnRes pipeline schedule in on every
device. Entry points (``attnres-pretrain``, ``attnres-profile``, the Megatron-LM routes, the
tools) call :func:`install_adaptations` once; model builders never do. A script of your
own that builds AttnRes models calls it the same way::

    from attnres_megatron.compat import install_adaptations
    install_adaptations("cuda")            # or "cpu"; megatron_lm=True inside Megatron-LM's loop

``python -m attnres_megatron.compat.registry`` prints the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnres_megatron.compat import cpu_backend, megatron_fixes, megatron_lm_loop, pipeline_shapes
from attnres_megatron.compat.versions import (
    MEGATRON_CORE_REQUIREMENT,
    check_megatron_core_version,
    check_megatron_lm_version,
)

MEGATRON_LM_RELEASE = "Megatron-LM core_r0.16 (core_v0.16.0, core_v0.16.1)"
SCOPES = ("cpu", "all")


@dataclass(frozen=True)
class Adaptation:
    """One replaced or wrapped attribute, and why."""

    target: str
    package: str  # "megatron-core", "megatron-lm" or "torch"
    scope: str  # "cpu" or "all"
    reason: str
    install: Callable[[], None]

    @property
    def versions(self) -> str:
        """The releases the adaptation is written for."""
        return MEGATRON_LM_RELEASE if self.package == "megatron-lm" else MEGATRON_CORE_REQUIREMENT


_CORE_RANDOM = "megatron.core.tensor_parallel.random"

ADAPTATIONS: tuple[Adaptation, ...] = (
    Adaptation(
        f"{_CORE_RANDOM}._CUDA_RNG_STATE_TRACKER",
        "megatron-core",
        "cpu",
        "the model-parallel RNG tracker forks CUDA generators; on CPU it forks CPU generator states",
        cpu_backend.install_rng_tracker,
    ),
    Adaptation(
        "torch.cuda.current_device, Stream, Event, stream, synchronize, manual_seed",
        "torch",
        "cpu",
        "Megatron-Core places tensors on torch.cuda.current_device() and orders work on CUDA streams",
        cpu_backend.install_cuda_runtime_stand_ins,
    ),
    Adaptation(
        "megatron.core.optimizer.{optimizer,distrib_optimizer,grad_scaler} methods",
        "megatron-core",
        "cpu",
        "the optimizers build device='cuda' tensors and check 'torch.cuda.*Tensor' types",
        cpu_backend._serve_optimizers_from_cpu,
    ),
    Adaptation(
        "megatron.core.models.common.language_module.language_module."
        "LanguageModule.setup_embeddings_and_output_layer",
        "megatron-core",
        "cpu",
        "tied embeddings across pipeline stages are synchronised after a .cuda() move",
        cpu_backend.install_embedding_sync_on_cpu,
    ),
    Adaptation(
        "megatron.core.pipeline_parallel.schedules.torch",
        "megatron-core",
        "cpu",
        "the schedules build their loss and p2p buffers with device='cuda'",
        cpu_backend.install_schedule_factories_on_cpu,
    ),
    Adaptation(
        "megatron.core.pipeline_parallel.p2p_communication.torch (isend, send, P2POp)",
        "megatron-core",
        "cpu",
        "gloo sends read the tensor from a background thread while the schedules swap a sent "
        "activation's storage out (deallocate_output_tensor); sends get an alias that keeps it",
        cpu_backend.install_detached_pipeline_sends,
    ),
    Adaptation(
        "megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu",
        "megatron-core",
        "cpu",
        "the alltoall dispatcher expects its split sizes as host arrays after a device-to-host copy",
        cpu_backend.install_host_split_sizes,
    ),
    Adaptation(
        "megatron.core.transformer.moe.moe_utils.te_general_gemm",
        "megatron-core",
        "all",
        "only defined when Transformer Engine imports, yet the router tests it with 'is not None'",
        megatron_fixes.install_router_gemm_fallback,
    ),
    Adaptation(
        "megatron.core.transformer.multi_latent_attention.HAVE_TE",
        "megatron-core",
        "all",
        "without TE, TELinear is a placeholder while HAVE_TE stays true, and MLA's isinstance fails",
        megatron_fixes.install_mla_without_te,
    ),
    Adaptation(
        f"{_CORE_RANDOM}.CheckpointWithoutOutput.__init__",
        "megatron-core",
        "all",
        "selective recompute queries TE's FP8 state, a NameError without TE",
        megatron_fixes.install_recompute_without_fp8_query,
    ),
    Adaptation(
        "megatron.core.pipeline_parallel.p2p_communication.P2PCommunicator._communicate_shapes",
        "megatron-core",
        "all",
        "AttnRes stage payloads have planned widths; exchanging shapes deadlocks interleaved rings",
        pipeline_shapes.install_planned_shapes,
    ),
    Adaptation(
        "megatron.training.training.get_forward_backward_func",
        "megatron-lm",
        "all",
        "Megatron-LM's loop must run its schedules through the AttnRes wrapper (planned payloads)",
        megatron_lm_loop.install_attnres_schedule,
    ),
    Adaptation(
        "megatron.core.datasets.utils.compile_helpers",
        "megatron-lm",
        "all",
        "Megatron-LM builds its dataset helpers at start-up with make, python3-config and pybind11; "
        "when they are already built (or the installed megatron-core wheel of the same release ships "
        "them, which is then used) the build is skipped",
        megatron_lm_loop.install_prebuilt_dataset_helpers,
    ),
    Adaptation(
        "megatron.training.training.initialize_megatron",
        "megatron-lm",
        "cpu",
        "asserts CUDA; called with allow_no_cuda=True",
        megatron_lm_loop.install_initialize_without_cuda,
    ),
    Adaptation(
        "megatron.training.initialize.torch, megatron.training.initialize.fused_kernels",
        "megatron-lm",
        "cpu",
        "model parallelism and its seeds are set up only when torch.cuda.device_count() > 0; "
        "the legacy fused kernels need nvcc",
        megatron_lm_loop.install_distributed_setup_on_cpu,
    ),
    Adaptation(
        "megatron.training.arguments.get_device_arch_version",
        "megatron-lm",
        "cpu",
        "reads the CUDA device's architecture; with TP or CP below 10 (Blackwell) it then requires "
        "CUDA_DEVICE_MAX_CONNECTIONS=1, a CUDA stream setting without meaning on the CPU: 10 there",
        megatron_lm_loop.install_arch_version_on_cpu,
    ),
    Adaptation(
        "megatron.training.training.set_jit_fusion_options",
        "megatron-lm",
        "cpu",
        "its warm-up draws random device='cuda' tensors, which on CPU would shift the generator "
        "that initialises the weights; there is nothing to warm up on CPU",
        megatron_lm_loop.install_no_jit_warmup,
    ),
    Adaptation(
        "megatron.training.training.build_pretraining_data_loader",
        "megatron-lm",
        "cpu",
        "each data loader draws a seed from the CPU generator, which on CPU also draws the dropout "
        "masks (on GPU the CUDA one does); the loaders get a generator of their own",
        megatron_lm_loop.install_loader_generators,
    ),
    Adaptation(
        "torch.cuda memory statistics, get_rng_state, set_rng_state, empty_cache",
        "torch",
        "cpu",
        "Megatron-LM's loop reports CUDA memory, saves the CUDA generator and empties the cache",
        megatron_lm_loop.install_cuda_queries_on_cpu,
    ),
)

_INSTALLED: set[str] = set()


def adaptations_for(device: str, megatron_lm: bool = False) -> list[Adaptation]:
    """The entries that apply on ``device`` (``"cpu"`` or ``"cuda"``), Megatron-LM's only if asked."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda'; got {device!r}.")
    return [
        entry
        for entry in ADAPTATIONS
        if (entry.scope == "all" or device == "cpu") and (megatron_lm or entry.package != "megatron-lm")
    ]


def install_adaptations(device: str, megatron_lm: bool = False) -> list[Adaptation]:
    """Install the adaptations for ``device`` once per process; the CPU ones refuse a CUDA machine."""
    wanted = adaptations_for(device, megatron_lm)
    if device == "cpu" and torch.cuda.is_available():
        raise RuntimeError(
            "The CPU backend must not be enabled where CUDA is available; "
            "run with --device cuda (the default on GPU machines)."
        )
    check_megatron_core_version()
    if megatron_lm:
        check_megatron_lm_version()
    for entry in wanted:
        if entry.target not in _INSTALLED:
            entry.install()
            _INSTALLED.add(entry.target)
    return wanted


def installed_targets() -> frozenset[str]:
    """Targets installed in this process so far."""
    return frozenset(_INSTALLED)


def describe() -> str:
    """The table as text: scope, package, target, versions and reason of each entry."""
    lines = []
    for entry in ADAPTATIONS:
        lines.append(f"[{entry.scope}] {entry.package}: {entry.target}")
        lines.append(f"    {entry.reason} ({entry.versions})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())

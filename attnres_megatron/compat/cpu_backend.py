"""CPU/gloo backend for Megatron-Core.

Megatron-Core 0.16 places tensors with ``torch.cuda.current_device()`` and forks
dropout RNG through a CUDA generator tracker. On a machine without CUDA this module
(and only this module) redirects those to the CPU:

* ``torch.cuda.current_device`` returns ``"cpu"``, so every ``device=`` argument built
  from it places tensors on the CPU;
* the model-parallel RNG tracker keeps CPU generator states instead of CUDA ones, so
  dropout under tensor parallelism forks and restores exactly as on GPU;
* ``torch.cuda.manual_seed`` seeds the CPU default generator (on GPU the default CUDA
  generator carries the data-parallel seed; on CPU that role falls to the CPU one).

It is activated explicitly with :func:`enable_cpu_backend` (``--device cpu``, or
automatically by the launcher when CUDA is absent) and refuses to run where CUDA is
available, so the GPU path always stays stock Megatron-Core.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_ENABLED = False


class CpuRNGStatesTracker:
    """Drop-in for Megatron's ``CudaRNGStatesTracker`` that tracks CPU generator states."""

    def __init__(self) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator()
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)


def _cpu_current_device() -> str:
    return "cpu"


def enable_cpu_backend() -> None:
    """Redirect Megatron-Core's CUDA assumptions to the CPU. Idempotent."""
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "The CPU backend must not be enabled where CUDA is available; "
            "run with --device cuda (the default on GPU machines)."
        )
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.current_device = _cpu_current_device
    # The default generator carries the data-parallel seed, as the CUDA one does on GPU.
    torch.cuda.manual_seed = torch.manual_seed
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mcore_random.initialize_rng_tracker = lambda *args, **kwargs: None
    _ENABLED = True


def cpu_backend_enabled() -> bool:
    """Whether :func:`enable_cpu_backend` has run in this process."""
    return _ENABLED

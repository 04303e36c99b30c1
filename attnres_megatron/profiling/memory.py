"""Memory accounting: parameter, gradient and optimizer-state bytes, saved activations, CUDA peaks.

On CPU there is no allocator peak to read, so the profiler adds up what training keeps
alive: unique storages of the parameters, of the gradient buffers (Megatron DDP's
``main_grad``), of the optimizer state (Adam moments, fp32 main copies), and the peak of
the tensors autograd keeps for backward, tracked with ``saved_tensors_hooks``. On CUDA the
peak comes from ``torch.cuda.max_memory_allocated`` per variant (:class:`CudaPeakMeter`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

StorageKey = tuple[str, int]


def storage_key(tensor: Tensor) -> StorageKey:
    """Identity of the memory behind a tensor (views share their base's key)."""
    try:
        return (str(tensor.device), tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError, TypeError):
        return ("object", id(tensor))


def storage_bytes(tensor: Tensor) -> int:
    """Bytes of the whole storage behind a tensor (what keeping the tensor keeps alive)."""
    try:
        return tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return tensor.numel() * tensor.element_size()


def unique_bytes(tensors: Iterable[Tensor], exclude: set[StorageKey] = frozenset()) -> tuple[int, set]:
    """Bytes of the distinct storages among ``tensors`` (skipping ``exclude``), and their keys."""
    seen: set[StorageKey] = set()
    total = 0
    for tensor in tensors:
        if not isinstance(tensor, Tensor) or tensor.device.type == "meta":
            continue
        key = storage_key(tensor)
        if key in seen or key in exclude:
            continue
        seen.add(key)
        total += storage_bytes(tensor)
    return total, seen


def _inner_optimizers(optimizer: Any) -> Iterator[torch.optim.Optimizer]:
    """The torch optimizers inside Megatron's (chained, mixed-precision) optimizer wrappers."""
    pending = [optimizer]
    while pending:
        current = pending.pop()
        if isinstance(current, torch.optim.Optimizer):
            yield current
        elif hasattr(current, "chained_optimizers"):
            pending.extend(current.chained_optimizers)
        elif getattr(current, "optimizer", None) is not None:
            pending.append(current.optimizer)


def _optimizer_tensors(optimizer: Any) -> Iterator[Tensor]:
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                yield param
                if param.grad is not None:
                    yield param.grad
        for state in inner.state.values():
            yield from (value for value in state.values() if isinstance(value, Tensor))


def static_memory(chunks: list[torch.nn.Module], optimizer: Any) -> dict[str, Any]:
    """Parameter, gradient-buffer and optimizer-state bytes (unique storages) and their keys."""
    params = [p for chunk in chunks for p in chunk.parameters()]
    parameter_bytes, param_keys = unique_bytes(params)
    grads = [
        getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad for p in params
    ]
    gradient_bytes, grad_keys = unique_bytes([g for g in grads if g is not None], exclude=param_keys)
    optimizer_bytes, _ = unique_bytes(_optimizer_tensors(optimizer), exclude=param_keys | grad_keys)
    return {
        "parameter_bytes": parameter_bytes,
        "gradient_bytes": gradient_bytes,
        "optimizer_state_bytes": optimizer_bytes,
        "keys": param_keys | grad_keys,
    }


class _Saved:
    """What autograd stores instead of a saved tensor while tracking (released with the graph)."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


class SavedActivationTracker:
    """Live and peak bytes of the distinct storages autograd saves for backward.

    A storage saved by several ops (AttnRes sources are read by every later mix) counts
    once; storages in ``exclude`` (parameters, gradient buffers) are not activations.
    A storage stops counting when the last graph node that saved it is freed.
    """

    def __init__(self, exclude: set[StorageKey] = frozenset()) -> None:
        self.exclude = set(exclude)
        self.live: dict[StorageKey, list[int]] = {}
        self.current = 0
        self.peak = 0

    def _pack(self, tensor: Tensor) -> Any:
        key = storage_key(tensor)
        if key in self.exclude or tensor.device.type == "meta":
            return tensor
        entry = self.live.get(key)
        if entry is None:
            size = storage_bytes(tensor)
            self.live[key] = [size, 1]
            self.current += size
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        saved = _Saved(tensor)
        weakref.finalize(saved, self._release, key)
        return saved

    def _release(self, key: StorageKey) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    @staticmethod
    def _unpack(saved: Any) -> Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    @contextmanager
    def track(self) -> Iterator[SavedActivationTracker]:
        """Count what autograd saves inside this block."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self


class CudaPeakMeter:
    """One variant's CUDA peak while other variants' models share the device: the bytes it keeps
    allocated (left behind by its build and by each of its steps) plus the largest rise of
    ``torch.cuda.memory_allocated`` above the level at the start of one of its measured steps.
    Off (every figure 0) unless ``enabled``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.resident = 0
        self.peak = 0

    @contextmanager
    def measure(self, record_peak: bool = True) -> Iterator[None]:
        """Account for what the block allocates; ``record_peak`` counts its rise in the peak."""
        if not self.enabled:
            yield
            return
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield
        if record_peak:
            self.peak = max(self.peak, self.resident + torch.cuda.max_memory_allocated() - before)
        self.resident += torch.cuda.memory_allocated() - before

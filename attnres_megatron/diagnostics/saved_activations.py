"""Bytes that autograd keeps for backward, attributed to the transformer layer that saved them.

Measured with ``torch.autograd.graph.saved_tensors_hooks`` during one forward pass: every
tensor packed for backward is recorded with the layer running at the time. At the end of the
forward the distinct storages still holding memory are summed (a storage saved by several
ops counts once, for the first layer that saved it). Parameter storages are not activations
and are left out; outputs released by Megatron's ``CheckpointWithoutOutput`` (storage resized
to zero until recomputed in backward) count as zero, as they cost nothing until then.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import Tensor

OUTSIDE_LAYERS = "outside layers"
"""Owner of tensors saved by the embedding, the final aggregation, norm and output layer."""


@dataclass
class SavedActivations:
    """Saved-for-backward bytes per owner (``"layer N"`` or :data:`OUTSIDE_LAYERS`)."""

    per_owner: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.per_owner.values())

    def layers(self) -> dict[str, int]:
        """Only the transformer layers' bytes."""
        return {owner: b for owner, b in self.per_owner.items() if owner != OUTSIDE_LAYERS}


def _storage_id(tensor: Tensor) -> int:
    return tensor.untyped_storage()._cdata


@contextmanager
def measure_saved_activations(model: torch.nn.Module) -> Iterator[SavedActivations]:
    """Measure what the forward passes inside the ``with`` block save for backward.

    The result is filled in when the block exits; run the backward pass after it.
    """
    result = SavedActivations()
    parameters = {_storage_id(p) for p in model.parameters()}
    owner = [OUTSIDE_LAYERS]
    packed: list[tuple[str, Tensor]] = []

    def pack(tensor: Tensor) -> Tensor:
        packed.append((owner[0], tensor))
        return tensor

    def enter(module, *_):
        owner[0] = f"layer {module.layer_number}"

    def leave(*_):
        owner[0] = OUTSIDE_LAYERS

    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    handles = [
        h for m in layers for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield result
    finally:
        for handle in handles:
            handle.remove()
    seen = set(parameters)
    for name, tensor in packed:
        storage = _storage_id(tensor)
        if storage in seen:
            continue
        seen.add(storage)
        result.per_owner[name] = result.per_owner.get(name, 0) + tensor.untyped_storage().nbytes()
    packed.clear()

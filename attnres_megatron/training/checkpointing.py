"""Megatron-Core distributed checkpoints for ``attnres-pretrain``: save, exact resume,
loading under another TP/PP layout, and warm starts of AttnRes from baseline checkpoints.

Layout (Megatron-LM's): ``SAVE/iter_0000100/`` holds the sharded checkpoint and
``SAVE/latest_checkpointed_iteration.txt`` names the newest one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from torch.distributed.checkpoint.api import CheckpointException

# torch.distributed.checkpoint wraps reader failures in CheckpointException, a BaseException.
READ_ERRORS = (Exception, CheckpointException)

TRACKER_FILE = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the model."""


@dataclass
class LoadedCheckpoint:
    """What a load restored: where to resume and what was not in the checkpoint."""

    iteration: int
    data_state: Any = None
    warm_start: bool = False
    missing_keys: list[str] = field(default_factory=list)


def _model_keys(count: int) -> list[str]:
    return ["model"] if count == 1 else [f"model{i}" for i in range(count)]


def _rng_state() -> ShardedObject:
    """This rank's RNG states, one object per (pipeline, tensor) rank, as Megatron-LM does."""
    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    pp, tp = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )
    rank = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
    )
    return ShardedObject(
        "rng_state",
        state,
        (pp, tp),
        rank,
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def save_checkpoint(setup, iteration: int, root: str, data_state: Any = None, args: Any = None) -> str:
    """Save model chunks, optimizer, scheduler, RNG and data position at ``iteration``."""
    chunks = setup.unwrapped()
    state: dict[str, Any] = {
        key: chunk.sharded_state_dict() for key, chunk in zip(_model_keys(len(chunks)), chunks)
    }
    state["optimizer"] = setup.optimizer.sharded_state_dict(state)
    state["scheduler"] = setup.scheduler.state_dict()
    state["iteration"] = iteration
    state["data_state"] = data_state
    state["rng_state"] = _rng_state()
    state["args"] = (
        {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
        if args is not None
        else {}
    )
    path = iteration_dir(root, iteration)
    if torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(state, path)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(root, TRACKER_FILE), "w") as handle:
            handle.write(str(iteration))
    torch.distributed.barrier()
    return path


def latest_iteration(root: str) -> int:
    """The iteration named by the tracker file; a clear error when there is none."""
    tracker = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(tracker):
        raise CheckpointError(
            f"--load {root}: no {TRACKER_FILE} there; point --load at a directory written by --save."
        )
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"--load {root}: {TRACKER_FILE} holds {text!r}, not an iteration number.")
    path = iteration_dir(root, int(text))
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise CheckpointError(f"--load {root}: checkpoint directory {path} is missing or incomplete.")
    return int(text)


def load_checkpoint(setup, root: str, load_optimizer: bool = True) -> LoadedCheckpoint:
    """Load the latest checkpoint under ``root`` into ``setup`` (before any training step).

    ``load_optimizer=False`` restores the model weights, iteration and data position only,
    which works under any TP/PP layout (optimizer and per-rank RNG states need the saving
    layout; the scheduler restarts from the loaded iteration).

    A checkpoint without AttnRes parameters (a baseline run) warm-starts the AttnRes model:
    the weights it has are loaded, AttnRes parameters keep their initial values and are
    reported as missing, and training starts at iteration 0 with a fresh optimizer. Any
    other missing parameter is an error.
    """
    iteration = latest_iteration(root)
    path = iteration_dir(root, iteration)
    chunks = setup.unwrapped()
    keys = _model_keys(len(chunks))
    request: dict[str, Any] = {key: chunk.sharded_state_dict() for key, chunk in zip(keys, chunks)}
    try:
        available = set(dist_checkpointing.load_tensors_metadata(path))
    except READ_ERRORS as error:  # any reader failure means a broken checkpoint
        raise CheckpointError(f"--load {root}: cannot read {path}: {error}") from None
    missing = sorted(
        sharded.key
        for key in keys
        for sharded in request[key].values()
        if hasattr(sharded, "key")
        and sharded.key not in available
        and not sharded.key.endswith("_extra_state")
    )
    not_attn_res = [name for name in missing if "attn_res" not in name]
    if not_attn_res:
        raise CheckpointError(
            f"--load {root}: the checkpoint lacks {len(not_attn_res)} model tensor(s) such as "
            f"{not_attn_res[:3]}; it was saved for a different model (check --model, --num-layers, "
            "--hidden-size and the MoE settings)."
        )
    warm_start = bool(missing)
    missing_names = sorted(
        name
        for key in keys
        for name, sharded in request[key].items()
        if hasattr(sharded, "key") and sharded.key in missing
    )
    for key in keys:
        request[key] = {
            name: sharded
            for name, sharded in request[key].items()
            if not (hasattr(sharded, "key") and sharded.key in missing) and not name.endswith("_extra_state")
        }
    if not warm_start and load_optimizer:  # optimizer and per-rank RNG need the saving layout
        request["optimizer"] = setup.optimizer.sharded_state_dict(request, is_loading=True)
        request["rng_state"] = _rng_state()
    try:
        loaded = dist_checkpointing.load(request, path)
    except READ_ERRORS as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"--load {root}: {path} is incomplete or corrupted ({reason})") from None
    for key, chunk in zip(keys, chunks):
        result = chunk.load_state_dict(loaded[key], strict=False)
        unexpected = [
            k for k in result.missing_keys if "attn_res" not in k and not k.endswith("_extra_state")
        ]
        if unexpected:
            raise CheckpointError(f"--load {root}: parameters not restored: {unexpected[:3]}")
    if warm_start:
        return LoadedCheckpoint(0, None, True, missing_names)
    if load_optimizer:
        setup.optimizer.load_state_dict(loaded["optimizer"])
        setup.scheduler.load_state_dict(loaded["scheduler"])
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["torch"])
        get_cuda_rng_tracker().set_states(rng["tracker"])
    return LoadedCheckpoint(int(loaded["iteration"]), loaded.get("data_state"), False, [])


def describe_load(result: LoadedCheckpoint, root: Optional[str]) -> str:
    if result.warm_start:
        return (
            f"> warm start from baseline checkpoint {root}: {len(result.missing_keys)} AttnRes "
            f"tensors not in the checkpoint keep their initial values: {', '.join(result.missing_keys)}"
        )
    return f"> resumed from {root} at iteration {result.iteration}"

"""Megatron-Core distributed checkpoints for ``attnres-pretrain``: atomic, verified saves, exact
resume, loading under another TP/PP layout, warm starts of AttnRes from baseline checkpoints,
and the checks a resume makes before any work.

Layout (Megatron-LM's): ``SAVE/iter_0000100/`` holds the sharded checkpoint and
``SAVE/latest_checkpointed_iteration.txt`` names the newest one (see ``checkpoint_files.py`` for
how a save gets there atomically). Every pickle read from a checkpoint goes through the
allowlist of ``safe_unpickle.py``; every file is checked against the manifest
(``checkpoint_manifest.py``) before it is read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from torch.distributed.checkpoint.api import CheckpointException

from attnres_megatron.training import resume, safe_unpickle
from attnres_megatron.training.checkpoint_files import (
    MEGATRON_METADATA,
    TRACKER_FILE,
    complete_checkpoints,
    fault_point,
    iteration_dir,
    prepare_staging,
    publish,
    read_tracker,
    resolve,
    run_id_of,
    staging_dir,
)
from attnres_megatron.training.checkpoint_manifest import (
    ManifestError,
    checkpoint_files,
    find_mismatches,
    hash_files,
    read_manifest,
)

safe_unpickle.install()  # before anything here (or a caller) reads a checkpoint

# torch.distributed.checkpoint wraps reader failures in CheckpointException, a BaseException.
READ_ERRORS = (Exception, CheckpointException)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, unsafe, or does not fit the run."""


@dataclass
class LoadedCheckpoint:
    """What a load restored: where to resume and what was not in the checkpoint."""

    iteration: int
    data_state: Any = None
    warm_start: bool = False
    missing_keys: list[str] = field(default_factory=list)
    consumed_samples: int = 0
    run_id: Optional[str] = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Preflight:
    """The start-up verdict on ``--load``/``--save``: lines to print, or that nothing is left to train."""

    lines: list[str] = field(default_factory=list)
    finished: Optional[str] = None


def new_run_id() -> str:
    """A fresh run's id (saved in each manifest: whose checkpoint is whose)."""
    return uuid.uuid4().hex


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


def _reason(error: BaseException) -> str:
    """The line of a (possibly wrapped, per-rank) error that says what went wrong."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    refused = [line for line in lines if "refused to unpickle" in line or "are not loaded" in line]
    return (refused or lines or [type(error).__name__])[-1]


# ---------------------------------------------------------------------------- save


def save_checkpoint(
    setup, iteration: int, root: str, data_state: Any = None, args: Any = None, run_id: Optional[str] = None
) -> str:
    """Save model chunks, optimizer, scheduler, RNG and data position at ``iteration``: into a
    temporary directory, then a manifest, then renamed into place and named by the tracker."""
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
    if args is not None:
        state["model_signature"] = resume.model_signature(setup.config, args)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        prepare_staging(root, iteration)
    torch.distributed.barrier()
    staging = staging_dir(root, iteration)
    fault_point("staging")
    try:
        dist_checkpointing.save(state, staging)
    except READ_ERRORS:
        if rank == 0:  # a failed save (e.g. a full disk) leaves no partial directory behind
            shutil.rmtree(staging, ignore_errors=True)
        raise
    torch.distributed.barrier()
    fault_point("shards")
    names: list[Any] = [checkpoint_files(staging) if rank == 0 else None]
    torch.distributed.broadcast_object_list(names, src=0)
    digests: list[Any] = [None] * world
    torch.distributed.all_gather_object(digests, hash_files(staging, names[0][rank::world], sync=True))
    if rank == 0:
        publish(root, iteration, {k: v for part in digests for k, v in part.items()}, run_id)
    torch.distributed.barrier()
    return iteration_dir(root, iteration)


# ---------------------------------------------------------------------------- reading


def latest_iteration(root: str) -> int:
    """The iteration named by the tracker file; a clear error when there is none."""
    text = read_tracker(root)
    if text is None:
        raise CheckpointError(
            f"--load {root}: no {TRACKER_FILE} there; point --load at a directory written by --save."
        )
    if not text.isdigit():
        raise CheckpointError(f"--load {root}: {TRACKER_FILE} holds {text!r}, not an iteration number.")
    if resolve(root, int(text)) is None:
        raise CheckpointError(
            f"--load {root}: checkpoint directory {iteration_dir(root, int(text))} is missing or incomplete."
        )
    return int(text)


def latest_checkpoint(root: str) -> tuple[int, str]:
    """The latest iteration under ``root`` and the directory that holds it."""
    iteration = latest_iteration(root)
    return iteration, str(resolve(root, iteration))


def verify_checkpoint(path: str, root: str) -> Optional[str]:
    """Check the files of ``path`` against its manifest (the work split over the ranks when the
    process group is up); a note when it has none (an older checkpoint), an error naming the file."""
    metadata = os.path.join(path, MEGATRON_METADATA)
    try:
        with open(metadata) as handle:
            backends = json.load(handle)
    except (OSError, ValueError):
        raise CheckpointError(
            f"--load {root}: {path} is incomplete or corrupted ({metadata} unreadable)"
        ) from None
    if backends.get("sharded_backend") != "torch_dist" or backends.get("common_backend") != "torch":
        raise CheckpointError(
            f"--load {root}: {path} is not a torch_dist checkpoint ({MEGATRON_METADATA}: {backends}); "
            "attnres-pretrain reads only the torch_dist format it writes."
        )
    try:
        manifest = read_manifest(path)
    except ManifestError as error:
        raise CheckpointError(f"--load {root}: {path} is incomplete or corrupted: {error}") from None
    if manifest is None:
        return f"> note: {path} has no checksum manifest (saved by an older attnres-pretrain): not verified"
    names = sorted(manifest["files"])
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (
        (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    )
    problems = find_mismatches(path, manifest, names[rank::world])
    if distributed:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, problems)
        problems = [problem for part in gathered for problem in part]
    if problems:
        raise CheckpointError(
            f"--load {root}: {path} is incomplete or corrupted: {'; '.join(sorted(problems)[:5])}. "
            "Restore it, or load an earlier checkpoint (edit the number in "
            f"{os.path.join(root, TRACKER_FILE)})."
        )
    return None


def read_common(path: str, root: str) -> dict[str, Any]:
    """The checkpoint's common (non-sharded) state, unpickled with the allowlist."""
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except READ_ERRORS as error:
        raise CheckpointError(f"--load {root}: cannot read {path}: {_reason(error)}") from None
    if not isinstance(common, dict):
        raise CheckpointError(f"--load {root}: {path} holds no attnres-pretrain checkpoint state.")
    return common


# ---------------------------------------------------------------------------- start-up checks


def checkpoint_preflight(args: argparse.Namespace, config: Any) -> Preflight:
    """Before any work: the ``--load`` checkpoint fits this run (model, layout, schedule) and is
    not already finished, and ``--save`` would not destroy another run's checkpoints."""
    result, start, run_id = Preflight(), 0, None
    if args.load:
        iteration, path = latest_checkpoint(args.load)
        common = read_common(path, args.load)
        saved_args = common.get("args") if isinstance(common.get("args"), dict) else {}
        saved = common.get("model_signature") or resume.legacy_signature(saved_args)
        new = resume.model_signature(config, args)
        changes = resume.model_changes(saved, new)
        if changes:
            raise CheckpointError(
                f"--load {args.load}: the checkpoint holds another model than these flags build: "
                f"{'; '.join(changes)}. Pass the model flags of the run that saved it, or --load a "
                "checkpoint of this model."
            )
        if not resume.is_warm_start(saved, new):
            start, run_id = iteration, run_id_of(path)
            if iteration >= args.train_iters:
                result.finished = (
                    f"> {args.load} holds iteration {iteration} and --train-iters is {args.train_iters}: "
                    "training is already done (raise --train-iters to train further)."
                )
                return result
            if not args.no_load_optim:
                result.lines += _resume_state_checks(args, common, saved_args)
            saved_batch = saved_args.get("global_batch_size")
            if isinstance(saved_batch, int) and saved_batch != args.global_batch_size:
                consumed = resume.consumed_samples(common.get("data_state"), iteration, saved_batch)
                result.lines.append(
                    f"> --global-batch-size {args.global_batch_size} (checkpoint: {saved_batch}): "
                    f"training continues after the {consumed} samples the checkpoint consumed."
                )
    if args.save:
        result.lines += check_save_dir(args.save, run_id, start, args.overwrite_checkpoints)
    return result


def _resume_state_checks(args: argparse.Namespace, common: dict, saved_args: dict) -> list[str]:
    """Optimizer and scheduler states: the saving layout, and the schedule flags (Megatron-LM's rule)."""
    layout = resume.layout_changes(saved_args, args)
    if layout:
        raise CheckpointError(
            f"--load {args.load}: the checkpoint was saved under another layout ({'; '.join(layout)}); "
            "its optimizer and RNG states need the saving layout. Pass --no-load-optim to load the "
            "weights only (fresh optimizer and schedule), or run with the saving layout."
        )
    changes = resume.schedule_changes(common.get("scheduler") or {}, resume.expected_schedule(args))
    if not changes:
        return []
    listed = "; ".join(changes)
    if args.override_opt_param_scheduler:
        return [f"> {resume.OVERRIDE}: the schedule takes this run's values ({listed})"]
    if args.use_checkpoint_opt_param_scheduler:
        return [f"> {resume.USE_CHECKPOINT}: the schedule keeps the checkpoint's values ({listed})"]
    raise CheckpointError(
        f"--load {args.load}: the learning-rate schedule differs from the checkpoint's: {listed}. Pass "
        f"{resume.OVERRIDE} to use this run's values, or {resume.USE_CHECKPOINT} to keep the "
        "checkpoint's (or the saving run's flags)."
    )


def check_save_dir(root: str, run_id: Optional[str], start: int, overwrite: bool) -> list[str]:
    """Refuse (unless ``overwrite``) a ``--save`` directory holding checkpoints this run would replace."""
    owners = {iteration: run_id_of(path) for iteration, path in complete_checkpoints(root).items()}
    text = read_tracker(root)
    tracker = int(text) if text is not None and text.isdigit() else None
    reasons = resume.save_conflicts(owners, tracker, run_id, start)
    if not reasons:
        return []
    if not overwrite:
        raise CheckpointError(
            f"--save {root} holds {' and '.join(reasons)}. Save to another directory, resume that run "
            f"with --load {root}, or pass --overwrite-checkpoints to replace them."
        )
    return [
        f"> --overwrite-checkpoints: --save {root} holds {' and '.join(reasons)}; each save of this run "
        "replaces that iteration's checkpoint and points the tracker at its own"
    ]


# ---------------------------------------------------------------------------- load


def _apply_schedule_flags(scheduler: Any, args: Optional[argparse.Namespace]) -> None:
    """Megatron-LM's --override-opt_param-scheduler / --use-checkpoint-opt_param-scheduler."""
    if args is None:
        return
    override = bool(getattr(args, "override_opt_param_scheduler", False))
    scheduler.override_opt_param_scheduler = override
    # Without either flag the start-up check made the values equal: the checkpoint's are this run's.
    scheduler.use_checkpoint_opt_param_scheduler = not override


def load_checkpoint(
    setup,
    root: str,
    load_optimizer: bool = True,
    args: Optional[argparse.Namespace] = None,
    verify: bool = True,
) -> LoadedCheckpoint:
    """Load the latest checkpoint under ``root`` into ``setup`` (before any training step).

    The files are checked against the manifest first (``verify``), and every pickle in them is
    read with the allowlist. ``load_optimizer=False`` restores the model weights, iteration and
    data position only, which works under any TP/PP layout (optimizer and per-rank RNG states
    need the saving layout; the scheduler restarts).

    A checkpoint without AttnRes parameters (a baseline run) warm-starts the AttnRes model:
    the weights it has are loaded, AttnRes parameters keep their initial values and are
    reported as missing, and training starts at iteration 0 with a fresh optimizer. Any
    other missing parameter is an error.
    """
    iteration, path = latest_checkpoint(root)
    notes = []
    if path != iteration_dir(root, iteration):
        notes.append(
            f"> {iteration_dir(root, iteration)} is missing (a save was killed while replacing it): "
            f"loading its complete previous copy {path}"
        )
    note = verify_checkpoint(path, root) if verify else None
    notes += [note] if note else []
    chunks = setup.unwrapped()
    keys = _model_keys(len(chunks))
    request: dict[str, Any] = {key: chunk.sharded_state_dict() for key, chunk in zip(keys, chunks)}
    try:
        available = set(dist_checkpointing.load_tensors_metadata(path))
    except READ_ERRORS as error:  # any reader failure means a broken checkpoint
        raise CheckpointError(f"--load {root}: cannot read {path}: {_reason(error)}") from None
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
        hint = ""
        if load_optimizer and not warm_start:
            hint = " (saved under another TP/PP layout? --no-load-optim loads the weights only)"
        raise CheckpointError(
            f"--load {root}: {path} is incomplete or corrupted ({_reason(error)}){hint}"
        ) from None
    for key, chunk in zip(keys, chunks):
        result = chunk.load_state_dict(loaded[key], strict=False)
        unexpected = [
            k for k in result.missing_keys if "attn_res" not in k and not k.endswith("_extra_state")
        ]
        if unexpected:
            raise CheckpointError(f"--load {root}: parameters not restored: {unexpected[:3]}")
    if warm_start:
        return LoadedCheckpoint(0, None, True, missing_names, notes=notes)
    if load_optimizer:
        setup.optimizer.load_state_dict(loaded["optimizer"])
        _apply_schedule_flags(setup.scheduler, args)
        setup.scheduler.load_state_dict(loaded["scheduler"])
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["torch"])
        get_cuda_rng_tracker().set_states(rng["tracker"])
    saved_args = loaded.get("args") if isinstance(loaded.get("args"), dict) else {}
    data_state = loaded.get("data_state")
    consumed = resume.consumed_samples(
        data_state, int(loaded["iteration"]), saved_args.get("global_batch_size")
    )
    return LoadedCheckpoint(int(loaded["iteration"]), data_state, False, [], consumed, run_id_of(path), notes)


def describe_load(result: LoadedCheckpoint, root: Optional[str]) -> str:
    if result.warm_start:
        return (
            f"> warm start from baseline checkpoint {root}: {len(result.missing_keys)} AttnRes "
            f"tensors not in the checkpoint keep their initial values: {', '.join(result.missing_keys)}"
        )
    return f"> resumed from {root} at iteration {result.iteration}"

"""Megatron-Core distributed checkpoints for ``attnres-pretrain``: atomic, verified saves, exact
resume, loading under another TP/PP layout, warm starts of AttnRes from baseline checkpoints,
and the checks a resume makes before any work.

Layout (Megatron-LM's): ``SAVE/iter_0000100/`` holds the sharded checkpoint and
``SAVE/latest_checkpointed_iteration.txt`` names the newest one (see ``checkpoint_files.py`` for
how a save gets there atomically). Content (Megatron-LM's too, ``checkpoint_format.py``): a
checkpoint saved here resumes in Megatron-LM's training loop, and one saved by Megatron-LM's
loop resumes here. Every pickle read from a checkpoint goes through the allowlist of
``safe_unpickle.py``; every file is checked against the manifest (``checkpoint_manifest.py``)
before it is read (Megatron-LM's checkpoints have none: they load with a note).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.random import (
    convert_cuda_rng_state,
    get_cuda_rng_tracker,
    is_graph_safe_cuda_rng_tracker,
)
from torch.distributed.checkpoint.api import CheckpointException

from attnres_megatron.models.families import model_family
from attnres_megatron.training import checkpoint_format, resume, safe_unpickle
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
from attnres_megatron.training.checkpoint_format import FormatError
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


def _legacy_rng_state() -> ShardedObject:
    """This rank's RNG states as attnres-pretrain saved them before the interchange (a dict,
    one object per (pipeline, tensor) rank): the request that loads such checkpoints."""
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


def _uses_cuda_generator() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _rng_state() -> ShardedObject:
    """This rank's RNG states in Megatron-LM's format and sharding (``get_rng_state``): Python's,
    numpy's, torch's, the CUDA generator's (torch's on the CPU, as Megatron-LM's CPU route saves
    it) and the model-parallel tracker's."""
    states = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if _uses_cuda_generator() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    ps = parallel_state
    shape, offset, replica = checkpoint_format.megatron_rng_sharding(
        (ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()),
        (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        (
            ps.get_data_parallel_rank(with_context_parallel=True),
            ps.get_data_parallel_world_size(with_context_parallel=True),
        ),
        ps.get_expert_model_parallel_world_size(),
    )
    return ShardedObject(
        "rng_state", checkpoint_format.rng_to_megatron(states), shape, offset, replica_id=replica
    )


def _restore_rng(states: dict[str, Any]) -> None:
    """Set the RNG states :func:`checkpoint_format.rng_from_checkpoint` read."""
    if states.get("random") is not None:
        random.setstate(states["random"])
    if states.get("numpy") is not None:
        np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if (
        _uses_cuda_generator()
        and isinstance(cuda, torch.Tensor)
        and cuda.numel() == torch.cuda.get_rng_state().numel()
    ):
        torch.cuda.set_rng_state(cuda)
    tracker = get_cuda_rng_tracker()
    graphable = is_graph_safe_cuda_rng_tracker(tracker)
    tracker.set_states(
        {
            name: convert_cuda_rng_state(value, to_graphable=graphable)
            for name, value in states["tracker"].items()
        }
    )


def _sharding_metadata(content: Optional[dict]) -> Optional[dict]:
    """Megatron-LM's sharded-state-dict metadata with this run's data-parallel group (None for a
    checkpoint saved without it: attnres-pretrain before the interchange). Without process
    groups (a checkpoint read by a tool) Megatron-Core's modules add the group themselves."""
    if content is None:
        return None
    if not parallel_state.model_parallel_is_initialized():
        return dict(content)
    return {**content, "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}


def _saved_args(common: dict) -> dict[str, Any]:
    return checkpoint_format.saved_arguments(common.get("args"))


def _reason(error: BaseException) -> str:
    """The line of a (possibly wrapped, per-rank) error that says what went wrong."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    refused = [line for line in lines if "refused to unpickle" in line or "are not loaded" in line]
    return (refused or lines or [type(error).__name__])[-1]


# ---------------------------------------------------------------------------- save


def _megatron_args(setup, iteration: int, data_state: Any, args: Any) -> argparse.Namespace:
    """The ``args`` Namespace Megatron-LM's load reads (see ``checkpoint_format.megatron_args``)."""
    values = vars(args) if args is not None else {}
    batch = values.get("global_batch_size") or 0
    consumed = checkpoint_format.consumed_train_samples({"data_state": data_state}, values, iteration)
    valid = checkpoint_format.consumed_valid_samples(
        iteration, values.get("eval_interval"), values.get("eval_iters") or 0, batch
    )
    shape = {
        key: getattr(setup.config, key, None)
        for key in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "ffn_hidden_size",
            "kv_channels",
            "num_query_groups",
        )
    }
    return checkpoint_format.megatron_args(
        values,
        shape,
        consumed,
        valid,
        torch.distributed.get_world_size(),
        parallel_state.get_data_parallel_world_size(),
    )


def save_checkpoint(
    setup, iteration: int, root: str, data_state: Any = None, args: Any = None, run_id: Optional[str] = None
) -> str:
    """Save model chunks, optimizer, scheduler, RNG and data position at ``iteration`` in
    Megatron-LM's format (its ``load_checkpoint`` resumes it): into a temporary directory, then a
    manifest, then renamed into place and named by the tracker."""
    config = getattr(setup.optimizer, "config", None)
    distributed = bool(
        getattr(config, "use_distributed_optimizer", getattr(args, "use_distributed_optimizer", False))
    )
    content = checkpoint_format.sharding_metadata(distributed)
    metadata = _sharding_metadata(content)
    chunks = setup.unwrapped()
    state: dict[str, Any] = {
        key: chunk.sharded_state_dict(metadata=metadata)
        for key, chunk in zip(_model_keys(len(chunks)), chunks)
    }
    state["optimizer"] = setup.optimizer.sharded_state_dict(state, metadata=metadata)
    batch = getattr(args, "global_batch_size", None)
    state["opt_param_scheduler"] = checkpoint_format.scheduler_to_megatron(
        setup.scheduler.state_dict(),
        batch if isinstance(batch, int) and batch > 0 else 1,  # without arguments: the caller's units
        resume.megatron_schedule(args) if args is not None else None,
    )
    state["checkpoint_version"] = checkpoint_format.CHECKPOINT_VERSION
    state["iteration"] = iteration
    state["data_state"] = data_state
    state["rng_state"] = _rng_state()
    state["args"] = _megatron_args(setup, iteration, data_state, args)
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
        dist_checkpointing.save(
            state, staging, content_metadata=checkpoint_format.serializable_metadata(content)
        )
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
        return (
            f"> note: {path} has no checksum manifest (saved by Megatron-LM or an older "
            "attnres-pretrain): not verified"
        )
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
    if not isinstance(common.get("args"), (dict, type(None))):  # a Namespace (weights-only loader)
        common["args"] = safe_unpickle.SavedArgs(checkpoint_format.saved_arguments(common["args"]))
    return common


def saved_attn_res_eps(root: str) -> Optional[float]:
    """The key RMS epsilon the latest checkpoint under ``root`` was trained with: None when it is
    unknown, the saved model has no AttnRes, or the checkpoint is unreadable (the load reports that)."""
    try:
        _, path = latest_checkpoint(root)
        saved = _saved_args(read_common(path, root))
        mode = model_family(saved.get("model", "gpt")).attention_residuals(saved.get("attention_residuals"))
    except (CheckpointError, ValueError):
        return None
    eps = saved.get("attn_res_eps")
    if mode == "none" or isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return None
    return float(eps)


def require_optimizer_state(root: str, path: str, names: Optional[Iterable[str]] = None) -> None:
    """Refuse resuming the optimizer from a checkpoint that holds model weights only (an import);
    ``names``: its tensors, when the caller has read them."""
    if names is None:
        try:
            names = dist_checkpointing.load_tensors_metadata(path)
        except READ_ERRORS as error:
            raise CheckpointError(f"--load {root}: cannot read {path}: {_reason(error)}") from None
    if not any(name.startswith("optimizer.") for name in names):
        raise CheckpointError(
            f"--load {root}: {path} holds model weights without optimizer state (e.g. written by "
            "tools/convert_hf.py import); pass --no-load-optim to train on from these weights."
        )


def _refuse_unmappable(root: str, path: str, common: dict, resume_state: bool) -> None:
    """A clear error naming each field of the checkpoint that attnres-pretrain cannot map."""
    problems = checkpoint_format.refusals(common, _saved_args(common), resume_state)
    if problems:
        raise CheckpointError(checkpoint_format.refusal_message(root, path, common, problems))


# ---------------------------------------------------------------------------- start-up checks


def checkpoint_preflight(args: argparse.Namespace, config: Any) -> Preflight:
    """Before any work: the ``--load`` checkpoint fits this run (model, layout, schedule) and is
    not already finished, and ``--save`` would not destroy another run's checkpoints."""
    result, start, run_id = Preflight(), 0, None
    if args.load:
        iteration, path = latest_checkpoint(args.load)
        common = read_common(path, args.load)
        saved_args = _saved_args(common)
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
            _refuse_unmappable(args.load, path, common, not args.no_load_optim)
            if not args.no_load_optim:
                require_optimizer_state(args.load, path)
                result.lines += _resume_state_checks(args, common, saved_args)
            saved_batch = saved_args.get("global_batch_size")
            if isinstance(saved_batch, int) and saved_batch != args.global_batch_size:
                consumed = checkpoint_format.consumed_train_samples(common, saved_args, iteration)
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
    saved = checkpoint_format.saved_scheduler(common, saved_args)
    changes = resume.schedule_changes(saved, resume.expected_schedule(args))
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
    common = read_common(path, root)
    megatron_format = checkpoint_format.is_megatron_format(common)
    # The sharding metadata the checkpoint was saved with, as Megatron-LM's load uses it.
    metadata = _sharding_metadata(dist_checkpointing.load_content_metadata(preloaded_state_dict=common))
    chunks = setup.unwrapped()
    keys = _model_keys(len(chunks))
    request: dict[str, Any] = {
        key: chunk.sharded_state_dict(metadata=metadata) for key, chunk in zip(keys, chunks)
    }
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
    _refuse_unmappable(root, path, common, load_optimizer and not warm_start)
    if not warm_start and load_optimizer:  # optimizer and per-rank RNG need the saving layout
        require_optimizer_state(root, path, available)
        request["optimizer"] = setup.optimizer.sharded_state_dict(request, is_loading=True, metadata=metadata)
        request["rng_state"] = _rng_state() if megatron_format else _legacy_rng_state()
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
    optimizer = getattr(setup, "optimizer", None)
    if optimizer is not None and (warm_start or not load_optimizer):
        optimizer.reload_model_params()  # bf16: fp32 main copies from the loaded weights, as Megatron-LM
    if warm_start:
        return LoadedCheckpoint(0, None, True, missing_names, notes=notes)
    saved_args = _saved_args(common)
    if load_optimizer:
        schedule = checkpoint_format.saved_scheduler(common, saved_args)
        if not schedule:
            raise CheckpointError(
                f"--load {root}: {path} holds no scheduler state (opt_param_scheduler); pass "
                "--no-load-optim to load the weights only."
            )
        try:
            rng = checkpoint_format.rng_from_checkpoint(loaded["rng_state"])
        except FormatError as error:
            raise CheckpointError(
                checkpoint_format.refusal_message(root, path, common, [str(error)])
            ) from None
        setup.optimizer.load_state_dict(loaded["optimizer"])
        _apply_schedule_flags(setup.scheduler, args)
        if args is not None:  # a step count converted from samples: this run's exact value
            schedule = checkpoint_format.settle(schedule, resume.expected_schedule(args))
        setup.scheduler.load_state_dict(schedule)
        _restore_rng(rng)
    iteration = int(loaded["iteration"])
    data_state = loaded.get("data_state")
    consumed = checkpoint_format.consumed_train_samples(common, saved_args, iteration)
    return LoadedCheckpoint(iteration, data_state, False, [], consumed, run_id_of(path), notes)


def describe_load(result: LoadedCheckpoint, root: Optional[str]) -> str:
    if result.warm_start:
        return (
            f"> warm start from baseline checkpoint {root}: {len(result.missing_keys)} AttnRes "
            f"tensors not in the checkpoint keep their initial values: {', '.join(result.missing_keys)}"
        )
    return f"> resumed from {root} at iteration {result.iteration}"

"""Megatron-LM's checkpoint content, as ``attnres-pretrain`` writes and reads it.

``attnres-pretrain`` and Megatron-LM's training loop (``pretrain_gpt.py``, the driver) both write
Megatron-LM's layout with Megatron-Core's ``torch_dist`` format, and the sharded tensors of the
model and optimizer are the same. This module maps the rest -- the common state -- so that a
checkpoint of either resumes in the other: pure functions of plain values (no process groups,
no files), used by ``checkpointing.py``.

Written by ``attnres-pretrain`` (Megatron-LM's keys and formats, what its ``load_checkpoint``
reads): ``args`` (an ``argparse.Namespace`` of plain values, with ``consumed_train_samples``,
``consumed_valid_samples``, ``skipped_train_samples`` and the resolved model shape),
``checkpoint_version`` 3.0, ``iteration``, ``opt_param_scheduler`` (in samples, as Megatron-LM
counts), ``rng_state`` (a list of Megatron-LM's RNG dicts), ``content_metadata`` (the
optimizer's sharding metadata); and its own ``data_state`` and ``model_signature``, which
Megatron-LM ignores.

Read by ``attnres-pretrain``: the above, its older checkpoints (``args`` a dict, ``scheduler``
in iterations, ``rng_state`` a dict) and Megatron-LM's. A field it cannot map is refused with
:class:`FormatError` naming the field (:func:`refusals`).
"""

from __future__ import annotations

import argparse
import math
import types
from collections.abc import Mapping
from typing import Any, Optional

CHECKPOINT_VERSION = 3.0  # Megatron-LM's checkpoint_version of torch_dist checkpoints
# Scheduler state fields that count steps: iterations in attnres-pretrain's scheduler (one step
# per iteration), samples in Megatron-LM's (one step per sample of the global batch).
SCHEDULER_STEP_FIELDS = ("lr_warmup_steps", "lr_decay_steps", "num_steps", "wd_incr_steps")
# The keys of one Megatron-LM RNG state (megatron.training.checkpointing.get_rng_state).
MEGATRON_RNG_KEYS = (
    "random_rng_state",
    "np_rng_state",
    "torch_rng_state",
    "cuda_rng_state",
    "rng_tracker_states",
)
_PLAIN = (int, float, str, bool, type(None))
_MODEL_SHAPE = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "ffn_hidden_size",
    "kv_channels",
    "num_query_groups",
)
_RESUME_ELSEWHERE = (
    "pass --no-load-optim to load the weights, iteration and data position only (fresh optimizer, "
    "schedule and RNG), or resume it with Megatron-LM's training loop"
)


class FormatError(ValueError):
    """A checkpoint field that ``attnres-pretrain`` cannot map to its own state."""


# ---------------------------------------------------------------------------- arguments


def saved_arguments(value: Any) -> dict[str, Any]:
    """The saving run's arguments as a dict: attnres-pretrain's older checkpoints hold a dict,
    Megatron-LM's and the current ones an ``argparse.Namespace`` (read as a dict subclass by the
    restricted unpickler, as a Namespace by torch's weights-only loader)."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (argparse.Namespace, types.SimpleNamespace)):
        return dict(vars(value))
    return {}


def consumed_valid_samples(iteration: int, eval_interval: Optional[int], eval_iters: int, batch: int) -> int:
    """Validation samples Megatron-LM's loop has read by ``iteration``: one ``--eval-iters`` x
    ``--global-batch-size`` per periodic evaluation (attnres-pretrain's evaluator resumes at the
    same position)."""
    if not eval_interval or eval_interval <= 0 or eval_iters <= 0:
        return 0
    return (iteration // eval_interval) * eval_iters * batch


def megatron_args(
    values: Mapping[str, Any],
    shape: Mapping[str, Any],
    consumed_train: int,
    consumed_valid: int,
    world_size: int,
    data_parallel_size: int,
) -> argparse.Namespace:
    """The ``args`` Namespace Megatron-LM's ``load_checkpoint`` reads: the run's plain argument
    ``values`` (spelled as Megatron-LM's), the model ``shape`` where the flags left it to a
    default (``num_layers``, ``hidden_size``, ``num_attention_heads``... from the model config),
    and the sample counters and sizes Megatron-LM keeps in its arguments."""
    saved = {key: value for key, value in values.items() if isinstance(value, _PLAIN)}
    for key in _MODEL_SHAPE:
        if saved.get(key) is None and isinstance(shape.get(key), int):
            saved[key] = shape[key]
    if saved.get("max_position_embeddings") is None and isinstance(saved.get("seq_length"), int):
        saved["max_position_embeddings"] = saved["seq_length"]  # Megatron-LM's default
    saved.setdefault("add_position_embedding", True)  # Megatron-LM's; --no-position-embedding is not taken
    saved.update(
        consumed_train_samples=int(consumed_train),
        consumed_valid_samples=int(consumed_valid),
        skipped_train_samples=0,  # Megatron-LM's --iterations-to-skip; attnres-pretrain skips none
        world_size=int(world_size),
        data_parallel_size=int(data_parallel_size),
        ckpt_format="torch_dist",
    )
    return argparse.Namespace(**saved)


# ---------------------------------------------------------------------------- optimizer


def sharding_metadata(use_distributed_optimizer: bool) -> dict[str, Any]:
    """The sharded-state-dict metadata Megatron-LM passes to the model's and the optimizer's
    ``sharded_state_dict`` for a torch_dist save (without the ``dp_cp_group`` the caller adds)."""
    metadata: dict[str, Any] = {}
    if use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "dp_reshardable"
    metadata["singleton_local_shards"] = False
    metadata["chained_optim_avoid_prefix"] = True
    return metadata


def serializable_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata saved as ``content_metadata``: everything but the process group."""
    return {key: value for key, value in metadata.items() if key != "dp_cp_group"}


# ---------------------------------------------------------------------------- scheduler


def _scaled(value: Any, factor: float) -> Any:
    return value * factor if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _divided(value: Any, divisor: int) -> Any:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return value
    if isinstance(value, int) and value % divisor == 0:
        return value // divisor
    return value / divisor


def settle(state: Mapping[str, Any], expected: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with each float that differs from ``expected``'s only by rounding (a step count
    scaled by the batch and back) replaced by the expected value."""
    settled = dict(state)
    for key, value in expected.items():
        saved = settled.get(key)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (saved, value))
        if numbers and saved != value and math.isclose(saved, value, rel_tol=1e-9, abs_tol=1e-12):
            settled[key] = value
    return settled


def scheduler_to_megatron(
    state: Mapping[str, Any], samples_per_step: int, exact: Optional[Mapping[str, Any]] = None
) -> dict[str, Any]:
    """attnres-pretrain's scheduler state (steps are iterations) in Megatron-LM's units (steps
    are samples: x ``samples_per_step``, the global batch). ``exact``: the sample counts
    Megatron-LM computes from the same flags (``--lr-warmup-fraction`` x decay samples), used
    where the scaled value differs only by rounding."""
    scaled = {
        key: _scaled(value, samples_per_step) if key in SCHEDULER_STEP_FIELDS else value
        for key, value in state.items()
    }
    return settle(scaled, exact or {})


def scheduler_from_megatron(state: Mapping[str, Any], samples_per_step: int) -> dict[str, Any]:
    """Megatron-LM's scheduler state (steps are samples) in attnres-pretrain's units (iterations
    of ``samples_per_step``, the saving run's global batch)."""
    return {
        key: _divided(value, samples_per_step) if key in SCHEDULER_STEP_FIELDS else value
        for key, value in state.items()
    }


def saved_scheduler(common: Mapping[str, Any], saved_args: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's scheduler state in iterations: ``opt_param_scheduler`` (Megatron-LM's
    key and units, written by both) or ``scheduler`` (older attnres-pretrain checkpoints)."""
    if isinstance(common.get("opt_param_scheduler"), Mapping):
        batch = saved_args.get("global_batch_size")
        # Saved without run arguments (the Python API): the caller's own step units.
        samples_per_step = batch if isinstance(batch, int) and batch > 0 else 1
        return scheduler_from_megatron(common["opt_param_scheduler"], samples_per_step)
    if isinstance(common.get("scheduler"), Mapping):
        return dict(common["scheduler"])
    return {}


# ---------------------------------------------------------------------------- RNG


def rng_to_megatron(states: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One rank's RNG states (``torch``, ``cuda``, ``tracker``, ``random``, ``numpy``) as the list
    Megatron-LM saves in its ``rng_state`` object (one entry: no per-data-parallel-rank states)."""
    return [
        {
            "random_rng_state": states["random"],
            "np_rng_state": states["numpy"],
            "torch_rng_state": states["torch"],
            "cuda_rng_state": states["cuda"] if states.get("cuda") is not None else states["torch"],
            "rng_tracker_states": states["tracker"],
        }
    ]


def rng_from_checkpoint(value: Any) -> dict[str, Any]:
    """A checkpoint's ``rng_state`` object as ``torch``/``tracker`` (and, from Megatron-LM's
    format, ``cuda``/``random``/``numpy``) states."""
    if isinstance(value, Mapping) and "torch" in value and "tracker" in value:  # older attnres-pretrain
        return {"torch": value["torch"], "tracker": value["tracker"]}
    if isinstance(value, (list, tuple)) and value and all(isinstance(entry, Mapping) for entry in value):
        if len(value) > 1:
            raise FormatError(
                f"rng_state holds {len(value)} RNG states, one per data-parallel rank (saved with "
                "--data-parallel-random-init); attnres-pretrain keeps one per model-parallel rank"
            )
        entry = value[0]
        missing = [key for key in ("torch_rng_state", "rng_tracker_states") if key not in entry]
        if missing or not entry.get("rng_tracker_states"):
            raise FormatError(
                f"rng_state lacks {', '.join(missing) or 'rng_tracker_states (empty)'}: not Megatron-LM's "
                "RNG state format"
            )
        return {
            "torch": entry["torch_rng_state"],
            "tracker": dict(entry["rng_tracker_states"]),
            "cuda": entry.get("cuda_rng_state"),
            "random": entry.get("random_rng_state"),
            "numpy": entry.get("np_rng_state"),
        }
    raise FormatError(
        f"rng_state holds a {type(value).__name__}, neither Megatron-LM's list of RNG states nor "
        "attnres-pretrain's"
    )


def megatron_rng_sharding(
    pp: tuple[int, int], tp: tuple[int, int], dp: tuple[int, int], expert_parallel: int
) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(global shape, offset, replica id) of a rank's ``rng_state`` object as Megatron-LM shards
    it: by (PP, TP), replicated over data-parallel ranks; by (PP, TP, DP) with expert
    parallelism. Each pair is (rank, size)."""
    if expert_parallel > 1:
        return (pp[1], tp[1], dp[1]), (pp[0], tp[0], dp[0]), 0
    return (pp[1], tp[1]), (pp[0], tp[0]), dp[0]


# ---------------------------------------------------------------------------- origin and refusals


def is_megatron_format(common: Mapping[str, Any]) -> bool:
    """Whether the common state is in Megatron-LM's format (Megatron-LM's checkpoints and
    attnres-pretrain's since the interchange) rather than attnres-pretrain's older one."""
    return "checkpoint_version" in common


def saved_by(common: Mapping[str, Any]) -> str:
    """Who wrote the checkpoint, for messages."""
    if "model_signature" in common or "data_state" in common:
        return "attnres-pretrain"
    return "Megatron-LM" if is_megatron_format(common) else "an unknown program"


def consumed_train_samples(common: Mapping[str, Any], saved_args: Mapping[str, Any], iteration: int) -> int:
    """Training samples the saving run consumed: attnres-pretrain's ``data_state``, else
    Megatron-LM's ``args.consumed_train_samples``, else iteration x global batch (Megatron-LM's
    fallback for checkpoints without the count)."""
    data_state = common.get("data_state")
    if isinstance(data_state, Mapping) and isinstance(data_state.get("consumed_samples"), int):
        return data_state["consumed_samples"]
    counted = saved_args.get("consumed_train_samples")
    if isinstance(counted, int) and (counted > 0 or iteration == 0):
        return counted
    batch = saved_args.get("global_batch_size")
    return iteration * (batch if isinstance(batch, int) else 0)


def refusals(common: Mapping[str, Any], saved_args: Mapping[str, Any], resume_state: bool) -> list[str]:
    """Each field of the checkpoint that attnres-pretrain cannot map, with why (empty: it loads).
    ``resume_state``: the optimizer, scheduler and RNG states are to be resumed (not
    ``--no-load-optim``)."""
    problems = []
    version = common.get("checkpoint_version")
    if isinstance(version, (int, float)) and version < CHECKPOINT_VERSION:
        problems.append(
            f"checkpoint_version {version}: Megatron-LM checkpoints before version 3.0 order the "
            "attention's query/key/value weights differently; attnres-pretrain reads version 3.0"
        )
    if not resume_state:
        return problems
    optimizer = saved_args.get("optimizer")
    if isinstance(optimizer, str) and optimizer != "adam":
        problems.append(
            f"optimizer: the checkpoint holds the state of --optimizer {optimizer}; attnres-pretrain "
            "trains with adam only"
        )
    if saved_args.get("fp16"):
        problems.append(
            "fp16: the checkpoint was saved with --fp16 (fp16 weights, loss-scaled optimizer state); "
            "attnres-pretrain trains in fp32 or with --bf16"
        )
    if saved_args.get("no_save_optim"):
        problems.append(
            "optimizer: the checkpoint was saved with --no-save-optim and holds no optimizer or "
            "scheduler state"
        )
    if saved_args.get("no_save_rng"):
        problems.append("rng_state: the checkpoint was saved with --no-save-rng and holds no RNG state")
    if saved_args.get("rampup_batch_size"):
        problems.append(
            f"rampup_batch_size: the checkpoint was saved with --rampup-batch-size "
            f"{saved_args['rampup_batch_size']}; its schedule counts samples of a growing batch, "
            "attnres-pretrain's counts iterations of one --global-batch-size"
        )
    dp = saved_args.get("data_parallel_size")
    if saved_args.get("data_parallel_random_init") and isinstance(dp, int) and dp > 1:
        problems.append(
            "data_parallel_random_init: the checkpoint holds one RNG state per data-parallel rank "
            "(--data-parallel-random-init); attnres-pretrain keeps one per model-parallel rank"
        )
    return problems


def refusal_message(root: str, path: str, common: Mapping[str, Any], problems: list[str]) -> str:
    """The error for :func:`refusals`: each field, and what to do instead."""
    return (
        f"--load {root}: {path} (saved by {saved_by(common)}) holds what attnres-pretrain cannot "
        f"resume: {'; '.join(problems)}. To start from it, {_RESUME_ELSEWHERE}."
    )

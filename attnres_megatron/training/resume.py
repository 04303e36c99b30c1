"""Resume decisions: what a run must share with the checkpoint it loads, what its schedule and
data continue from, and which checkpoints a ``--save`` directory may not lose. Pure functions
of the saved and the new settings; ``checkpointing.py`` reads the files and reports."""

from __future__ import annotations

import argparse
from typing import Any, Optional

from attnres_megatron.config import resolve_sublayers_per_block
from attnres_megatron.models.families import model_family, model_shape_from_flags
from attnres_megatron.training.arguments import lr_decay_iters, scheduler_settings
from attnres_megatron.training.checkpoint_format import consumed_train_samples, settle

# Model signature key -> the flag(s) that set it. A checkpoint loads only into the same model.
MODEL_FIELDS: dict[str, str] = {
    "model": "--model",
    "attention_residuals": "--attention-residuals",
    "attn_res_sublayers_per_block": "--attn-res-block-size (S, sublayers per block; or "
    "--attn-res-layers-per-block / --attn-res-num-blocks)",
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "ffn_hidden_size": "--ffn-hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "kv_channels": "--kv-channels",
    "num_query_groups": "--num-query-groups / --group-query-attention",
    "normalization": "--normalization",
    "gated_linear_unit": "--swiglu",
    "add_bias_linear": "--disable-bias-linear",
    "add_qkv_bias": "--add-qkv-bias",
    "qk_layernorm": "--qk-layernorm",
    "num_moe_experts": "--num-experts",
    "moe_router_topk": "--moe-router-topk",
    "moe_ffn_hidden_size": "--moe-ffn-hidden-size",
    "moe_shared_expert_intermediate_size": "--moe-shared-expert-intermediate-size",
    "moe_router_score_function": "--moe-router-score-function",
    "moe_router_enable_expert_bias": "--moe-router-enable-expert-bias",
    "position_embedding_type": "--position-embedding-type",
    "max_position_embeddings": "--max-position-embeddings (default --seq-length)",
    "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
    "padded_vocab_size": "the vocabulary (--tokenizer-type, --tokenizer-model, --vocab-size)",
}
ATTN_RES_FIELDS = ("attention_residuals", "attn_res_sublayers_per_block")
# Saved GPT arguments that a checkpoint without a signature still tells about its model.
_LEGACY_GPT_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "normalization",
    "qk_layernorm",
    "position_embedding_type",
    "untie_embeddings_and_output_weights",
    "num_experts",
    "swiglu",
)
_FROM_ARGS = (
    "model",
    "position_embedding_type",
    "max_position_embeddings",
    "untie_embeddings_and_output_weights",
    "padded_vocab_size",
)
_FROM_CONFIG = tuple(key for key in MODEL_FIELDS if key not in _FROM_ARGS)
# Saved argument -> flag of the layouts whose optimizer and per-rank RNG states differ.
LAYOUT_FIELDS: dict[str, str] = {
    "tensor_model_parallel_size": "--tensor-model-parallel-size",
    "pipeline_model_parallel_size": "--pipeline-model-parallel-size",
    "use_distributed_optimizer": "--use-distributed-optimizer",
}
# Megatron-Core scheduler state -> the flag that sets it (as Megatron-LM's scheduler checks them).
SCHEDULE_FIELDS: dict[str, str] = {
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_steps": "--lr-warmup-iters / --lr-warmup-fraction",
    "lr_decay_steps": "--lr-decay-iters (default --train-iters)",
    "lr_decay_style": "--lr-decay-style",
    "start_wd": "--weight-decay",
    "end_wd": "--weight-decay",
    "wd_incr_steps": "--train-iters (the weight-decay schedule's length)",
    "wd_incr_style": "the weight-decay schedule",
}
OVERRIDE = "--override-opt_param-scheduler"
USE_CHECKPOINT = "--use-checkpoint-opt_param-scheduler"


def model_signature(config: Any, args: argparse.Namespace) -> dict[str, Any]:
    """What defines the model's parameters and function, from its config and the GPT flags."""
    signature: dict[str, Any] = {"model": args.model}
    signature.update({key: getattr(config, key, None) for key in _FROM_CONFIG})
    if model_family(args.model).shape_from_flags:
        learned = args.position_embedding_type == "learned_absolute"
        signature.update(
            position_embedding_type=args.position_embedding_type,
            untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
            max_position_embeddings=(args.max_position_embeddings or args.seq_length) if learned else None,
        )
    signature["padded_vocab_size"] = getattr(args, "padded_vocab_size", None)
    return {
        key: value if isinstance(value, (str, int, float, bool)) else None for key, value in signature.items()
    }


def legacy_signature(saved: dict[str, Any]) -> dict[str, Any]:
    """The signature fields recoverable from the arguments of a checkpoint saved without one
    (none when it holds no arguments: saved through the Python API)."""
    if not saved:
        return {}
    model = saved.get("model", "gpt")
    signature: dict[str, Any] = {"model": model}
    if "padded_vocab_size" in saved:
        signature["padded_vocab_size"] = saved["padded_vocab_size"]
    mode = saved.get("attention_residuals")
    if not model_shape_from_flags(model):  # the preset fixes the shape
        if mode is not None:
            signature["attention_residuals"] = mode
        return signature
    renamed = {"num_experts": "num_moe_experts", "swiglu": "gated_linear_unit"}
    for key in _LEGACY_GPT_FIELDS:
        if key in saved:
            signature[renamed.get(key, key)] = saved[key]
    signature["attention_residuals"] = mode or "none"
    try:
        signature["attn_res_sublayers_per_block"] = resolve_sublayers_per_block(
            mode or "none",
            saved.get("num_layers", 0),
            saved.get("attn_res_block_size"),
            saved.get("attn_res_layers_per_block"),
            saved.get("attn_res_num_blocks"),
        )
    except ValueError:
        pass
    return signature


def is_warm_start(saved: dict[str, Any], new: dict[str, Any]) -> bool:
    """A baseline checkpoint loaded into an AttnRes model (its AttnRes parameters start fresh)."""
    return saved.get("attention_residuals") == "none" and new.get("attention_residuals") not in (None, "none")


def model_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``FLAG: checkpoint X, this run Y`` for each model field that differs (AttnRes fields
    excepted on a warm start)."""
    skip = ATTN_RES_FIELDS if is_warm_start(saved, new) else ()
    return [
        f"{MODEL_FIELDS[key]}: checkpoint {saved[key]}, this run {new[key]}"
        for key in MODEL_FIELDS
        if key in saved and key in new and key not in skip and saved[key] != new[key]
    ]


def layout_changes(saved_args: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The parallel layout settings whose change needs ``--no-load-optim``."""
    return [
        f"{flag}: checkpoint {saved_args[key]}, this run {getattr(args, key)}"
        for key, flag in LAYOUT_FIELDS.items()
        if key in saved_args and saved_args[key] != getattr(args, key)
    ]


SCHEDULE_STATE_FIELDS = (
    "max_lr",
    "min_lr",
    "lr_warmup_steps",
    "lr_decay_steps",
    "lr_decay_style",
    "start_wd",
    "end_wd",
    "wd_incr_steps",
    "wd_incr_style",
)
"""The scheduler settings a checkpoint's scheduler state records and a resume compares."""


def expected_schedule(args: argparse.Namespace) -> dict[str, Any]:
    """The scheduler state fields this run's flags give (the scheduler ``setup_training`` builds)."""
    settings = scheduler_settings(args)
    return {field: settings[field] for field in SCHEDULE_STATE_FIELDS}


def megatron_schedule(args: argparse.Namespace) -> dict[str, Any]:
    """The scheduler's step counts as Megatron-LM's loop computes them from the same flags: in
    samples (``--global-batch-size`` per iteration), the warmup as ``--lr-warmup-fraction`` of the
    decay samples (``megatron.training.training.get_optimizer_param_scheduler``)."""
    batch = args.global_batch_size
    decay = lr_decay_iters(args) * batch
    fraction = args.lr_warmup_fraction
    warmup = fraction * decay if fraction is not None else args.lr_warmup_iters * batch
    return {"lr_warmup_steps": warmup, "lr_decay_steps": decay, "wd_incr_steps": args.train_iters * batch}


def schedule_changes(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """``FLAG: checkpoint X, this run Y`` for each scheduler setting that differs (one per flag;
    a step count that differs only by rounding -- Megatron-LM's samples converted to iterations
    -- is the same)."""
    changes: dict[str, str] = {}
    settled = settle(saved, expected)
    for key, flag in SCHEDULE_FIELDS.items():
        if key in settled and settled[key] != expected[key] and flag not in changes:
            changes[flag] = f"{flag}: checkpoint {settled[key]}, this run {expected[key]}"
    return list(changes.values())


def consumed_samples(
    data_state: Any, iteration: int, saved_batch: Optional[int], counted: Optional[int] = None
) -> int:
    """Samples the checkpoint's run consumed: its saved count (attnres-pretrain's ``data_state``,
    else Megatron-LM's ``args.consumed_train_samples``, ``counted``), else iteration x its batch."""
    return consumed_train_samples(
        {"data_state": data_state},
        {"global_batch_size": saved_batch, "consumed_train_samples": counted},
        iteration,
    )


def save_conflicts(
    owners: dict[int, Optional[str]], tracker: Optional[int], run_id: Optional[str], start: int
) -> list[str]:
    """What saving this run into a directory would destroy or hide: checkpoints of another run
    (``owners``: iteration -> run id, None if unknown) and a tracker this run would move back."""
    foreign = sorted(
        iteration
        for iteration, owner in owners.items()
        if (owner is None or owner != run_id) and (iteration > start or owner is not None)
    )
    reasons = []
    if foreign:
        reasons.append(f"checkpoints of another run (iteration {', '.join(map(str, foreign))})")
    if tracker is not None and tracker > start:
        reasons.append(
            f"a tracker naming iteration {tracker}, later than this run's start ({start}): "
            "saving would move it back and orphan the later checkpoint"
        )
    return reasons


class SampleOffset:
    """A dataset view that starts after the samples a resumed run already consumed."""

    def __init__(self, dataset: Any, offset: int) -> None:
        self.dataset, self.offset = dataset, offset

    def __len__(self) -> int:
        return max(0, len(self.dataset) - self.offset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.offset + index]

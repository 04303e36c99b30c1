"""The model of a saved run, rebuilt from its checkpoint: arguments, tokenizer, weights.

``attnres-pretrain --save DIR`` stores the run's arguments (``vars(args)`` and the padded
vocabulary) in every checkpoint's common state. The tools that read a checkpoint without
training (``attnres-generate``, ``tools/plot_depth_attention.py``) rebuild the same model from
them in an inference layout (no pipeline, no sequence parallelism, fp32, no dropout; tensor
parallelism as asked) and load its weights through Megatron's sharded state dict, resharded to
that layout. Every pickle read goes through ``safe_unpickle``'s allowlist (installed when
``training.checkpointing`` is imported), so nothing loaded from disk runs code. Errors end the
program with ``SystemExit("error: ...")`` naming the directory and the fix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

INFERENCE_LAYOUT = dict(
    tensor_model_parallel_size=1,
    pipeline_model_parallel_size=1,
    num_virtual_stages_per_pipeline_rank=None,
    decoder_first_pipeline_num_layers=None,
    decoder_last_pipeline_num_layers=None,
    pipeline_model_parallel_layout=None,
    sequence_parallel=False,
    context_parallel_size=1,
    expert_model_parallel_size=1,
    expert_tensor_parallel_size=None,
    bf16=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    recompute_granularity=None,
    recompute_method=None,
    recompute_num_layers=None,
    recompute_modules=None,
    device="cpu",
)
"""One process (or tensor parallelism only), fp32, no dropout, no recompute: how a saved model is read."""

MEGATRON_LM_COUNTERS = frozenset(
    {
        "add_position_embedding",
        "consumed_train_samples",
        "consumed_valid_samples",
        "skipped_train_samples",
        "world_size",
        "data_parallel_size",
        "padded_vocab_size",
    }
)
"""Saved beside the flags for Megatron-LM's loader (``checkpoint_format.megatron_args``): not flags."""


def saved_before_megatron_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """The fixed model of runs saved before attnres-pretrain took Megatron-LM's flags (no ``swiglu``
    key; also the demo model): SwiGLU MLP 4 x hidden wide, no biases, untied output weights, GQA
    when groups were given, RMSNorm and RoPE unless saved."""
    from attnres_megatron.models.families import model_shape_from_flags

    if "swiglu" in saved or not model_shape_from_flags(saved.get("model", "gpt")):
        return {}
    return dict(
        swiglu=True,
        add_bias_linear=False,
        untie_embeddings_and_output_weights=True,
        group_query_attention=saved.get("num_query_groups") is not None,
        ffn_hidden_size=saved.get("ffn_hidden_size") or 4 * saved.get("hidden_size", 128),
        normalization=saved.get("normalization", "RMSNorm"),
        position_embedding_type=saved.get("position_embedding_type", "rope"),
    )


def model_args(saved: dict[str, Any], **layout: Any) -> argparse.Namespace:
    """``attnres-pretrain`` defaults updated with ``saved``, in :data:`INFERENCE_LAYOUT` plus ``layout``."""
    from attnres_megatron.training.arguments import build_parser

    args = build_parser().parse_args([])
    saved = {**saved, **saved_before_megatron_defaults(saved)}
    unknown = sorted(set(saved) - set(vars(args)) - MEGATRON_LM_COUNTERS)
    if unknown:
        print(f"note: ignoring unknown saved arguments: {', '.join(unknown)}", file=sys.stderr)
    for key, value in saved.items():
        if key in vars(args):
            setattr(args, key, value)
    args.padded_vocab_size = saved.get("padded_vocab_size")  # the model's vocabulary (None: not saved)
    for key, value in {**INFERENCE_LAYOUT, **layout}.items():
        setattr(args, key, value)
    return args


def checkpoint_args(root: Path, verify: bool = True, **layout: Any) -> tuple[argparse.Namespace, int]:
    """The saving run's arguments (see :func:`model_args`) and the latest iteration under ``root``
    (its files checked against its sha256 manifest first, unless ``verify`` is False)."""
    from attnres_megatron.training.checkpointing import (
        CheckpointError,
        latest_checkpoint,
        read_common,
        verify_checkpoint,
    )

    try:
        iteration, path = latest_checkpoint(str(root))
        note = verify_checkpoint(path, str(root)) if verify else None
        common = read_common(path, str(root))
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None
    if note:
        print(note, file=sys.stderr)
    saved = common.get("args")
    if not isinstance(saved, dict) or not saved:
        raise SystemExit(
            f"error: --load {root}: {path} holds no run arguments; point --load at a directory "
            "written by attnres-pretrain --save."
        )
    return model_args(saved, **layout), iteration


class _ModelOnly:
    """The one part of a training setup that loading model weights needs: its chunks."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def unwrapped(self) -> list[torch.nn.Module]:
        return [self.model]


def load_distributed_checkpoint(model: torch.nn.Module, root: Path, verify: bool = False) -> None:
    """Load the model weights of the latest checkpoint under ``root`` (any saved layout) into
    ``model`` (built for this process's layout); ``verify`` checks the files' sha256 first."""
    from attnres_megatron.training.checkpointing import CheckpointError, load_checkpoint

    try:
        loaded = load_checkpoint(_ModelOnly(model), str(root), load_optimizer=False, verify=verify)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None
    if loaded.warm_start:
        raise SystemExit(
            f"error: --load {root}: the checkpoint has no AttnRes parameters "
            f"({', '.join(loaded.missing_keys[:3])}, ...): it comes from a baseline run."
        )


def build_saved_model(args: argparse.Namespace, device: str) -> torch.nn.Module:
    """The saved model for this rank's layout, its config from the run's arguments."""
    from attnres_megatron.models.families import chunk_inputs, model_family
    from attnres_megatron.training.model_setup import config_from_args

    try:
        config = config_from_args(args, device)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    inputs = chunk_inputs(args, model_vocab_size(args), device)
    return model_family(args.model).build_chunk(config, inputs).to(device)


def model_vocab_size(args: argparse.Namespace) -> int:
    """The saved run's vocabulary, else the tokenizer's padded (a demo, or a byte-level older run)."""
    from attnres_megatron.training.vocabulary import padded_vocab_size

    if args.padded_vocab_size:
        return args.padded_vocab_size
    try:
        return padded_vocab_size(args)
    except ValueError as error:  # a TokenizerError or VocabularyError naming the flag
        raise SystemExit(f"error: {error}") from None


def run_tokenizer(args: argparse.Namespace) -> Any:
    """The tokenizer the saved run trained with (its flags are among the run's arguments)."""
    from attnres_megatron.training.tokenizers import TokenizerError, build_tokenizer

    try:
        return build_tokenizer(args)
    except TokenizerError as error:
        raise SystemExit(f"error: the run's tokenizer: {error}") from None

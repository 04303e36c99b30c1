"""The plugin's flags in Megatron-LM's argument parser (the same definitions as ``attnres-pretrain``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

from attnres_megatron.config import resolve_sublayers_per_block
from attnres_megatron.models.families import model_family
from attnres_megatron.training.arguments import add_attn_res_args, add_device_arg, add_model_arg
from attnres_megatron.training.quiet import add_verbose_warnings_arg

ArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]

# Megatron-LM options the AttnRes model provider cannot honour: (namespace attribute, flag).
UNSUPPORTED_WITH_ATTN_RES = (
    ("use_legacy_models", "--use-legacy-models"),
    ("spec", "--spec"),
    ("yaml_cfg", "--yaml-cfg"),
    ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path"),
    ("experimental_attention_variant", "--experimental-attention-variant"),
    ("mtp_num_layers", "--mtp-num-layers"),
)

# GPTModel options of Megatron-LM that the plugin's GPT builder keeps at their defaults.
GPT_DEFAULTS = (
    ("rotary_percent", "--rotary-percent", 1.0),
    ("rotary_base", "--rotary-base", 10000),
    ("use_rope_scaling", "--use-rope-scaling", False),
    ("fp16_lm_cross_entropy", "--fp16-lm-cross-entropy", False),
)

# Megatron-LM flags that must agree with a Kimi Linear preset (Megatron-LM's own pipeline
# split, FLOP count and MoE logging read them): (namespace attribute, flag, preset field).
KIMI_SHAPE_FLAGS = (
    ("num_layers", "--num-layers", "num_layers"),
    ("hidden_size", "--hidden-size", "hidden_size"),
    ("num_attention_heads", "--num-attention-heads", "num_attention_heads"),
    ("num_experts", "--num-experts", "num_moe_experts"),
)


# Megatron-LM defaults that need CUDA, and what ``--device cpu`` makes them (dest -> value).
CPU_DEFAULTS = {
    "distributed_backend": "gloo",
    "transformer_impl": "local",
    "no_persist_layer_norm": True,
    "gradient_accumulation_fusion": False,
    "apply_rope_fusion": False,
    "use_cpu_initialization": True,
}

# Megatron-LM options that need CUDA: (dest, flag, is-set test, what to do on CPU).
CUDA_ONLY_OPTIONS = (
    (
        "distributed_backend",
        "--distributed-backend nccl",
        lambda v: v == "nccl",
        "drop it (--device cpu uses gloo)",
    ),
    (
        "transformer_impl",
        "--transformer-impl transformer_engine",
        lambda v: v == "transformer_engine",
        "use --transformer-impl local (Transformer Engine runs on CUDA only)",
    ),
    ("fp8", "--fp8-format", bool, "drop it: FP8 needs Transformer Engine on a CUDA GPU"),
    ("fp4", "--fp4-format", bool, "drop it: FP4 needs Transformer Engine on a CUDA GPU"),
    ("use_flash_attn", "--use-flash-attn", bool, "drop it: flash-attn is a CUDA kernel"),
    ("cuda_graph_impl", "--cuda-graph-impl", lambda v: v not in (None, "none"), "drop it"),
    ("enable_cuda_graph", "--enable-cuda-graph", bool, "drop it"),
    ("external_cuda_graph", "--external-cuda-graph", bool, "drop it"),
    (
        "tp_comm_overlap",
        "--tp-comm-overlap",
        bool,
        "drop it: it overlaps with Transformer Engine's userbuffers",
    ),
    ("inprocess_restart", "--inprocess-restart", bool, "drop it: it restarts NCCL communicators"),
    ("nccl_ub", "--use-nccl-ub", bool, "drop it"),
    ("use_torch_fsdp2", "--use-torch-fsdp2", bool, "use data parallelism (DDP) on CPU"),
    ("use_megatron_fsdp", "--use-megatron-fsdp", bool, "use data parallelism (DDP) on CPU"),
    (
        "optimizer_cpu_offload",
        "--optimizer-cpu-offload",
        bool,
        "drop it: the optimizer already runs on the CPU",
    ),
    ("record_memory_history", "--record-memory-history", bool, "drop it: it records the CUDA allocator"),
    (
        "moe_token_dispatcher_type",
        "--moe-token-dispatcher-type flex",
        lambda v: v == "flex",
        "use allgather or alltoall (flex runs DeepEP / HybridEP CUDA kernels)",
    ),
)


def add_megatron_lm_device_arg(parser: argparse.ArgumentParser) -> None:
    """``--device``, attnres-pretrain's flag (applied after parsing by :func:`apply_device_defaults`)."""
    defaults = ", ".join(f"{key}={value}" for key, value in CPU_DEFAULTS.items())
    add_device_arg(
        parser.add_argument_group("attnres-megatron: device"),
        "cpu runs Megatron-LM's loop on the CPU with gloo; options not given on the command line "
        f"then default to {defaults}; auto picks cuda when available.",
    )


def resolved_device(args: argparse.Namespace) -> str:
    """``--device`` resolved: ``auto`` is cuda when available, else cpu."""
    import torch

    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def apply_device_defaults(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]
) -> None:
    """On the CPU, Megatron-LM's CUDA-only defaults become :data:`CPU_DEFAULTS` unless given in ``argv``."""
    if resolved_device(args) != "cpu":
        return
    given = {option.split("=")[0] for option in argv if option.startswith("--")}
    for action in parser._actions:
        if action.dest in CPU_DEFAULTS and not given.intersection(action.option_strings):
            setattr(args, action.dest, CPU_DEFAULTS[action.dest])


def validate_device_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the flag when the device cannot run what the flags ask."""
    import torch

    device = resolved_device(args)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available; use --device cpu.")
    if device == "cuda":
        return
    for name, flag, is_set, fix in CUDA_ONLY_OPTIONS:
        if is_set(getattr(args, name, None)):
            raise ValueError(
                f"{flag} needs CUDA, and this run is on the CPU (--device {args.device}); {fix}."
            )


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the AttnRes flags, ``--model`` and ``--device`` to Megatron-LM's parser; they are checked
    after parsing."""
    add_attn_res_args(parser)
    add_model_arg(parser.add_argument_group("attention residuals: model family"))
    add_megatron_lm_device_arg(parser)
    _check_after_parsing(parser)
    return parser


def driver_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--verbose-warnings`` of the no-patch driver (``pretrain_gpt_attnres``), which filters warnings."""
    add_verbose_warnings_arg(parser.add_argument_group("attnres-megatron driver"))
    return parser


def chain_args_providers(*providers: Optional[ArgsProvider]) -> ArgsProvider:
    """One ``extra_args_provider`` calling each given provider in turn (``None`` entries skipped)."""

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for each in providers:
            if each is not None:
                parser = each(parser)
        return parser

    return provider


def _check_after_parsing(parser: argparse.ArgumentParser) -> None:
    """Validate the AttnRes flags when Megatron-LM parses (argparse has no post-parse hook)."""
    parse_known_args = parser.parse_known_args

    def checked(args: Optional[Sequence[str]] = None, namespace: Any = None):
        parsed, extras = parse_known_args(args, namespace)
        apply_device_defaults(parser, parsed, sys.argv[1:] if args is None else args)
        try:
            validate_attn_res_args(parsed)
            validate_device_args(parsed)
        except ValueError as error:
            parser.error(str(error))
        return parsed, extras

    parser.parse_known_args = checked


def attnres_requested(args: argparse.Namespace) -> bool:
    """Whether the AttnRes model provider should build the model (AttnRes on, or a Kimi preset)."""
    if not model_family(getattr(args, "model", "gpt")).shape_from_flags:
        return True
    return getattr(args, "attention_residuals", None) not in (None, "none")


def resolved_attn_res_mode(args: argparse.Namespace) -> str:
    """The depth-mixing mode these arguments select (a Kimi preset's own when not given)."""
    return model_family(args.model).attention_residuals(args.attention_residuals)


def validate_attn_res_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the flag when the AttnRes flags are invalid or clash with Megatron-LM's."""
    family = model_family(args.model)
    preset = dict(family.preset) or None
    num_layers = family.shape("num_layers", getattr(args, "num_layers", None))
    options = (args.attn_res_block_size, args.attn_res_layers_per_block, args.attn_res_num_blocks)
    if preset is not None and args.attention_residuals is None:
        if any(option is not None for option in options):
            raise ValueError(
                f"a block-size flag with --model {args.model} needs --attention-residuals block "
                "(without both the preset's own block size is used)."
            )
    else:
        resolve_sublayers_per_block(resolved_attn_res_mode(args), num_layers or 1 << 30, *options)
    if args.attn_res_eps is not None and not args.attn_res_eps > 0:  # None: the model's norm epsilon
        raise ValueError(f"--attn-res-eps must be > 0; got {args.attn_res_eps}.")
    if "attn_res" in (getattr(args, "recompute_modules", None) or ()):
        raise ValueError(
            "--recompute-modules attn_res is not available under Megatron-LM, which checks the modules "
            "against its own list; use Megatron's modules (core_attn, layernorm, moe_act, ...)."
        )
    if not attnres_requested(args):
        return
    for name, flag in UNSUPPORTED_WITH_ATTN_RES:
        if getattr(args, name, None):
            raise ValueError(
                f"{flag} is not supported by the AttnRes model provider; drop it, or run without "
                "--attention-residuals / --model."
            )
    if getattr(args, "transformer_impl", "local") not in ("local", "transformer_engine"):
        raise ValueError(
            f"--transformer-impl {args.transformer_impl} is not supported with AttnRes; use "
            "transformer_engine or local."
        )
    if preset is None:
        for name, flag, default in GPT_DEFAULTS:
            if getattr(args, name, default) != default:
                raise ValueError(
                    f"{flag} {getattr(args, name)} is not supported by the AttnRes GPT builder yet; "
                    f"keep the default ({default})."
                )
        return
    _check_kimi_flags(args, preset)


def _check_kimi_flags(args: argparse.Namespace, preset: dict) -> None:
    """Megatron-LM's model flags must describe the Kimi Linear preset."""
    for name, flag, field in KIMI_SHAPE_FLAGS:
        given, wanted = getattr(args, name, None), preset.get(field)
        if given is not None and given != wanted:
            raise ValueError(
                f"--model {args.model} has {field} = {wanted}; pass {flag} {wanted} "
                f"(got {given}): Megatron-LM splits pipeline stages and counts FLOPs from it."
            )
    if not getattr(args, "untie_embeddings_and_output_weights", True):
        raise ValueError(
            f"--model {args.model} has untied embeddings; pass --untie-embeddings-and-output-weights."
        )
    if getattr(args, "position_embedding_type", "none") != "none":
        raise ValueError(
            f"--model {args.model} has no position embedding (NoPE); pass --position-embedding-type none."
        )

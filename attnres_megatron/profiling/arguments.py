"""Command line of ``attnres-profile``: the ``attnres-pretrain`` model/parallel flags plus its own."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Optional

from attnres_megatron.config import ATTN_RES_MODES
from attnres_megatron.profiling.precision import FP8_FORMATS, FP8_RECIPES
from attnres_megatron.training.arguments import build_parser

# attnres-pretrain flags that have no meaning for a profile (checkpoints, logging, run length).
UNUSED_PRETRAIN_FLAGS = (
    "train_iters",
    "save",
    "save_interval",
    "load",
    "exit_interval",
    "no_load_optim",
    "skip_nonfinite_steps",
    "max_skipped_nonfinite_steps",
    "tensorboard_dir",
    "summary_json",
    "log_interval",
)


def build_profile_parser() -> argparse.ArgumentParser:
    """``attnres-pretrain``'s parser (model, data, parallelism, precision) with the profiler group."""
    parser = build_parser()
    parser.prog = "attnres-profile"
    parser.description = (
        "Profile the same model with standard residuals, Block and Full AttnRes: forward, backward "
        "and optimizer time, peak memory, per-stage time and pipeline boundary bytes, tokens/s."
    )
    parser.set_defaults(lr_warmup_iters=0)
    group = parser.add_argument_group("profiler")
    group.add_argument(
        "--variants",
        nargs="+",
        choices=ATTN_RES_MODES,
        default=list(ATTN_RES_MODES),
        help="Residual variants to profile (same seed and data); 'none' is the baseline of the ratios. "
        "Block uses the block-size flag given, the preset's S, or --attn-res-num-blocks min(8, layers).",
    )
    group.add_argument(
        "--warmup-steps", type=int, default=2, help="Untimed rounds (one step of every variant each) first."
    )
    group.add_argument(
        "--timed-steps",
        type=int,
        default=5,
        help="Timed rounds, one step of every variant each: the median step and the interquartile "
        "range are reported, ratios to the baseline are medians of per-round ratios.",
    )
    group.add_argument(
        "--sequential-variants",
        action="store_true",
        help="Build and run one variant after another (one model in memory at a time) instead of "
        "all at once with their steps interleaved round-robin; ratios then pair steps of different "
        "periods, so load drifts show in them.",
    )
    group.add_argument(
        "--output-dir", default="attnres-profile", help="Where profile.json, profile.md and the PNGs go."
    )
    group.add_argument("--no-plots", action="store_true", help="Skip the PNG plots.")
    group.add_argument(
        "--torch-profiler",
        metavar="DIR",
        default=None,
        help="Also record one extra step per variant with torch.profiler into DIR (TensorBoard traces).",
    )
    group.add_argument(
        "--fp8-format",
        choices=FP8_FORMATS,
        default=None,
        help="FP8 GEMMs through Transformer Engine (TransformerConfig.fp8); needs TE and a CUDA GPU.",
    )
    group.add_argument(
        "--fp8-recipe",
        choices=FP8_RECIPES,
        default="delayed",
        help="Megatron FP8 scaling recipe (TransformerConfig.fp8_recipe); mxfp8 needs Blackwell.",
    )
    group.add_argument(
        "--fallback-bf16",
        action="store_true",
        help="When FP8 cannot run here (no TE or no GPU), profile in bf16 instead of stopping.",
    )
    group.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="Processes to start when not launched by torchrun/mpirun/srun "
        "(default: tensor x pipeline x context parallel size).",
    )
    return parser


def parse_profile_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the profiler's own options (model options are checked by attnres-pretrain's rules)."""
    parser = build_profile_parser()
    args = parser.parse_args(argv)
    for name in UNUSED_PRETRAIN_FLAGS:
        if getattr(args, name) != parser.get_default(name):
            parser.error(
                f"--{name.replace('_', '-')} is an attnres-pretrain option; attnres-profile does not use it."
            )
    if args.attention_residuals is not None:
        parser.error("--attention-residuals: attnres-profile runs every mode in --variants; use --variants.")
    if args.warmup_steps < 0 or args.timed_steps < 1:
        parser.error("--warmup-steps must be >= 0 and --timed-steps >= 1.")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        parser.error("--nproc-per-node must be >= 1.")
    args.variants = list(dict.fromkeys(args.variants))
    args.train_iters = total_steps(args)
    return args


def total_steps(args: argparse.Namespace) -> int:
    """Steps run per variant: warmup, timed, one instrumented (memory), one traced (optional)."""
    return args.warmup_steps + args.timed_steps + 1 + (1 if args.torch_profiler else 0)


def default_world_size(args: argparse.Namespace) -> int:
    """Processes to start on this machine: ``--nproc-per-node`` or TP x PP x CP."""
    if args.nproc_per_node is not None:
        return args.nproc_per_node
    return args.tensor_model_parallel_size * args.pipeline_model_parallel_size * args.context_parallel_size

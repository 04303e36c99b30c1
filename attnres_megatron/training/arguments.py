"""Command-line arguments of ``attnres-pretrain``, spelled like Megatron-LM's."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Optional

from attnres_megatron.config import ATTN_RES_IMPLS, ATTN_RES_MODES
from attnres_megatron.models.specs import TRANSFORMER_IMPLS


def add_attn_res_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the AttnRes flags (also used by the Megatron-LM integration)."""
    group = parser.add_argument_group("attention residuals")
    group.add_argument(
        "--attention-residuals",
        choices=ATTN_RES_MODES,
        default="none",
        help="Depth mixing: none (standard residuals), block (Block AttnRes) or full.",
    )
    size = group.add_mutually_exclusive_group()
    size.add_argument(
        "--attn-res-block-size",
        type=int,
        default=None,
        help="Sublayers per depth block S (attention and MLP count one each).",
    )
    size.add_argument(
        "--attn-res-layers-per-block",
        type=int,
        default=None,
        help="Transformer layers per depth block (S = 2 x this).",
    )
    size.add_argument(
        "--attn-res-num-blocks",
        type=int,
        default=None,
        help="Number of depth blocks N over the model (S = ceil(2L / N)).",
    )
    group.add_argument(
        "--attn-res-eps", type=float, default=1e-6, help="Epsilon of the RMS normalisation of depth keys."
    )
    group.add_argument(
        "--attn-res-impl", choices=ATTN_RES_IMPLS, default="torch", help="Aggregation implementation."
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnres-pretrain",
        description="Pretrain a GPT with Attention Residuals on Megatron-Core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--num-layers", type=int, default=4)
    model.add_argument("--hidden-size", type=int, default=128)
    model.add_argument(
        "--ffn-hidden-size", type=int, default=None, help="MLP width (default 4 x hidden size)."
    )
    model.add_argument("--num-attention-heads", type=int, default=4)
    model.add_argument("--num-query-groups", type=int, default=None)
    model.add_argument("--normalization", choices=("RMSNorm", "LayerNorm"), default="RMSNorm")
    model.add_argument(
        "--position-embedding-type", choices=("rope", "learned_absolute", "none"), default="rope"
    )
    model.add_argument("--hidden-dropout", type=float, default=0.0)
    model.add_argument("--attention-dropout", type=float, default=0.0)
    model.add_argument(
        "--transformer-impl",
        choices=TRANSFORMER_IMPLS,
        default="auto",
        help="Layer spec: Transformer Engine, local (runs on CPU) or auto.",
    )
    add_attn_res_args(parser)

    train = parser.add_argument_group("training")
    train.add_argument("--seq-length", type=int, default=128)
    train.add_argument("--micro-batch-size", type=int, default=4)
    train.add_argument("--train-iters", type=int, default=100)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--min-lr", type=float, default=3e-4)
    train.add_argument("--lr-warmup-iters", type=int, default=10)
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--clip-grad", type=float, default=1.0)
    train.add_argument("--adam-beta1", type=float, default=0.9)
    train.add_argument("--adam-beta2", type=float, default=0.95)
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument(
        "--corpus-bytes",
        type=int,
        default=8 << 20,
        help="Bytes of the built-in corpus (Python standard library sources).",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="cpu enables the CPU/gloo backend; auto picks cuda when available.",
    )
    run.add_argument("--log-interval", type=int, default=10)
    run.add_argument(
        "--summary-json", default=None, help="Write the final summary (losses, tokens/s) to this JSON file."
    )
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Reject bad values with the flag's name before any work starts."""
    positive = (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "seq_length",
        "micro_batch_size",
        "train_iters",
        "log_interval",
    )
    for name in positive:
        value = getattr(args, name)
        if value is None or value < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1; got {value}.")
    if args.hidden_size % args.num_attention_heads:
        raise SystemExit(
            f"error: --hidden-size {args.hidden_size} must be divisible by "
            f"--num-attention-heads {args.num_attention_heads}."
        )
    if not args.lr > 0:
        raise SystemExit(f"error: --lr must be > 0; got {args.lr}.")

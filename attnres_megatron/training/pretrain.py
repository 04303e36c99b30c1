"""``attnres-pretrain``: train a GPT with Attention Residuals on Megatron-Core."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Optional

import torch

from attnres_megatron.config import AttnResTransformerConfig
from attnres_megatron.models.builder import build_gpt_model
from attnres_megatron.training.arguments import parse_args
from attnres_megatron.training.corpus import BYTE_VOCAB_SIZE, TokenWindows, load_stdlib_corpus
from attnres_megatron.training.distributed import (
    initialize_parallel,
    resolve_device,
    shutdown_parallel,
)


def build_config(args: argparse.Namespace, device: str) -> AttnResTransformerConfig:
    """The Megatron config for these arguments; ``ValueError`` names a bad option."""
    return AttnResTransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        normalization=args.normalization,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        use_cpu_initialization=device == "cpu",
        attention_residuals=args.attention_residuals,
        attn_res_block_size=args.attn_res_block_size,
        attn_res_layers_per_block=args.attn_res_layers_per_block,
        attn_res_num_blocks=args.attn_res_num_blocks,
        attn_res_eps=args.attn_res_eps,
        attn_res_impl=args.attn_res_impl,
    )


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay from ``--lr`` to ``--min-lr``."""
    if step < args.lr_warmup_iters:
        return args.lr * (step + 1) / args.lr_warmup_iters
    progress = (step - args.lr_warmup_iters) / max(1, args.train_iters - args.lr_warmup_iters)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norm gains and AttnRes vectors are not decayed."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def log(message: str) -> None:
    print(message, flush=True)


def train(args: argparse.Namespace) -> dict:
    """Run the training loop; returns the summary written at the end."""
    device = resolve_device(args.device)
    try:
        config = build_config(args, device)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    initialize_parallel(device, args.seed)
    try:
        return _train(args, config, device)
    finally:
        shutdown_parallel()


def _train(args: argparse.Namespace, config: AttnResTransformerConfig, device: str) -> dict:
    torch.manual_seed(args.seed)
    model = build_gpt_model(
        config,
        vocab_size=BYTE_VOCAB_SIZE,
        max_sequence_length=args.seq_length,
        transformer_impl=args.transformer_impl,
        position_embedding_type=args.position_embedding_type,
    ).to(device)
    optimizer = torch.optim.AdamW(
        param_groups(model, args.weight_decay), lr=args.lr, betas=(args.adam_beta1, args.adam_beta2)
    )
    data = TokenWindows(load_stdlib_corpus(args.corpus_bytes), args.seq_length, args.seed)
    num_params = sum(p.numel() for p in model.parameters())
    log(
        f"> AttnRes GPT: {num_params:,} parameters, {args.num_layers} layers, hidden "
        f"{args.hidden_size}, attention residuals: {args.attention_residuals}"
        + (
            f" (S={config.attn_res_sublayers_per_block} sublayers per block, "
            f"{config.attn_res_num_sources_at_output()} sources at the output)"
            if config.attn_res_enabled
            else ""
        )
        + f", device {device}"
    )
    positions = torch.arange(args.seq_length, device=device).unsqueeze(0)
    losses: list[float] = []
    tokens_per_step = args.micro_batch_size * args.seq_length
    model.train()
    start = interval_start = time.perf_counter()
    for step in range(args.train_iters):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        inputs, labels = (t.to(device) for t in data.batch(args.micro_batch_size))
        loss = model(inputs, positions.expand_as(inputs), None, labels=labels).float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        if not torch.isfinite(loss) or not torch.isfinite(grad_norm):
            raise SystemExit(f"error: non-finite loss or gradient at iteration {step + 1}.")
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % args.log_interval == 0 or step + 1 == args.train_iters:
            now = time.perf_counter()
            steps = (step % args.log_interval) + 1
            log(
                f" iteration {step + 1:8d}/{args.train_iters:8d} | consumed samples: "
                f"{(step + 1) * args.micro_batch_size:10d} | elapsed time per iteration (ms): "
                f"{1000 * (now - interval_start) / steps:.1f} | learning rate: "
                f"{lr_at(step, args):.3E} | lm loss: {loss.item():.6E} | grad norm: "
                f"{grad_norm.item():.3f} |"
            )
            interval_start = now
    elapsed = time.perf_counter() - start
    summary = {
        "attention_residuals": args.attention_residuals,
        "sublayers_per_block": config.attn_res_sublayers_per_block,
        "train_iters": args.train_iters,
        "initial_loss": losses[0],
        "final_loss": losses[-1],
        "losses": losses,
        "tokens_per_second": tokens_per_step * args.train_iters / elapsed,
        "elapsed_seconds": elapsed,
        "parameters": num_params,
        "device": device,
    }
    log(
        f"> done: {args.train_iters} iterations in {elapsed:.1f} s | tokens/s: "
        f"{summary['tokens_per_second']:.0f} | loss {losses[0]:.4f} -> {losses[-1]:.4f} | "
        f"attention residuals: {args.attention_residuals}"
    )
    if args.summary_json:
        with open(args.summary_json, "w") as handle:
            json.dump(summary, handle, indent=2)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

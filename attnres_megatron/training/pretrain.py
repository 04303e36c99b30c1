"""``attnres-pretrain``: train a GPT with Attention Residuals on Megatron-Core."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from attnres_megatron.training.arguments import parse_args, validate_args
from attnres_megatron.training.corpus import BYTE_VOCAB_SIZE, TokenWindows, load_stdlib_corpus
from attnres_megatron.training.distributed import (
    initialize_parallel,
    resolve_device,
    shutdown_parallel,
)
from attnres_megatron.training.launch_env import LaunchEnvError, discover_launch_env
from attnres_megatron.training.model_setup import TrainingSetup, config_from_args, setup_training


def log(message: str) -> None:
    """Print on the rank that holds the loss (the last rank), as Megatron-LM does."""
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        print(message, flush=True)


def micro_batches(
    data: TokenWindows, args: argparse.Namespace, device: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This data-parallel rank's micro-batches of one global batch."""
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    inputs, labels = data.batch(args.global_batch_size)
    count = args.global_batch_size // (args.micro_batch_size * dp_size)
    shape = (count, dp_size, args.micro_batch_size, args.seq_length)
    return [
        (x.to(device), y.to(device))
        for x, y in zip(inputs.view(shape)[:, dp_rank], labels.view(shape)[:, dp_rank])
    ]


def loss_func(per_token_loss: torch.Tensor):
    """Mean next-token loss of one micro-batch (Megatron's schedule averages micro-batches)."""
    loss = per_token_loss.float().mean()
    return loss, {"lm loss": loss.detach().clone()}  # the schedule scales `loss` in place


def forward_step(batches: Iterator, model: torch.nn.Module):
    tokens, labels = next(batches)
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions, None, labels=labels), partial(loss_func)


def reduced_loss(outputs: list[dict]) -> float:
    """Mean loss over micro-batches and data-parallel ranks."""
    loss = torch.stack([out["lm loss"] for out in outputs]).mean()
    torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return loss.item() / parallel_state.get_data_parallel_world_size()


def train(args: argparse.Namespace) -> dict:
    """Validate everything, start the process groups, run the training loop."""
    try:
        launch = discover_launch_env()
    except LaunchEnvError as error:
        raise SystemExit(f"error: {error}") from None
    validate_args(args, launch.world_size)
    device = resolve_device(args.device)
    try:
        config = config_from_args(args, device)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    initialize_parallel(
        device,
        args.seed,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        launch_env=launch,
    )
    try:
        setup = setup_training(args, config, BYTE_VOCAB_SIZE, device)
        return _train(args, setup, device, launch.launcher)
    finally:
        shutdown_parallel()


def _describe(args: argparse.Namespace, setup: TrainingSetup, device: str, launcher: str) -> str:
    config = setup.config
    params = sum(p.numel() for p in setup.unwrapped.parameters())
    attn_res = args.attention_residuals
    if config.attn_res_enabled:
        attn_res += (
            f" (S={config.attn_res_sublayers_per_block} sublayers per block, "
            f"{config.attn_res_num_sources_at_output()} sources at the output)"
        )
    parallel = (
        f"world {torch.distributed.get_world_size()} via {launcher}: TP {args.tensor_model_parallel_size}"
        f"{' + SP' if args.sequence_parallel else ''}, PP {args.pipeline_model_parallel_size}, "
        f"CP {args.context_parallel_size}, EP {args.expert_model_parallel_size}, "
        f"DP {parallel_state.get_data_parallel_world_size()}"
    )
    moe = f", MoE {args.num_experts} experts top-{args.moe_router_topk}" if args.num_experts else ""
    return (
        f"> AttnRes GPT: {params:,} parameters on this rank, {args.num_layers} layers, hidden "
        f"{args.hidden_size}{moe}, attention residuals: {attn_res}, device {device}"
        f"{', bf16' if args.bf16 else ''}\n> {parallel}"
    )


def _train(args: argparse.Namespace, setup: TrainingSetup, device: str, launcher: str) -> dict:
    log(_describe(args, setup, device, launcher))
    data = TokenWindows(load_stdlib_corpus(args.corpus_bytes), args.seq_length, args.seed)
    forward_backward = get_forward_backward_func()
    losses: list[float] = []
    start = interval_start = time.perf_counter()
    setup.model.train()
    for step in range(args.train_iters):
        setup.model.zero_grad_buffer()
        setup.optimizer.zero_grad()
        batches = micro_batches(data, args, device)
        outputs = forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[setup.model],
            num_microbatches=len(batches),
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            forward_only=False,
        )
        updated, grad_norm, _ = setup.optimizer.step()
        loss = reduced_loss(outputs)
        if not updated or grad_norm is None or not torch.isfinite(torch.tensor([loss, grad_norm])).all():
            raise SystemExit(
                f"error: non-finite loss ({loss}) or gradient norm ({grad_norm}) at iteration {step + 1}."
            )
        setup.scheduler.step(increment=1)
        losses.append(loss)
        if (step + 1) % args.log_interval == 0 or step + 1 == args.train_iters:
            now = time.perf_counter()
            steps = (step % args.log_interval) + 1
            log(
                f" iteration {step + 1:8d}/{args.train_iters:8d} | consumed samples: "
                f"{(step + 1) * args.global_batch_size:10d} | elapsed time per iteration (ms): "
                f"{1000 * (now - interval_start) / steps:.1f} | learning rate: "
                f"{setup.optimizer.param_groups[0]['lr']:.3E} | lm loss: {loss:.6E} | grad norm: "
                f"{grad_norm:.3f} |"
            )
            interval_start = now
    elapsed = time.perf_counter() - start
    tokens = args.global_batch_size * args.seq_length * args.train_iters
    summary = {
        "attention_residuals": args.attention_residuals,
        "sublayers_per_block": setup.config.attn_res_sublayers_per_block,
        "train_iters": args.train_iters,
        "initial_loss": losses[0],
        "final_loss": losses[-1],
        "losses": losses,
        "tokens_per_second": tokens / elapsed,
        "elapsed_seconds": elapsed,
        "world_size": torch.distributed.get_world_size(),
        "launcher": launcher,
        "device": device,
    }
    log(
        f"> done: {args.train_iters} iterations in {elapsed:.1f} s | tokens/s: "
        f"{summary['tokens_per_second']:.0f} | loss {losses[0]:.4f} -> {losses[-1]:.4f} | "
        f"attention residuals: {args.attention_residuals}"
    )
    if args.summary_json and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        with open(args.summary_json, "w") as handle:
            json.dump(summary, handle, indent=2)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

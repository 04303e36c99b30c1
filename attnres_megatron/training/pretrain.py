"""``attnres-pretrain``: train a GPT with Attention Residuals on Megatron-Core."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state

from attnres_megatron.pipeline.ledger import get_byte_ledger
from attnres_megatron.pipeline.schedule import get_forward_backward_func
from attnres_megatron.training.arguments import parse_args
from attnres_megatron.training.checkpointing import (
    CheckpointError,
    describe_load,
    load_checkpoint,
    save_checkpoint,
)
from attnres_megatron.training.corpus import BYTE_VOCAB_SIZE
from attnres_megatron.training.data import (
    DataError,
    DataParallelBatches,
    build_datasets,
    default_corpus_prefix,
)
from attnres_megatron.training.distributed import shutdown_parallel
from attnres_megatron.training.model_setup import (
    TrainingSetup,
    config_from_args,
    initialize_parallel_from_args,
    run_schedule,
    setup_training,
    validated_launch,
    virtual_stages,
)
from attnres_megatron.training.progress import ProgressBar, close_progress_bar, print_line
from attnres_megatron.training.quiet import hide_cpu_advice, optional_packages_line, quiet_start


def log(message: str) -> None:
    """Print on the rank that holds the loss (the last rank), as Megatron-LM does (above the
    progress bar when one is shown)."""
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        print_line(message)


def training_batches(args: argparse.Namespace, device: str) -> DataParallelBatches:
    """Megatron GPT datasets over ``--data-path`` (or the built-in corpus, cached), read in
    Megatron's sample order: step ``s`` always gets the same samples, so resuming is exact."""
    try:
        prefixes = args.data_path or [default_corpus_prefix(max_bytes=args.corpus_bytes)]
        train, _ = build_datasets(
            prefixes,
            args.split,
            args.seq_length,
            args.seed,
            train_samples=args.train_iters * args.global_batch_size,
            valid_samples=0,
            tokenizer=args.tokenizer,
        )
    except DataError as error:
        raise SystemExit(f"error: {error}") from None
    return DataParallelBatches.from_parallel_state(
        train, args.global_batch_size, args.micro_batch_size, device=device
    )


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
    launch, device = validated_launch(args)
    hide_cpu_advice(device, args.verbose_warnings)
    try:
        config = config_from_args(args, device)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    initialize_parallel_from_args(args, device, launch)
    try:
        setup = setup_training(args, config, BYTE_VOCAB_SIZE, device)
        return _train(args, setup, device, launch.launcher)
    finally:
        close_progress_bar()
        shutdown_parallel()


def _describe(args: argparse.Namespace, setup: TrainingSetup, device: str, launcher: str) -> str:
    config = setup.config
    params = sum(p.numel() for chunk in setup.unwrapped() for p in chunk.parameters())
    attn_res = config.attention_residuals
    if config.attn_res_enabled:
        attn_res += (
            f" (S={config.attn_res_sublayers_per_block} sublayers per block, "
            f"{config.attn_res_num_sources_at_output()} sources at the output)"
        )
    parallel = (
        f"world {torch.distributed.get_world_size()} via {launcher}: TP {args.tensor_model_parallel_size}"
        f"{' + SP' if args.sequence_parallel else ''}, PP {args.pipeline_model_parallel_size}"
        f"{f' x VPP {virtual_stages(args)}' if virtual_stages(args) else ''}, "
        f"CP {args.context_parallel_size}, EP {args.expert_model_parallel_size}, "
        f"DP {parallel_state.get_data_parallel_world_size()}"
    )
    moe = (
        f", MoE {config.num_moe_experts} experts top-{config.moe_router_topk}"
        if config.num_moe_experts
        else ""
    )
    name = "AttnRes GPT" if args.model == "gpt" else args.model
    return (
        f"> {name}: {params:,} parameters on this rank, {config.num_layers} layers, hidden "
        f"{config.hidden_size}{moe}, attention residuals: {attn_res}, device {device}"
        f"{', bf16' if args.bf16 else ''}\n> {parallel}"
    )


def grads_are_finite(setup: TrainingSetup) -> bool:
    """Whether every gradient on every rank is finite (one all-reduce)."""
    bad = torch.zeros(1)
    for chunk in setup.chunks:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is not None and not torch.isfinite(grad).all():
                bad.fill_(1)
                break
    torch.distributed.all_reduce(
        bad.to(next(setup.chunks[0].parameters()).device), op=torch.distributed.ReduceOp.MAX
    )
    return bad.item() == 0


class TerminationRequest:
    """Set by SIGTERM: the loop saves a checkpoint after the current iteration and exits."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def everywhere(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag.item() > 0

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def _train(args: argparse.Namespace, setup: TrainingSetup, device: str, launcher: str) -> dict:
    missing = optional_packages_line()
    if missing:
        log(f"> {missing}")
    log(_describe(args, setup, device, launcher))
    data = training_batches(args, device)
    start_iteration = 0
    if args.load:
        try:
            loaded = load_checkpoint(setup, args.load, load_optimizer=not args.no_load_optim)
        except CheckpointError as error:
            raise SystemExit(f"error: {error}") from None
        log(describe_load(loaded, args.load))
        start_iteration = loaded.iteration
    forward_backward = get_forward_backward_func()
    logs_here = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    board, recorder = None, None
    if args.tensorboard_dir:
        from attnres_megatron.diagnostics import DepthAttentionRecorder, TrainingLogger

        board = TrainingLogger(args.tensorboard_dir, enabled=logs_here)
        recorder = DepthAttentionRecorder(setup.unwrapped(), enabled=setup.config.attn_res_enabled)
    losses: list[float] = []
    skipped: list[int] = []
    saved_at = None
    termination = TerminationRequest()
    start = interval_start = time.perf_counter()
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    for chunk in setup.chunks:
        chunk.train()
    progress = ProgressBar(args.train_iters, start_iteration, enabled=logs_here and not args.no_progress_bar)
    for step in range(start_iteration, args.train_iters):
        for chunk in setup.chunks:
            chunk.zero_grad_buffer()
        setup.optimizer.zero_grad()
        batches = data.batches(step)
        logging_step = (step + 1) % args.log_interval == 0 or step + 1 == args.train_iters
        if recorder is not None and logging_step:
            recorder.reset()
            recorder.attach()
        outputs = run_schedule(forward_backward, setup, args, batches, forward_step)
        loss = reduced_loss(outputs) if last_stage else 0.0
        if recorder is not None and recorder.attached:
            recorder.detach()
        if not grads_are_finite(setup) or not torch.isfinite(torch.tensor(loss)):
            if not args.skip_nonfinite_steps:
                raise SystemExit(
                    f"error: non-finite loss or gradients at iteration {step + 1} "
                    "(--skip-nonfinite-steps skips such iterations instead)."
                )
            log(f" iteration {step + 1:8d}/{args.train_iters:8d} | skipped: non-finite loss or gradients |")
            skipped.append(step + 1)
            progress.update(skipped=True)
            setup.scheduler.step(increment=1)
            continue
        if board is not None and logging_step:
            from attnres_megatron.diagnostics import layer_gradient_norms, output_rms

            snapshot = recorder.snapshot()
            board.log_layer_stats(step + 1, output_rms(snapshot), layer_gradient_norms(setup.chunks))
            if snapshot:
                board.log_depth_heatmap(step + 1, snapshot)
        updated, grad_norm, _ = setup.optimizer.step()
        if not updated:
            raise SystemExit(f"error: the optimizer rejected iteration {step + 1} (gradient overflow).")
        setup.scheduler.step(increment=1)
        losses.append(loss)
        progress.update(loss)
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
            if board is not None:
                board.log_scalars(
                    step + 1,
                    loss=loss,
                    lr=setup.optimizer.param_groups[0]["lr"],
                    grad_norm=grad_norm,
                    tokens_per_second=args.global_batch_size
                    * args.seq_length
                    * steps
                    / (now - interval_start),
                )
            interval_start = now
        exiting = bool(args.exit_interval) and (step + 1) % args.exit_interval == 0
        stop = termination.everywhere() or exiting
        if args.save and ((args.save_interval and (step + 1) % args.save_interval == 0) or stop):
            save_checkpoint(
                setup, step + 1, args.save, {"consumed_samples": (step + 1) * args.global_batch_size}, args
            )
            saved_at = step + 1
            log(f"> saved checkpoint at iteration {step + 1} to {args.save}")
        if stop:
            reason = "--exit-interval reached" if exiting else "SIGTERM received"
            log(f"> {reason}: stopped after iteration {step + 1}")
            break
    termination.restore()
    progress.close()
    if board is not None:
        board.close()
    if args.save and saved_at != step + 1:
        save_checkpoint(
            setup, step + 1, args.save, {"consumed_samples": (step + 1) * args.global_batch_size}, args
        )
        log(f"> saved checkpoint at iteration {step + 1} to {args.save}")
    elapsed = time.perf_counter() - start
    tokens = args.global_batch_size * args.seq_length * max(1, len(losses))
    pipeline = pipeline_traffic(setup)
    summary = {
        "model": args.model,
        "attention_residuals": setup.config.attention_residuals,
        "sublayers_per_block": setup.config.attn_res_sublayers_per_block,
        "train_iters": args.train_iters,
        "start_iteration": start_iteration,
        "skipped_iterations": skipped,
        "initial_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "tokens_per_second": tokens / elapsed,
        "elapsed_seconds": elapsed,
        "world_size": torch.distributed.get_world_size(),
        "pipeline_traffic": pipeline,
        "launcher": launcher,
        "device": device,
    }
    log(
        f"> done: {len(losses)} iterations in {elapsed:.1f} s | tokens/s: "
        f"{summary['tokens_per_second']:.0f} | loss {summary['initial_loss']} -> {summary['final_loss']} | "
        f"attention residuals: {setup.config.attention_residuals}"
    )
    if args.save:
        log(f"> checkpoint: {os.path.abspath(args.save)} (resume with --load {args.save})")
    if args.tensorboard_dir:
        board_dir = args.tensorboard_dir
        log(f"> TensorBoard logs: {os.path.abspath(board_dir)} (tensorboard --logdir {board_dir})")
    if args.summary_json and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        with open(args.summary_json, "w") as handle:
            json.dump(summary, handle, indent=2)
    return summary


def pipeline_traffic(setup: TrainingSetup) -> list[dict]:
    """Measured bytes per boundary (last iteration, per micro-batch) from every rank's
    ledger, beside the analytic counts without (Eq. 7) and with (Eq. 8) the cache."""
    layout = getattr(setup.unwrapped()[0].decoder, "attn_res_layout", None)
    if layout is None:
        return []
    ledgers = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ledgers, get_byte_ledger().summary())
    rows = []
    for receiver in layout.chunks[1:]:
        boundary = receiver.index - 1
        forward = [
            led[boundary]["forward_bytes"] for led in ledgers if led.get(boundary, {}).get("forward_bytes")
        ]
        backward = [
            led[boundary]["backward_bytes"] for led in ledgers if led.get(boundary, {}).get("backward_bytes")
        ]
        per_source = next(iter(forward[0].values())) // layout.sources_received(receiver) if forward else 0
        rows.append(
            {
                "boundary": f"{boundary}->{receiver.index}",
                "sources_cached": layout.sources_received(receiver),
                "sources_naive": layout.sources_received(receiver, cached=False),
                "forward_bytes_per_micro_batch": next(iter(forward[0].values())) if forward else None,
                "backward_bytes_per_micro_batch": next(iter(backward[0].values())) if backward else None,
                "naive_bytes_per_micro_batch": per_source * layout.sources_received(receiver, cached=False),
            }
        )
    for row in rows:
        log(
            f"> pipeline boundary {row['boundary']}: {row['sources_cached']} sources "
            f"(naive {row['sources_naive']}) | bytes per micro-batch forward "
            f"{row['forward_bytes_per_micro_batch']}, backward {row['backward_bytes_per_micro_batch']}"
            f" (naive {row['naive_bytes_per_micro_batch']})"
        )
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_start(argv)  # also done on import of the package when started as attnres-pretrain
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

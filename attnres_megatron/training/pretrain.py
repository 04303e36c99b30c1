"""``attnres-pretrain``: train a GPT with Attention Residuals on Megatron-Core."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import torch
from megatron.core import parallel_state

from attnres_megatron.models.families import model_family
from attnres_megatron.ops.dispatch import choose_for_model
from attnres_megatron.pipeline.ledger import get_byte_ledger
from attnres_megatron.pipeline.schedule import get_forward_backward_func
from attnres_megatron.training.arguments import parse_args
from attnres_megatron.training.checkpointing import (
    CheckpointError,
    checkpoint_preflight,
    describe_load,
    load_checkpoint,
    new_run_id,
    save_checkpoint,
    saved_attn_res_eps,
)
from attnres_megatron.training.collective_errors import exit_on_collective_failure
from attnres_megatron.training.data import (
    DataError,
    DataParallelBatches,
    build_mock_datasets,
    build_split_datasets,
    default_corpus_prefix,
)
from attnres_megatron.training.distributed import shutdown_parallel
from attnres_megatron.training.evaluation import Evaluator, data_parallel_mean
from attnres_megatron.training.faults import check_skip_limit, exit_when_disk_full, saved_iteration
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
from attnres_megatron.training.resume import SampleOffset
from attnres_megatron.training.termination import TerminationRequest
from attnres_megatron.training.tokenizers import TokenizerError, build_tokenizer
from attnres_megatron.training.training_log import (
    LOSS_KEY,
    IntervalStats,
    TrainingClock,
    iteration_line,
    timestamp,
)
from attnres_megatron.training.vocabulary import prepare_vocabulary


def log(message: str) -> None:
    """Print on the rank that holds the loss (the last rank), as Megatron-LM does (above the
    progress bar when one is shown)."""
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        print_line(message)


def gpt_datasets(
    args: argparse.Namespace, train_samples: int = 0, valid_samples: int = 0, test_samples: int = 0
) -> tuple:
    """Megatron GPT datasets (train, valid, test) over ``--data-path`` (or the built-in corpus,
    cached) with ``--split``, or Megatron's mock datasets with ``--mock-data``; a split asked for 0
    samples is None."""
    tokenizer = build_tokenizer(args)
    if args.mock_data:
        return build_mock_datasets(
            args.seq_length, args.seed, train_samples, valid_samples, test_samples, tokenizer
        )
    prefixes = args.data_path or [default_corpus_prefix(max_bytes=args.corpus_bytes, tokenizer=tokenizer)]
    return build_split_datasets(
        prefixes,
        args.split,
        args.seq_length,
        args.seed,
        train_samples=train_samples,
        valid_samples=valid_samples,
        test_samples=test_samples,
        tokenizer=tokenizer,
    )


def training_batches(
    args: argparse.Namespace, device: str, start_iteration: int = 0, consumed_samples: int = 0
) -> DataParallelBatches:
    """Megatron GPT datasets over ``--data-path`` (or the built-in corpus, cached), read in
    Megatron's sample order: step ``s`` always gets the same samples, so resuming is exact. A
    resumed run's step 0 starts after the ``consumed_samples`` of its checkpoint."""
    remaining = max(0, args.train_iters - start_iteration) * args.global_batch_size
    samples = max(args.train_iters * args.global_batch_size, consumed_samples + remaining)
    try:
        train, _, _ = gpt_datasets(args, train_samples=samples)
    except (DataError, TokenizerError) as error:
        raise SystemExit(f"error: {error}") from None
    return DataParallelBatches.from_parallel_state(
        SampleOffset(train, consumed_samples), args.global_batch_size, args.micro_batch_size, device=device
    )


def loss_func(per_token_loss: torch.Tensor):
    """Mean next-token loss of one micro-batch (Megatron's schedule averages micro-batches)."""
    loss = per_token_loss.float().mean()
    return loss, {LOSS_KEY: loss.detach().clone()}  # the schedule scales `loss` in place


def forward_step(batches: Iterator, model: torch.nn.Module):
    tokens, labels = next(batches)
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions, None, labels=labels), partial(loss_func)


def reduced_loss(outputs: list[dict]) -> float:
    """Mean loss over micro-batches and data-parallel ranks."""
    return data_parallel_mean([out[LOSS_KEY] for out in outputs])


def train(args: argparse.Namespace) -> dict:
    """Validate everything, start the process groups, run the training loop."""
    launch, device = validated_launch(args)
    hide_cpu_advice(device, args.verbose_warnings)
    if args.load and args.attn_res_eps is None:  # a resumed model keeps the epsilon it trained with
        args.attn_res_eps = saved_attn_res_eps(args.load)
    try:
        config = config_from_args(args, device)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    prepare_vocabulary(args)  # the tokenizer, args.padded_vocab_size, data and checkpoint checks
    try:
        preflight = checkpoint_preflight(args, config)  # --load fits, --save destroys nothing
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None
    finished = [preflight.finished] if preflight.finished else []
    if finished and args.eval_iters > 0:  # as Megatron-LM: no iteration left, the final evaluation
        finished.append("> no iteration left: running the final validation and test evaluation only")
    if launch.rank == launch.world_size - 1:
        for line in [*preflight.lines, *finished]:
            print(line, flush=True)
    if preflight.finished and args.eval_iters <= 0:  # e.g. a requeued job that already finished
        return {}
    initialize_parallel_from_args(args, device, launch)
    try:
        with exit_on_collective_failure(args.distributed_timeout_minutes):
            setup = setup_training(args, config, args.padded_vocab_size, device)
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
    name = model_family(args.model).display_name
    lines = [
        f"> {name}: {params:,} parameters on this rank, {config.num_layers} layers, hidden "
        f"{config.hidden_size}{moe}, attention residuals: {attn_res}, device {device}"
        f"{', bf16' if args.bf16 else ''}",
        f"> {parallel}",
    ]
    if config.attn_res_enabled:
        choice = choose_for_model(config, device, args.seq_length, args.micro_batch_size)
        lines.append(f"> {choice.describe()}")
    return "\n".join(lines)


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


@dataclass
class StepResult:
    """One training iteration's outcome."""

    loss: float
    skipped: bool = False
    grad_norm: Optional[float] = None


class TrainingLoop:
    """Iterations, Megatron-LM's log lines and TensorBoard scalars, evaluations and checkpoints."""

    def __init__(
        self,
        args: argparse.Namespace,
        setup: TrainingSetup,
        device: str,
        start_iteration: int,
        consumed_samples: Optional[int] = None,
        run_id: Optional[str] = None,
    ):
        self.args, self.setup, self.start_iteration = args, setup, start_iteration
        self.consumed_at_start = (
            start_iteration * args.global_batch_size if consumed_samples is None else consumed_samples
        )
        self.run_id = run_id or new_run_id()
        self.data = training_batches(args, device, start_iteration, self.consumed_at_start)
        self.forward_backward = get_forward_backward_func()
        get_byte_ledger().reset()  # record what pipeline_traffic() reports at the end
        self.logs_here = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
        self.last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.board, self.recorder = self._diagnostics()
        build = partial(gpt_datasets, args, 0)
        self.evaluator = Evaluator(setup, args, build, forward_step, log, self.board, start_iteration, device)
        self.losses: list[float] = []
        self.skipped: list[int] = []
        self.saved_at: Optional[int] = None
        self.stopped = False
        self.clock = TrainingClock()
        self.stats, self.interval_start = IntervalStats(), 0.0

    def _diagnostics(self) -> tuple[Any, Any]:
        """TensorBoard writer (logging rank only) and depth recorder, with --tensorboard-dir."""
        if not self.args.tensorboard_dir:
            return None, None
        from attnres_megatron.diagnostics import DepthAttentionRecorder, TrainingLogger

        board = TrainingLogger(self.args.tensorboard_dir, enabled=self.logs_here)
        recorder = DepthAttentionRecorder(self.setup.unwrapped(), enabled=self.setup.config.attn_res_enabled)
        return board, recorder

    def run(self) -> int:
        """Train to ``--train-iters`` (or an early stop); returns the last iteration."""
        termination = TerminationRequest()
        enabled = self.logs_here and not self.args.no_progress_bar
        progress = ProgressBar(self.args.train_iters, self.start_iteration, enabled=enabled)
        self.clock = TrainingClock()
        iteration = self.start_iteration
        try:
            for iteration in range(self.start_iteration + 1, self.args.train_iters + 1):
                result = self.step(iteration)
                progress.update(None if result.skipped else result.loss, skipped=result.skipped)
                self.report(iteration, result)
                if self.evaluator.due(iteration):
                    with self.clock.pause("evaluation"):
                        self.evaluator.periodic(iteration)
                if self.after_iteration(iteration, termination):
                    break
        finally:
            termination.restore()
            progress.close()
        return iteration

    def step(self, iteration: int) -> StepResult:
        """One forward-backward and optimizer step over the iteration's global batch."""
        for chunk in self.setup.chunks:
            chunk.zero_grad_buffer()
        self.setup.optimizer.zero_grad()
        record = self.recorder is not None and self.logging_iteration(iteration)
        if record:
            self.recorder.reset()
            self.recorder.attach()
        batches = self.data.batches(iteration - 1 - self.start_iteration)
        outputs = run_schedule(self.forward_backward, self.setup, self.args, batches, forward_step)
        loss = reduced_loss(outputs) if self.last_stage else 0.0
        if record:
            self.recorder.detach()
        if not grads_are_finite(self.setup) or not math.isfinite(loss):
            return self.skip(iteration, loss)
        if record:
            self.log_depth(iteration)
        updated, grad_norm, _ = self.setup.optimizer.step()
        if not updated:
            raise SystemExit(f"error: the optimizer rejected iteration {iteration} (gradient overflow).")
        self.setup.scheduler.step(increment=1)
        self.losses.append(loss)
        return StepResult(loss, grad_norm=grad_norm)

    def skip(self, iteration: int, loss: float) -> StepResult:
        """A non-finite iteration: stop, or skip it with --skip-nonfinite-steps."""
        if not self.args.skip_nonfinite_steps:
            raise SystemExit(
                f"error: non-finite loss or gradients at iteration {iteration} "
                "(--skip-nonfinite-steps skips such iterations instead)."
            )
        progress = f"{iteration:8d}/{self.args.train_iters:8d}"
        log(f" {timestamp()} iteration {progress} | skipped: non-finite loss or gradients |")
        self.skipped.append(iteration)
        check_skip_limit(self.skipped, self.args.max_skipped_nonfinite_steps)
        self.setup.scheduler.step(increment=1)
        return StepResult(loss, skipped=True)

    def log_depth(self, iteration: int) -> None:
        """Per-sublayer RMS, per-layer gradient norms and the depth heatmap (``attn_res/``)."""
        from attnres_megatron.diagnostics import layer_gradient_norms, output_rms

        snapshot = self.recorder.snapshot()
        self.board.log_layer_stats(iteration, output_rms(snapshot), layer_gradient_norms(self.setup.chunks))
        if snapshot:
            self.board.log_depth_heatmap(iteration, snapshot)

    def logging_iteration(self, iteration: int) -> bool:
        """Whether ``iteration`` prints a log line: every ``--log-interval``, the last one and,
        as in Megatron-LM, the first of the run."""
        return self.regular_log(iteration) or iteration == self.start_iteration + 1

    def consumed(self, iteration: int) -> int:
        """Global samples consumed after ``iteration`` (the checkpoint's count plus this run's)."""
        return self.consumed_at_start + (iteration - self.start_iteration) * self.args.global_batch_size

    def regular_log(self, iteration: int) -> bool:
        """A log line that closes an interval (every ``--log-interval`` and the last iteration)."""
        return iteration % self.args.log_interval == 0 or iteration == self.args.train_iters

    def report(self, iteration: int, result: StepResult) -> None:
        """Megatron-LM's per-iteration TensorBoard scalars and, when due, the log line."""
        self.stats.add(result.loss, result.skipped)
        learning_rate = self.setup.optimizer.param_groups[0]["lr"]
        loss_scale = self.setup.optimizer.get_loss_scale().item()
        if self.board is not None:
            loss = None if result.skipped else result.loss
            consumed = self.consumed(iteration)
            gbs = self.args.global_batch_size
            self.board.log_training(
                iteration, consumed, learning_rate, gbs, loss, loss_scale, result.grad_norm
            )
        if self.logging_iteration(iteration):
            self.log_line(iteration, learning_rate, loss_scale, result.grad_norm)

    def log_line(
        self, iteration: int, learning_rate: float, loss_scale: float, grad_norm: Optional[float]
    ) -> None:
        """The iteration log line; a regular one also writes the timing scalars and starts a new
        interval (the first line of a run does not, as in Megatron-LM)."""
        args, now = self.args, self.clock.elapsed()
        seconds = (now - self.interval_start) / max(1, self.stats.iterations)
        consumed = self.consumed(iteration)
        stats = (iteration, args.train_iters, consumed, 1000 * seconds, learning_rate, args.global_batch_size)
        log(iteration_line(*stats, self.stats, loss_scale, grad_norm))
        if not self.regular_log(iteration):
            return
        if self.board is not None:
            self.board.log_timing(iteration, seconds, args.global_batch_size * args.seq_length / seconds)
        self.stats, self.interval_start = IntervalStats(), now

    def after_iteration(self, iteration: int, termination: TerminationRequest) -> bool:
        """Save when due; whether to stop (SIGTERM or --exit-interval; saved first with --save)."""
        exiting = bool(self.args.exit_interval) and iteration % self.args.exit_interval == 0
        self.stopped = termination.everywhere() or exiting
        interval = self.args.save_interval
        if self.args.save and ((interval and iteration % interval == 0) or self.stopped):
            self.save(iteration)
        if self.stopped:
            reason = "--exit-interval reached" if exiting else "SIGTERM received"
            log(f"> {reason}: stopped after iteration {iteration}")
        return self.stopped

    def save(self, iteration: int) -> None:
        """A checkpoint at ``iteration`` (its time is not training time)."""
        state = {"consumed_samples": self.consumed(iteration)}
        previous = self.saved_at if self.saved_at is not None else saved_iteration(self.args.save)
        with self.clock.pause("checkpoint"), exit_when_disk_full(iteration, self.args.save, previous):
            save_checkpoint(self.setup, iteration, self.args.save, state, self.args, self.run_id)
        self.saved_at = iteration
        log(f"> saved checkpoint at iteration {iteration} to {self.args.save}")

    def finish(self, iteration: int) -> None:
        """The last checkpoint and, unless stopped early (as Megatron-LM), the final
        validation and test evaluations."""
        if self.args.save and iteration > self.start_iteration and self.saved_at != iteration:
            self.save(iteration)
        if not self.stopped:
            with self.clock.pause("evaluation"):
                self.evaluator.final(iteration)
        if self.board is not None:
            self.board.close()


def _train(args: argparse.Namespace, setup: TrainingSetup, device: str, launcher: str) -> dict:
    missing = optional_packages_line()
    if missing:
        log(f"> {missing}")
    log(_describe(args, setup, device, launcher))
    start_iteration, consumed, run_id = 0, 0, None
    if args.load:
        try:
            loaded = load_checkpoint(
                setup, args.load, not args.no_load_optim, args, verify=not args.no_verify_checkpoint
            )
        except CheckpointError as error:
            raise SystemExit(f"error: {error}") from None
        for note in loaded.notes:
            log(note)
        log(describe_load(loaded, args.load))
        start_iteration, consumed, run_id = loaded.iteration, loaded.consumed_samples, loaded.run_id
    started = time.perf_counter()
    loop = TrainingLoop(args, setup, device, start_iteration, consumed, run_id)
    iteration = loop.run()
    train_seconds = loop.clock.elapsed()
    loop.finish(iteration)
    summary = run_summary(args, setup, loop, launcher, device, train_seconds)
    summary["elapsed_seconds"] = time.perf_counter() - started
    log(done_line(summary))
    if args.save:
        log(f"> checkpoint: {os.path.abspath(args.save)} (resume with --load {args.save})")
    if args.tensorboard_dir:
        board_dir = args.tensorboard_dir
        log(f"> TensorBoard logs: {os.path.abspath(board_dir)} (tensorboard --logdir {board_dir})")
    if args.summary_json and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        with open(args.summary_json, "w") as handle:
            json.dump(summary, handle, indent=2)
    return summary


def run_summary(
    args: argparse.Namespace,
    setup: TrainingSetup,
    loop: TrainingLoop,
    launcher: str,
    device: str,
    train_seconds: float,
) -> dict:
    """The run's summary (also ``--summary-json``); tokens/s over training time only."""
    losses = loop.losses
    tokens = args.global_batch_size * args.seq_length * max(1, len(losses))
    return {
        "model": args.model,
        "attention_residuals": setup.config.attention_residuals,
        "sublayers_per_block": setup.config.attn_res_sublayers_per_block,
        "train_iters": args.train_iters,
        "start_iteration": loop.start_iteration,
        "skipped_iterations": loop.skipped,
        "initial_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        **loop.evaluator.summary(),
        "tokens_per_second": tokens / max(train_seconds, 1e-9),
        "train_seconds": train_seconds,
        "evaluation_seconds": loop.clock.paused.get("evaluation", 0.0),
        "checkpoint_seconds": loop.clock.paused.get("checkpoint", 0.0),
        "world_size": torch.distributed.get_world_size(),
        "pipeline_traffic": pipeline_traffic(setup),
        "launcher": launcher,
        "device": device,
    }


def _rounded(value: Optional[float]) -> str:
    """A loss for the summary line: four decimals, ``n/a`` when absent."""
    return "n/a" if value is None else f"{value:.4f}"


def done_line(summary: dict) -> str:
    """The closing summary line, rounded."""
    line = (
        f"> done: {len(summary['losses'])} iterations in {summary['train_seconds']:.1f} s (evaluation "
        f"{summary['evaluation_seconds']:.1f} s, checkpoints {summary['checkpoint_seconds']:.1f} s) | "
        f"tokens/s: {summary['tokens_per_second']:.0f} | lm loss {_rounded(summary['initial_loss'])} -> "
        f"{_rounded(summary['final_loss'])}"
    )
    for split in ("validation", "test"):
        if summary[f"{split}_loss"] is not None:
            line += f" | {split} lm loss {_rounded(summary[f'{split}_loss'])}"
    return line + f" | attention residuals: {summary['attention_residuals']}"


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

"""Evaluation on the validation and test splits, as Megatron-LM's ``evaluate`` does it.

Each evaluation runs ``--eval-iters`` global batches through the forward-only AttnRes
pipeline schedule (every parallel layout, interleaved pipelines included) with the model
chunks in eval mode and autograd off; the loss is the mean over the micro-batches and the
data-parallel ranks, reduced as the training loss is. The RNG states are restored
afterwards, so a run's training losses do not depend on whether or how often it evaluates.

Sample counts follow Megatron-LM: an evaluation reads ``eval_iters x global_batch_size``
samples; the validation set is sized for every evaluation of the run, the periodic ones
(every ``--eval-interval`` iterations) and the one at the end,
``(train_iters // eval_interval + 1) x eval_iters x global_batch_size``, and evaluation ``k``
reads its own consecutive slice, so a resumed run continues where the interrupted one
stopped. The test set holds one evaluation, run at the end of training.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from attnres_megatron.pipeline.schedule import get_forward_backward_func
from attnres_megatron.training.data import DataError, DataParallelBatches
from attnres_megatron.training.model_setup import TrainingSetup, run_schedule
from attnres_megatron.training.training_log import LOSS_KEY, evaluation_lines, perplexity

SPLITS = ("validation", "test")
DatasetBuilder = Callable[[int, int], tuple]
"""``build(valid_samples, test_samples)`` -> Megatron's (train, valid, test) datasets."""


def periodic_evaluations(iteration: int, args: argparse.Namespace) -> int:
    """Periodic evaluations a run has done by ``iteration`` (none without ``--eval-interval``)."""
    return iteration // args.eval_interval if args.eval_interval and args.eval_interval > 0 else 0


def evaluation_samples(args: argparse.Namespace) -> tuple[int, int]:
    """(validation, test) samples of a run, as Megatron-LM sizes them (0, 0 without evaluation)."""
    if args.eval_iters <= 0:
        return 0, 0
    per_evaluation = args.eval_iters * args.global_batch_size
    return (periodic_evaluations(args.train_iters, args) + 1) * per_evaluation, per_evaluation


def data_parallel_mean(losses: Sequence[torch.Tensor]) -> float:
    """Mean of micro-batch losses over this rank's micro-batches and the data-parallel (and
    context-parallel) ranks."""
    loss = torch.stack(list(losses)).float().mean()
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    torch.distributed.all_reduce(loss, group=group)
    return loss.item() / torch.distributed.get_world_size(group)


def rng_states() -> dict[str, Any]:
    """Every RNG state a forward pass could draw from."""
    states = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`rng_states` saved."""
    torch.set_rng_state(states["torch"])
    get_cuda_rng_tracker().set_states(states["tracker"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


@contextlib.contextmanager
def evaluation_mode(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Model chunks in eval mode (no dropout) under ``torch.no_grad``; training mode and the
    RNG states are restored afterwards."""
    states = rng_states()
    for chunk in chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for chunk in chunks:
            chunk.train()
        restore_rng_states(states)


def forward_only_losses(
    setup: TrainingSetup, args: argparse.Namespace, steps: Iterable[list], forward_step: Callable
) -> list[torch.Tensor]:
    """This rank's micro-batch losses of ``steps`` (global batches of micro-batches) through
    the forward-only schedule; empty off the last pipeline stage."""
    schedule = get_forward_backward_func()
    losses = []
    with evaluation_mode(setup.chunks):
        for batches in steps:
            outputs = run_schedule(schedule, setup, args, batches, forward_step, forward_only=True)
            losses.extend(output[LOSS_KEY] for output in outputs)
    return losses


def evaluate(
    setup: TrainingSetup,
    args: argparse.Namespace,
    data: DataParallelBatches,
    first_step: int,
    forward_step: Callable,
) -> Optional[float]:
    """Mean loss of ``--eval-iters`` global batches of ``data`` from ``first_step`` (None off
    the last pipeline stage)."""
    steps = (data.batches(step) for step in range(first_step, first_step + args.eval_iters))
    losses = forward_only_losses(setup, args, steps, forward_step)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return data_parallel_mean(losses)


def _split_dataset(build: DatasetBuilder, split: str, samples: int, note: Callable[[str], None]) -> Any:
    """The dataset of one evaluation split, or None (with a note) where it cannot be built."""
    sizes = (samples, 0) if split == "validation" else (0, samples)
    try:
        dataset = build(*sizes)[1 + SPLITS.index(split)]
        if dataset is None:
            raise DataError("--split gives it no share; give it one in --split to evaluate on it")
        if len(dataset) < samples:
            raise DataError(
                f"it has {len(dataset)} samples, fewer than the {samples} the evaluations need "
                "(an unweighted blend covers one epoch; give the blend weights)"
            )
    except DataError as error:
        note(f"> no evaluation on the {split} set: {error}")
        return None
    return dataset


@dataclass
class EvaluationResult:
    """One evaluation: the split, the iteration it ran after, and the mean loss."""

    split: str
    iteration: int
    loss: float

    def as_dict(self) -> dict:
        """For the summary JSON."""
        return {
            "split": self.split,
            "iteration": self.iteration,
            "loss": self.loss,
            "ppl": perplexity(self.loss),
        }


class Evaluator:
    """The periodic and final evaluations of one run, with Megatron-LM's log lines and
    TensorBoard scalars (on the logging rank)."""

    def __init__(
        self,
        setup: TrainingSetup,
        args: argparse.Namespace,
        build: DatasetBuilder,
        forward_step: Callable,
        log: Callable[[str], None],
        board: Any = None,
        start_iteration: int = 0,
        device: str = "cpu",
    ) -> None:
        self.setup, self.args, self.forward_step, self.log, self.board = setup, args, forward_step, log, board
        valid_samples, test_samples = evaluation_samples(args)
        self.data = {
            split: self._batches(_split_dataset(build, split, samples, log), device)
            for split, samples in zip(SPLITS, (valid_samples, test_samples))
            if samples
        }
        self.done = periodic_evaluations(start_iteration, args)
        self.results: list[EvaluationResult] = []

    def _batches(self, dataset: Any, device: str) -> Optional[DataParallelBatches]:
        """This data-parallel rank's global batches of ``dataset`` (None for no dataset)."""
        if dataset is None:
            return None
        return DataParallelBatches.from_parallel_state(
            dataset, self.args.global_batch_size, self.args.micro_batch_size, device=device
        )

    def due(self, iteration: int) -> bool:
        """Whether a periodic validation follows ``iteration``."""
        interval = self.args.eval_interval
        periodic = bool(interval) and interval > 0 and iteration % interval == 0
        return periodic and self.data.get("validation") is not None

    def periodic(self, iteration: int) -> None:
        """The validation every ``--eval-interval`` iterations."""
        self._run("validation", self.done * self.args.eval_iters, iteration, f"iteration {iteration}")
        self.done += 1

    def final(self, iteration: int) -> None:
        """The validation and test evaluations at the end of training."""
        self._run(
            "validation",
            self.done * self.args.eval_iters,
            iteration,
            f"iteration {iteration} on validation set",
        )
        self._run("test", 0, iteration, f"iteration {iteration} on test set")

    def _run(self, split: str, first_step: int, iteration: int, prefix: str) -> None:
        """Evaluate ``split`` from ``first_step``; log the box and the TensorBoard scalars."""
        data = self.data.get(split)
        if data is None:
            return
        loss = evaluate(self.setup, self.args, data, first_step, self.forward_step)
        if loss is None:
            return
        self.results.append(EvaluationResult(split, iteration, loss))
        for line in evaluation_lines(prefix, loss):
            self.log(line)
        if self.board is not None:
            consumed = iteration * self.args.global_batch_size
            self.board.log_evaluation(iteration, consumed, loss, perplexity(loss), split)

    def summary(self) -> dict:
        """Every evaluation of the run, and the last validation and test losses."""
        last = {split: None for split in SPLITS}
        for result in self.results:
            last[result.split] = result.loss
        return {
            "evaluations": [result.as_dict() for result in self.results],
            "validation_loss": last["validation"],
            "test_loss": last["test"],
        }

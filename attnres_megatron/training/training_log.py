"""Log lines of ``attnres-pretrain`` with the fields, order and formatting of Megatron-LM's
``training_log`` and ``evaluate_and_print_results`` (``megatron/training/training.py``), so
tools that read Megatron-LM logs read these too.

An iteration line::

     [2026-01-01 12:00:00.000000] iteration       10/     100 | consumed samples:           80 |
     elapsed time per iteration (ms): 41.3 | learning rate: 2.985000E-03 | global batch size:     8 |
     lm loss: 4.812345E+00 | loss scale: 1.0 | grad norm: 0.734 | number of skipped iterations:   0 |
     number of nan iterations:   0 |

(one line), and an evaluation, in a dashed box::

     validation loss at iteration 10 | lm loss value: 4.701234E+00 | lm loss PPL: 1.100793E+02 |
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional

LOSS_KEY = "lm loss"


def perplexity(loss: float) -> float:
    """The perplexity Megatron-LM reports: ``exp(min(20, loss))``."""
    return math.exp(min(20.0, loss))


@dataclass
class IntervalStats:
    """What Megatron-LM's ``training_log`` accumulates between two log lines."""

    loss_sum: float = 0.0
    advanced: int = 0
    skipped: int = 0
    nan: int = 0

    def add(self, loss: float, skipped: bool) -> None:
        """Count one iteration: its loss if it advanced, else a skipped (and maybe NaN) one."""
        if skipped:
            self.skipped += 1
            self.nan += int(not math.isfinite(loss))
        else:
            self.advanced += 1
            self.loss_sum += loss

    @property
    def iterations(self) -> int:
        """Iterations in the interval, advanced or skipped."""
        return self.advanced + self.skipped

    @property
    def mean_loss(self) -> float:
        """Mean loss of the advanced iterations (0 when none advanced, as Megatron-LM computes it)."""
        return self.loss_sum / max(1, self.advanced)


@dataclass
class TrainingClock:
    """Wall time of a run with the stretches spent elsewhere (evaluation, checkpoint saves)
    taken out, per kind; the time per iteration and tokens/s are measured on it."""

    start: float = field(default_factory=time.perf_counter)
    paused: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def pause(self, kind: str) -> Iterator[None]:
        """Leave the enclosed stretch out of the training time, booked under ``kind``."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.paused[kind] = self.paused.get(kind, 0.0) + time.perf_counter() - begin

    def elapsed(self) -> float:
        """Seconds of training so far (wall time minus every paused stretch)."""
        return time.perf_counter() - self.start - sum(self.paused.values())


def timestamp() -> str:
    """Megatron-LM's log-line timestamp, e.g. ``[2026-01-01 12:00:00.123456]``."""
    return f"[{datetime.now().strftime('%Y-%m-%d %H:%M:%S.%f')}]"


def iteration_line(
    iteration: int,
    train_iters: int,
    consumed_samples: int,
    ms_per_iteration: float,
    learning_rate: float,
    global_batch_size: int,
    stats: IntervalStats,
    loss_scale: float,
    grad_norm: Optional[float],
) -> str:
    """One iteration log line, field for field as Megatron-LM's ``training_log`` prints it."""
    line = f" {timestamp()} iteration {iteration:8d}/{train_iters:8d} |"
    line += f" consumed samples: {consumed_samples:12d} |"
    line += f" elapsed time per iteration (ms): {ms_per_iteration:.1f} |"
    line += f" learning rate: {learning_rate:.6E} |"
    line += f" global batch size: {global_batch_size:5d} |"
    if stats.mean_loss > 0.0:
        line += f" {LOSS_KEY}: {stats.mean_loss:.6E} |"
    line += f" loss scale: {loss_scale:.1f} |"
    if grad_norm is not None:
        line += f" grad norm: {grad_norm:.3f} |"
    line += f" number of skipped iterations: {stats.skipped:3d} |"
    line += f" number of nan iterations: {stats.nan:3d} |"
    return line


def evaluation_lines(prefix: str, loss: float) -> list[str]:
    """An evaluation result in Megatron-LM's dashed box (``prefix``: ``iteration N``, or
    ``iteration N on validation set`` / ``on test set`` at the end of training)."""
    text = f" validation loss at {prefix} | "
    text += f"{LOSS_KEY} value: {loss:.6E} | {LOSS_KEY} PPL: {perplexity(loss):.6E} | "
    rule = "-" * (len(text) + 1)
    return [rule, text, rule]

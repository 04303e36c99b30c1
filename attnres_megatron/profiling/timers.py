"""Clocks for the profiler: a stopwatch that synchronises CUDA and Megatron's schedule timer hook."""

from __future__ import annotations

import time
from typing import Optional

import torch

P2P_TIMERS = (
    "forward-recv",
    "forward-send",
    "backward-recv",
    "backward-send",
    "forward-send-backward-recv",
    "backward-send-forward-recv",
    "forward-send-forward-recv",
    "backward-send-backward-recv",
    "forward-backward-send-forward-backward-recv",
)
# Non-interleaved 1F1B: calls that talk to the next rank / to the previous rank only.
NEXT_RANK_TIMERS = ("forward-send", "backward-recv", "forward-send-backward-recv")
PREVIOUS_RANK_TIMERS = ("forward-recv", "backward-send", "backward-send-forward-recv")


class Stopwatch:
    """Seconds from ``perf_counter``; on CUDA every reading first waits for queued kernels."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def now(self) -> float:
        """The current time after all queued device work has finished."""
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class Interval:
    """One named timer with Megatron's ``start``/``stop`` interface, summing its intervals: wall
    clock (``total``) and the CPU time of the calling thread (``cpu_total``, ``time.thread_time``;
    on CPU the work itself, whatever else runs on the cores)."""

    def __init__(self, clock: Stopwatch) -> None:
        self.clock = clock
        self.total = 0.0
        self.cpu_total = 0.0
        self.count = 0
        self._started: Optional[float] = None
        self._cpu_started = 0.0

    def start(self, barrier: bool = False) -> None:
        """Open an interval (``barrier`` is accepted for Megatron's signature and ignored)."""
        self._started = self.clock.now()
        self._cpu_started = time.thread_time()

    def stop(self, barrier: bool = False) -> None:
        """Close the open interval and add its length."""
        if self._started is None:
            raise RuntimeError("timer stopped without being started")
        self.total += self.clock.now() - self._started
        self.cpu_total += time.thread_time() - self._cpu_started
        self.count += 1
        self._started = None

    def reset(self) -> None:
        """Forget the accumulated time."""
        self.total, self.cpu_total, self.count, self._started = 0.0, 0.0, 0, None


class ScheduleTimers:
    """Stand-in for Megatron-LM's ``Timers`` on ``TransformerConfig.timers``: Megatron's
    schedules time ``forward-compute``, ``backward-compute``, every p2p call and the gradient
    all-reduces through it, so the profiler reads the split from Megatron's own hooks."""

    def __init__(self, clock: Stopwatch) -> None:
        self.clock = clock
        self.intervals: dict[str, Interval] = {}

    def __call__(self, name: str, log_level: Optional[int] = None) -> Interval:
        if name not in self.intervals:
            self.intervals[name] = Interval(self.clock)
        return self.intervals[name]

    def reset(self) -> None:
        """Zero every timer (called at the start of each step)."""
        for interval in self.intervals.values():
            interval.reset()

    def seconds(self, *names: str) -> float:
        """Summed seconds of the named timers (0 for timers that never ran)."""
        return sum(self.intervals[name].total for name in names if name in self.intervals)

    def cpu_seconds(self, *names: str) -> float:
        """Summed CPU seconds of this thread inside the named timers."""
        return sum(self.intervals[name].cpu_total for name in names if name in self.intervals)

    def totals(self) -> dict[str, float]:
        """Seconds per timer name."""
        return {name: interval.total for name, interval in sorted(self.intervals.items())}

"""A terminal progress bar over training iterations (tqdm, optional).

The bar is shown only when it is asked for, the stream is a terminal and tqdm is installed;
otherwise every call is a no-op and log lines are printed as usual. While a bar is shown,
log lines are written above it (``tqdm.write``) so the two do not garble each other.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, TextIO

_active: Optional[ProgressBar] = None


def _tqdm_class() -> Optional[type]:
    """tqdm's bar class, or ``None`` when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class ProgressBar:
    """Iterations done out of ``total`` (from ``initial`` when resuming), with the last loss."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, stream: Optional[TextIO] = None):
        global _active
        self.stream = stream if stream is not None else sys.stdout
        self._bar: Any = None
        tqdm = _tqdm_class() if enabled and _is_terminal(self.stream) else None
        if tqdm is not None:
            close_progress_bar()
            self._bar = tqdm(
                total=total,
                initial=initial,
                file=self.stream,
                desc="training",
                unit="it",
                dynamic_ncols=True,
                leave=True,
            )
            _active = self

    @property
    def active(self) -> bool:
        """Whether a bar is being drawn."""
        return self._bar is not None

    def update(self, loss: Optional[float] = None, skipped: bool = False) -> None:
        """One more iteration; show its loss (or that it was skipped)."""
        if self._bar is None:
            return
        if skipped:
            self._bar.set_postfix_str("skipped: non-finite", refresh=False)
        elif loss is not None:
            self._bar.set_postfix_str(f"lm loss {loss:.4f}", refresh=False)
        self._bar.update(1)

    def write(self, message: str) -> None:
        """Print ``message`` above the bar."""
        if self._bar is None:
            print(message, file=self.stream, flush=True)
        else:
            self._bar.write(message, file=self.stream)

    def close(self) -> None:
        """Leave the final bar on screen and route log lines back to plain printing."""
        global _active
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if _active is self:
            _active = None


def close_progress_bar() -> None:
    """Close the bar being drawn, if any."""
    if _active is not None:
        _active.close()


def print_line(message: str) -> None:
    """Print a log line: above the active progress bar, or plainly to stdout."""
    if _active is not None:
        _active.write(message)
    else:
        print(message, flush=True)

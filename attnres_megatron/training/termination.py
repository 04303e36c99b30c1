"""SIGTERM during training: stop after the current iteration, or exit at once when that cannot happen.

Python runs a signal handler only between bytecodes of the main thread, so a rank blocked in a
collective (a peer is stuck) or in any other long C call would never see SIGTERM. The C-level
handler still writes the signal number to ``signal.set_wakeup_fd``; a watchdog thread reads it
there and, while the loop has not yet answered the request, exits the process (status 143) with
a message naming the blocking call when

* a second SIGTERM arrives, or
* the main thread stays in the same Python frame (a blocked C call: a collective, a lock wait)
  for ``grace_seconds`` after the SIGTERM.

Ordinary training makes progress through many frames per second and finishes its iteration; the
loop then answers the request (saves a checkpoint with ``--save``) and the watchdog stands down
(a second SIGTERM still exits at once).
"""

from __future__ import annotations

import faulthandler
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from types import FrameType
from typing import Optional

from attnres_megatron.training.call_sites import call_site, stack_of

GRACE_SECONDS = 20.0
"""How long the main thread may stay blocked in one frame after a SIGTERM before the process exits."""
EXIT_STATUS = 128 + signal.SIGTERM
_POLL_SECONDS = 0.25
_STOP = b"\0"


class TerminationRequest:
    """Set by SIGTERM: the loop saves and stops after the iteration (the watchdog ends a blocked process)."""

    def __init__(self, grace_seconds: float = GRACE_SECONDS) -> None:
        self.requested = False
        self.answered = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        self.watchdog: Optional[SigtermWatchdog] = None
        if threading.current_thread() is threading.main_thread():
            self.watchdog = SigtermWatchdog(self, grace_seconds)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def everywhere(self) -> bool:
        """Whether any rank received SIGTERM (one all-reduce); once true, the request is answered."""
        import torch

        flag = torch.tensor([1.0 if self.requested else 0.0])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        stop = flag.item() > 0
        self.answered = self.answered or stop
        return stop

    def restore(self) -> None:
        """Stop the watchdog and put the previous SIGTERM handler back."""
        if self.watchdog is not None:
            self.watchdog.stop()
        signal.signal(signal.SIGTERM, self.previous)


def _rank() -> str:
    """This process's rank; imports nothing (the blocked main thread may hold the import lock)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.distributed.is_initialized():
            return str(torch.distributed.get_rank())
    except Exception:  # the watchdog must never fail on its way out
        pass
    return os.environ.get("RANK", "0")


class SigtermWatchdog(threading.Thread):
    """Reads SIGTERMs from the wakeup fd and exits the process when the main thread cannot answer."""

    exit_process = os._exit
    """How the process ends (immediately: no cleanup can wait on the blocked main thread)."""

    def __init__(self, request: TerminationRequest, grace_seconds: float) -> None:
        super().__init__(name="attnres-sigterm-watchdog", daemon=True)
        self.request, self.grace_seconds = request, grace_seconds
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.main_ident = threading.main_thread().ident
        self.previous_fd = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        self.stopping = False
        self.start()

    def stop(self) -> None:
        """Give the wakeup fd back and end the thread."""
        signal.set_wakeup_fd(self.previous_fd)
        self.stopping = True
        try:
            self.writer.send(_STOP)
        except OSError:
            pass
        self.join(timeout=2)
        self.reader.close()
        self.writer.close()

    def _received(self, timeout: float) -> int:
        """SIGTERMs delivered within ``timeout`` seconds (other signals' bytes are ignored)."""
        ready, _, _ = select.select([self.reader], [], [], timeout)
        if not ready:
            return 0
        try:
            data = self.reader.recv(256)
        except (BlockingIOError, OSError):
            return 0
        return data.count(bytes([signal.SIGTERM]))

    def _main_frame(self) -> Optional[FrameType]:
        """The main thread's innermost Python frame."""
        return sys._current_frames().get(self.main_ident)

    def run(self) -> None:
        """Wait for SIGTERM; then watch the main thread until the loop answers."""
        signals, since, frame, blocked_since = 0, 0.0, None, 0.0
        while not self.stopping:
            received = self._received(_POLL_SECONDS)
            if self.stopping:
                return
            now = time.monotonic()
            if received and not signals:
                since, blocked_since = now, now
                frame = self._main_frame()
            signals += received
            if signals > 1:
                return self._exit(f"a second SIGTERM arrived {now - since:.0f} s after the first")
            if not signals or self.request.answered:
                continue
            self.request.requested = True
            current = self._main_frame()
            if current is not frame:
                frame, blocked_since = current, now
            elif now - blocked_since >= self.grace_seconds:
                return self._exit(f"blocked for {now - blocked_since:.0f} s since the SIGTERM")

    def _exit(self, why: str) -> None:
        """Print why and where the main thread is, then end the process at once."""
        stack = stack_of(self._main_frame())
        site = call_site(stack)
        where = f"; it is in {site.describe()}" if site else ""
        message = (
            f"error: rank {_rank()}: exiting on SIGTERM (status {EXIT_STATUS}) without finishing the "
            f"iteration or its checkpoint: {why}{where}."
        )
        try:
            sys.stdout.flush()
            print(message, file=sys.stderr, flush=True)
            if stack:
                print("main thread (most recent call last):", file=sys.stderr)
                traceback.print_stack(stack[0][0], limit=12, file=sys.stderr)
            sys.stderr.flush()
        except Exception:  # a closed stream must not keep the process alive
            faulthandler.dump_traceback(all_threads=True)
        self.exit_process(EXIT_STATUS)  # returns only where a test replaced it

"""A ``torch.distributed`` operation that timed out or lost its peers, as one clear error line.

gloo raises a ``RuntimeError`` in the blocked collective once ``--distributed-timeout-minutes``
has passed (``Timed out waiting 6000ms for recv operation to complete``), or as soon as a peer's
connection closes. :func:`exit_on_collective_failure` turns either into ``SystemExit`` with the
rank, the operation and its caller, the group and the flag to change, so the process exits
non-zero and the launcher (torchrun, mpirun, srun) tears the job down. NCCL's own watchdog
aborts the process after the same timeout."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any, Optional

from attnres_megatron.training.call_sites import call_site, traceback_stack

_TIMEOUT = ("timed out", "timeout")
_LOST_PEER = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused")
_BACKEND = ("gloo", "nccl", "c10d")
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*")


def _kind(error: BaseException) -> Optional[str]:
    """``timeout``, ``lost-peer`` or None for any other error."""
    text = str(error).lower()
    if any(marker in text for marker in _LOST_PEER):
        return "lost-peer"
    if any(marker in text for marker in _TIMEOUT):
        return "timeout"
    return None


def this_rank() -> str:
    """This process's global rank (from the launcher's ``RANK`` before the process group starts)."""
    import torch

    if torch.distributed.is_initialized():
        return str(torch.distributed.get_rank())
    return os.environ.get("RANK", "?")


def describe_group(group: Any) -> tuple[str, list[int]]:
    """``ranks [0, 1] (DATA_PARALLEL_GROUP)`` and the ranks of ``group`` (None: the default group)."""
    import torch

    try:
        group = group if group is not None else torch.distributed.group.WORLD
        ranks = sorted(torch.distributed.get_process_group_ranks(group))
    except Exception:  # a destroyed or foreign group: name nothing rather than fail the message
        return "its group", []
    name = getattr(group, "group_desc", None) or ""
    return f"ranks {ranks}" + (f" ({name})" if name and name != "undefined" else ""), ranks


def backend_detail(error: BaseException) -> str:
    """The backend's own first message line, without its source-file prefix (shortened)."""
    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    line = _SOURCE_PREFIX.sub("", line)
    return line if len(line) <= 160 else line[:157] + "..."


def collective_failure_message(error: BaseException, timeout_minutes: float) -> Optional[str]:
    """The one-line error for a timed-out or broken ``torch.distributed`` operation, else None."""
    kind = _kind(error)
    site = call_site(traceback_stack(error))
    text = str(error).lower()
    if kind is None or site is None or (site.operation is None and not any(b in text for b in _BACKEND)):
        return None
    rank = this_rank()
    group, ranks = describe_group(site.group)
    others = [peer for peer in ranks if str(peer) != rank]
    peers = f"rank {others[0]}" if len(others) == 1 else (f"ranks {others}" if others else "a peer rank")
    if kind == "timeout":
        seconds = 60 * timeout_minutes
        what = (
            f"timed out after {seconds:g} s (--distributed-timeout-minutes {timeout_minutes:g}): {peers} "
            "did not take part (stuck, stopped or far slower; its log says why); raise "
            "--distributed-timeout-minutes if such waits are expected"
        )
    else:
        what = f"lost its connection: {peers} crashed or exited (its log says why)"
    return f"error: rank {rank}: {site.describe()} over {group} {what} [{backend_detail(error)}]"


@contextlib.contextmanager
def exit_on_collective_failure(timeout_minutes: float) -> Iterator[None]:
    """Turn a timed-out or broken collective inside the block into ``SystemExit`` with one line."""
    try:
        yield
    except RuntimeError as error:
        message = collective_failure_message(error, timeout_minutes)
        if message is None:
            raise
        raise SystemExit(message) from None

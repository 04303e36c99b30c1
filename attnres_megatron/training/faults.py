"""Clear errors for faults during a run: a full disk while saving a checkpoint, and a run that
keeps producing non-finite steps under ``--skip-nonfinite-steps``."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from typing import Optional

from torch.distributed.checkpoint.api import CheckpointException

from attnres_megatron.training.checkpointing import CheckpointError, latest_iteration

# What a full device looks like after the layers in between (torch.distributed.checkpoint's
# workers re-raise it as text; torch.save's zip writer reports the short write as a position).
DISK_FULL_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
DISK_FULL_TEXT = {
    "No space left on device": "no space left on device",
    "Disk quota exceeded": "disk quota exceeded",
}
SHORT_WRITE = "unexpected pos"  # torch.save's zip writer after a failed fwrite
NEARLY_FULL_BYTES = 1 << 20


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error``, its causes and contexts, and the per-rank failures of a ``CheckpointException``."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__]
        for failure in (getattr(current, "failures", None) or {}).values():
            pending.append(failure[0] if isinstance(failure, tuple) else failure)


def free_bytes(path: str) -> int:
    """Free bytes on the device holding ``path`` (or its nearest existing ancestor)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def disk_full_reason(error: BaseException, directory: str) -> Optional[str]:
    """Why ``error``, raised while writing to ``directory``, means the device is full
    (``no space left on device``, ``disk quota exceeded``), else None."""
    short_write = False
    for cause in _causes(error):
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            return DISK_FULL_ERRNOS[cause.errno]
        text = str(cause) if not hasattr(cause, "failures") else ""
        for marker, reason in DISK_FULL_TEXT.items():
            if marker in text:
                return reason
        short_write = short_write or SHORT_WRITE in text
    if short_write:
        full = free_bytes(directory) < NEARLY_FULL_BYTES
        return "no space left on device" if full else "a short write (was the device full?)"
    return None


def disk_full_message(reason: str, iteration: int, save_dir: str, previous: Optional[int]) -> str:
    """The error of a checkpoint save that ran out of space."""
    kept = (
        f"the previous checkpoint {previous} is kept (resume with --load {save_dir})"
        if previous is not None
        else "no earlier checkpoint was saved"
    )
    return (
        f"error: {reason} while saving checkpoint {iteration} to {save_dir}; {kept}. Free space there "
        "or point --save at a device with room, and make sure a checkpoint fits."
    )


def saved_iteration(save_dir: str) -> Optional[int]:
    """The latest complete checkpoint's iteration under ``save_dir`` (None when there is none)."""
    try:
        return latest_iteration(save_dir)
    except (CheckpointError, OSError):
        return None


@contextlib.contextmanager
def exit_when_disk_full(iteration: int, save_dir: str, previous: Optional[int]) -> Iterator[None]:
    """Turn a checkpoint save that runs out of space into ``SystemExit`` with :func:`disk_full_message`
    (a non-zero exit); any other failure propagates unchanged."""
    try:
        yield
    except (Exception, CheckpointException) as error:
        reason = disk_full_reason(error, save_dir)
        if reason is None:
            raise
        raise SystemExit(disk_full_message(reason, iteration, save_dir, previous)) from None


def check_skip_limit(skipped: list[int], limit: int) -> None:
    """Stop with :func:`too_many_skipped_message` once more than ``limit`` iterations were skipped."""
    if len(skipped) > limit:
        raise SystemExit(too_many_skipped_message(skipped, limit))


def too_many_skipped_message(skipped: list[int], limit: int) -> str:
    """The error once more than ``--max-skipped-nonfinite-steps`` iterations were skipped."""
    shown = ", ".join(map(str, skipped[-5:]))
    return (
        f"error: {len(skipped)} iterations skipped for non-finite loss or gradients (the last: {shown}), "
        f"more than --max-skipped-nonfinite-steps {limit}: the run is diverging. Lower --lr, raise "
        "--lr-warmup-iters or clip gradients (--clip-grad 1.0), resume from an earlier checkpoint, or "
        "raise --max-skipped-nonfinite-steps."
    )

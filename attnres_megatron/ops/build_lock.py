"""An exclusive lock on a kernel build directory that a killed holder cannot leave behind.

``torch.utils.cpp_extension`` guards a build with a ``lock`` file it creates and deletes (a
``FileBaton``); a build killed in between leaves the file, and every later build waits on it
forever. :func:`build_lock` instead holds an ``flock`` on ``build.lock``, which the kernel
releases when the holder dies, records the holder (pid, host, start) in it for messages, waits a
bounded time, and removes a ``lock`` file left by a dead build once it holds the directory."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

LOCK_NAME = "build.lock"
TORCH_BATON = "lock"
"""``torch.utils.cpp_extension``'s ``FileBaton`` in the build directory."""


class BuildLockTimeout(RuntimeError):
    """Another live process held the build directory for longer than the timeout."""


def say(message: str) -> None:
    """One line on stderr, prefixed with the package name."""
    print(f"attnres-megatron: {message}", file=sys.stderr, flush=True)


def _owner(fd: int) -> dict:
    """What the last holder recorded (pid, host, since); empty when unreadable."""
    try:
        data = os.pread(fd, 4096, 0)
        owner = json.loads(data.decode()) if data else {}
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(owner: dict, age: bool = True) -> str:
    """``pid 123 on host h (for 40 s)``, or ``an unknown process``."""
    if "pid" not in owner:
        return "an unknown process"
    since = owner.get("since")
    age = f" (for {time.time() - since:.0f} s)" if age and isinstance(since, (int, float)) else ""
    return f"pid {owner['pid']} on host {owner.get('host', '?')}{age}"


def _pid_alive(owner: dict) -> Optional[bool]:
    """Whether the recorded holder still runs (None: unknown, or on another host)."""
    if not isinstance(owner.get("pid"), int) or owner.get("host") != socket.gethostname():
        return None
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _record(fd: int) -> None:
    """Write this process as the holder."""
    os.ftruncate(fd, 0)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    os.pwrite(fd, json.dumps(record).encode(), 0)


def _acquire(fd: int, path: Path, timeout: float, poll: float) -> None:
    """Take the flock on ``fd``, waiting at most ``timeout`` seconds for a live holder."""
    deadline, announced = time.monotonic() + timeout, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise RuntimeError(
                    f"cannot lock the kernel build directory {path.parent} ({error.strerror}); set "
                    "TORCH_EXTENSIONS_DIR to a directory on a local file system."
                ) from None
        owner = _owner(fd)
        if time.monotonic() >= deadline:
            raise BuildLockTimeout(
                f"timed out after {timeout:.0f} s waiting for the kernel build in {path.parent}, held by "
                f"{_describe(owner)}; if that process is stuck, end it (or delete {path.parent}) and rerun, "
                "or use --attn-res-impl torch."
            )
        if not announced:
            holder = _describe(owner)
            say(f"waiting (at most {timeout:.0f} s) for the kernel build in {path.parent} by {holder}")
            announced = True
        time.sleep(poll)


def _clear_stale_baton(directory: Path, previous: dict) -> None:
    """Remove, saying so, torch's ``lock`` file: with the directory held, only a killed build left it."""
    baton = directory / TORCH_BATON
    try:
        age = time.time() - baton.stat().st_mtime
    except FileNotFoundError:
        return
    alive = _pid_alive(previous)
    holder = _describe(previous, age=False) if previous else "an earlier build"  # no record: torch's own
    state = {False: ", no longer running", True: ", still running but no longer building", None: ""}[alive]
    say(
        f"removing a stale kernel build lock in {directory}: {baton.name} is {age:.0f} s old and was left "
        f"by {holder}{state} (killed during the build); rebuilding"
    )
    baton.unlink(missing_ok=True)


@contextlib.contextmanager
def build_lock(directory: Path, timeout: float, poll: float = 0.2) -> Iterator[None]:
    """Hold ``directory`` for a build (at most ``timeout`` s of waiting), stale locks cleared."""
    path = directory / LOCK_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise RuntimeError(
            f"cannot use the kernel build directory {directory} ({error.strerror}); set TORCH_EXTENSIONS_DIR "
            "to a writable directory, or use --attn-res-impl torch."
        ) from None
    try:
        _acquire(fd, path, timeout, poll)
        previous = _owner(fd)
        _record(fd)
        _clear_stale_baton(directory, previous)
        yield
        os.ftruncate(fd, 0)  # released normally: a record left in the file means its holder died
    finally:
        os.close(fd)  # releases the flock

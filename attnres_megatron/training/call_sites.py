"""Where a rank is in its code: the ``torch.distributed`` operation it is in and who called it.

Used by the one-line messages of a failed collective (``collective_errors``) and of a SIGTERM
that could not be answered (``termination``)."""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Optional

Stack = Sequence[tuple[FrameType, int]]
"""Frames with their current line, innermost first."""

_PACKAGES = ("attnres_megatron", "megatron", "torch")
_WRAPPERS = {"wrapper", "inner", "_fn", "decorated"}


@dataclass(frozen=True)
class CallSite:
    """A ``torch.distributed`` operation (if any), the code that called it and its process group."""

    operation: Optional[str]
    caller: str
    origin: Optional[str]
    group: Any = None

    def describe(self) -> str:
        """E.g. ``torch.distributed.all_reduce in grads_are_finite (attnres_megatron/training/...:175)``."""
        text = f"torch.distributed.{self.operation} in {self.caller}" if self.operation else self.caller
        return f"{text}, called from {self.origin}" if self.origin else text


def short_path(path: str) -> str:
    """``path`` from its package directory on (``attnres_megatron/...``, ``megatron/...``, ``torch/...``)."""
    parts = path.split(os.sep)
    for package in _PACKAGES:
        if package in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(package) :])
    return os.path.basename(path)


def _package(frame: FrameType) -> Optional[str]:
    """The package of ``frame``'s file among ``attnres_megatron``, ``megatron`` and ``torch``."""
    parts = frame.f_code.co_filename.split(os.sep)
    for package in _PACKAGES:
        if package in parts:
            return package
    return None


def _in_torch_distributed(frame: FrameType) -> bool:
    """Whether ``frame`` runs code of ``torch.distributed``."""
    return f"{os.sep}torch{os.sep}distributed{os.sep}" in frame.f_code.co_filename


def _where(frame: FrameType, line: int) -> str:
    """``function (package/path.py:line)``."""
    return f"{frame.f_code.co_name} ({short_path(frame.f_code.co_filename)}:{line})"


def stack_of(frame: Optional[FrameType]) -> list[tuple[FrameType, int]]:
    """``frame`` and its callers, innermost first."""
    stack = []
    while frame is not None:
        stack.append((frame, frame.f_lineno))
        frame = frame.f_back
    return stack


def traceback_stack(error: BaseException) -> list[tuple[FrameType, int]]:
    """The frames ``error`` passed through, innermost first."""
    return list(traceback.walk_tb(error.__traceback__))[::-1]


def call_site(stack: Stack) -> Optional[CallSite]:
    """The innermost ``torch.distributed`` entry point in ``stack``, its caller in Megatron or here
    (the first frame outside torch otherwise) and, for a Megatron caller, our frame above it."""
    if not stack:
        return None
    first = next((i for i, (frame, _) in enumerate(stack) if _in_torch_distributed(frame)), None)
    operation, group, start = None, None, 0
    if first is not None:
        end = first
        while end + 1 < len(stack) and _in_torch_distributed(stack[end + 1][0]):
            end += 1
        api = [frame for frame, _ in stack[first : end + 1] if frame.f_code.co_name not in _WRAPPERS]
        entry = api[-1] if api else stack[end][0]
        operation = entry.f_code.co_name
        group = entry.f_locals.get("group", entry.f_locals.get("pg"))
        start = end + 1
    above = list(enumerate(stack))[start:]
    ours = [(i, f, n) for i, (f, n) in above if _package(f) in ("attnres_megatron", "megatron")]
    outside = ours or [(i, f, n) for i, (f, n) in above if _package(f) != "torch"]
    if not outside:
        frame, line = stack[min(start, len(stack) - 1)]
        return CallSite(operation, _where(frame, line), None, group)
    index, frame, line = outside[0]
    origin = None
    if _package(frame) == "megatron":
        mine = next(((f, n) for i, f, n in outside if i > index and _package(f) == "attnres_megatron"), None)
        origin = _where(*mine) if mine else None
    return CallSite(operation, _where(frame, line), origin, group)

"""Content-addressed, verified cache of a compiled kernel library.

The cache key hashes everything the machine code depends on (sources, flags, torch and Python,
the compiler named by ``CXX`` and this CPU's model and instruction-set flags, since the kernels
are built with ``-march=native``), so different sources or CPUs never share a library. After a
successful build the library's sha256 is written beside it (``<library>.sha256``); a library
whose hash does not match is never loaded."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Optional

DIGEST_SUFFIX = ".sha256"
CPU_FIELDS = (
    "vendor_id",
    "cpu family",
    "model",
    "model name",
    "flags",
    "CPU implementer",
    "CPU architecture",
    "CPU variant",
    "CPU part",
    "Features",
)
"""``/proc/cpuinfo`` fields of the first processor that decide what ``-march=native`` emits (x86, Arm)."""


@lru_cache(maxsize=1)
def cpu_signature() -> str:
    """This CPU's model and instruction-set flags (``/proc/cpuinfo``; the platform's names elsewhere)."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        first = ""
    fields = [
        " ".join(line.split()) for line in first.splitlines() if line.split(":", 1)[0].strip() in CPU_FIELDS
    ]
    return "\n".join(fields) or f"{platform.machine()} {platform.processor()} {platform.platform()}"


def cache_key(
    sources: Sequence[str], functions: Sequence[str], cflags: Sequence[str], ldflags: Sequence[str]
) -> str:
    """sha256 over the sources, bound functions, flags, torch, Python, ``CXX`` and the CPU."""
    import torch

    parts = {
        "sources": [hashlib.sha256(text.encode()).hexdigest() for text in sources],
        "functions": list(functions),
        "cflags": list(cflags),
        "ldflags": list(ldflags),
        "torch": torch.__version__,
        "python": sys.implementation.cache_tag,
        "cxx": os.environ.get("CXX", "c++"),
        "cpu": cpu_signature(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def digest_path(library: Path) -> Path:
    """Where ``library``'s recorded hash lives."""
    return library.with_name(library.name + DIGEST_SUFFIX)


def record_digest(library: Path) -> None:
    """Write ``library``'s sha256 beside it (atomically)."""
    target = digest_path(library)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    partial.write_text(file_digest(library) + "\n")
    os.replace(partial, target)


def unverified_reason(library: Path) -> Optional[str]:
    """None when ``library`` matches the hash recorded at its build, else why it must not be loaded."""
    if not library.is_file():
        return "not built yet"
    try:
        recorded = digest_path(library).read_text().strip()
    except OSError:
        return "no hash was recorded at build time (a foreign or unfinished library)"
    if recorded != file_digest(library):
        return "its sha256 differs from the one recorded at build time (a foreign or corrupt library)"
    return None


def clear_directory(directory: Path, keep: Iterable[str]) -> None:
    """Delete everything in ``directory`` except the names in ``keep``."""
    kept = set(keep)
    for entry in directory.iterdir():
        if entry.name in kept:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)

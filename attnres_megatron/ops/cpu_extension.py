"""Build (on first use) and load the C++ CPU kernels of ``attnres_megatron/ops/csrc``.

One extension holds the fused aggregation (``--attn-res-impl fused`` on CPU) and the two-phase
kernels (``--attn-res-impl two-phase`` on CPU). It is compiled with
``torch.utils.cpp_extension.load_inline`` (needs a C++ compiler and ninja) into
``$TORCH_EXTENSIONS_DIR/attnres_cpu_kernels_<key>`` (torch's default root without the variable),
where the key hashes the sources, flags, torch, Python and this CPU (``kernel_cache``): a changed
source or another CPU gets its own directory. The build holds that directory's lock
(``build_lock``: bounded wait, a killed build's lock is cleared with a message) and records the
library's sha256; a library whose hash does not match the record is rebuilt, never loaded.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

from attnres_megatron.ops.build_lock import LOCK_NAME, build_lock, say
from attnres_megatron.ops.kernel_cache import cache_key, clear_directory, record_digest, unverified_reason

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("rows.h", "aggregate.cpp", "two_phase.cpp")
"""Compiled as one translation unit; the header comes first so that its text is part of the
build hash (a changed header rebuilds the extension)."""
FUNCTIONS = ("fused_forward", "fused_backward", "phase_one", "phase_two_forward", "phase_one_backward")
NAME = "attnres_cpu_kernels"
CFLAGS = ("-O3", "-fopenmp", "-march=native")
LDFLAGS = ("-fopenmp",)
LIBRARY_SUFFIX = ".so"
BUILD_LOCK_TIMEOUT_S = 600.0
"""Longest wait for another process's build of the same kernels (a build takes ~30 s on 2 cores)."""


@functools.lru_cache(maxsize=1)
def cpu_extension() -> Any:
    """The compiled kernels (built on the first call, then loaded from the cache)."""
    return load_cpu_extension()


def default_build_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR``, else torch's per-user extension cache."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def read_sources(overrides: Optional[Path] = None) -> list[str]:
    """The texts compiled, in order; a file of :data:`SOURCES` present in ``overrides`` (a
    directory: a kernel variant under test, e.g. ``tools/bench_kernel_variants.py``) replaces
    the package's."""
    variant = Path(overrides) if overrides else None
    paths = [variant / name if variant and (variant / name).is_file() else CSRC / name for name in SOURCES]
    return [path.read_text() for path in paths]


def library_path(build_root: Optional[Path] = None, overrides: Optional[Path] = None) -> Path:
    """Where the library for these sources, flags and this CPU lives (``<root>/<name>/<name>.so``)."""
    name = f"{NAME}_{cache_key(read_sources(overrides), FUNCTIONS, CFLAGS, LDFLAGS)[:16]}"
    return Path(build_root or default_build_root()) / name / f"{name}{LIBRARY_SUFFIX}"


def load_cpu_extension(
    build_root: Optional[Path] = None,
    lock_timeout: float = BUILD_LOCK_TIMEOUT_S,
    overrides: Optional[Path] = None,
) -> Any:
    """The verified kernels from ``build_root``, (re)built under the directory's lock when
    unverified; ``overrides``: see :func:`read_sources` (each variant is its own library and module)."""
    library = library_path(build_root, overrides)
    directory, name = library.parent, library.parent.name
    with build_lock(directory, lock_timeout):
        reason = unverified_reason(library)
        if reason is None:
            try:
                return import_library(name, library)
            except ImportError as error:
                reason = f"it does not load ({error})"
        if library.exists():
            say(f"not loading {library}: {reason}; rebuilding it")
        clear_directory(directory, keep={LOCK_NAME})
        module = compile_library(name, read_sources(overrides), directory)
        record_digest(library)
        return module


def import_library(name: str, library: Path) -> Any:
    """Import the extension module in ``library``."""
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"{library} is not an extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_library(name: str, sources: list[str], directory: Path) -> Any:
    """Compile the kernels into ``directory`` with ``load_inline`` and import them."""
    from torch.utils import cpp_extension

    # torch skips a build it believes done in this process; this directory was just emptied.
    versioner = getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None)
    if versioner is not None:
        versioner.entries.pop(name, None)
    try:
        return cpp_extension.load_inline(
            name=name,
            cpp_sources=sources,
            functions=list(FUNCTIONS),
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            extra_include_paths=[str(CSRC)],
            build_directory=str(directory),
            verbose=False,
        )
    except Exception as exc:  # compiler or ninja missing, build error
        raise RuntimeError(
            "the fused AttnRes CPU kernels (--attn-res-impl fused or two-phase on CPU) are built on first "
            f"use and that failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "install a C++ compiler and ninja (pip install ninja), or use --attn-res-impl torch."
        ) from exc

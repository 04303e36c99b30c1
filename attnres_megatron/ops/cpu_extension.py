"""Build (on first use) and load the C++ CPU kernels of ``attnres_megatron/ops/csrc``.

One extension holds the fused aggregation (``--attn-res-impl fused`` on CPU) and the two-phase
kernels (``--attn-res-impl two-phase`` on CPU). It is compiled with
``torch.utils.cpp_extension.load_inline`` (needs a C++ compiler and ninja) and cached in
``TORCH_EXTENSIONS_DIR``; a changed source rebuilds it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("rows.h", "aggregate.cpp", "two_phase.cpp")
"""Compiled as one translation unit; the header comes first so that its text is part of the
build hash (a changed header rebuilds the extension)."""
FUNCTIONS = ("fused_forward", "fused_backward", "phase_one", "phase_two_forward", "phase_one_backward")


@functools.lru_cache(maxsize=1)
def cpu_extension() -> Any:
    """The compiled kernels (built on the first call, then loaded from the cache)."""
    from torch.utils.cpp_extension import load_inline

    try:
        return load_inline(
            name="attnres_cpu_kernels",
            cpp_sources=[(CSRC / name).read_text() for name in SOURCES],
            functions=list(FUNCTIONS),
            extra_cflags=["-O3", "-fopenmp", "-march=native"],
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(CSRC)],
            verbose=False,
        )
    except Exception as exc:  # compiler or ninja missing, build error
        raise RuntimeError(
            "the fused AttnRes CPU kernels (--attn-res-impl fused or two-phase on CPU) are built on first "
            f"use and that failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "install a C++ compiler and ninja (pip install ninja), or use --attn-res-impl torch."
        ) from exc

"""Quiet start: hide known upstream warnings and name the missing optional packages in one line.

The command-line entry points (``attnres-pretrain``, ``attnres-profile``, ``attnres-generate``
and the Megatron-LM driver) filter the warnings listed here -- fallbacks Megatron-Core announces
when Transformer Engine or Apex is absent, a deprecation raised by its own default, CUDA advice on
CPU runs -- before Megatron-Core is imported, and print one line naming the optional packages that are
missing instead. ``--verbose-warnings`` turns the filters off. Only the standard library is
imported here, so the filters can be installed before anything else.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

VERBOSE_FLAG = "--verbose-warnings"
VERBOSE_HELP = (
    "Show every upstream warning (Transformer Engine / Apex fallbacks, deprecations, CUDA advice "
    "on CPU), which are hidden by default."
)

# How the entry points are started: console scripts, and modules run with -m (or as files).
ENTRY_SCRIPTS = ("attnres-pretrain", "attnres-profile", "attnres-generate")
ENTRY_MODULES = (
    "attnres_megatron.training.pretrain",
    "attnres_megatron.profiling.cli",
    "attnres_megatron.inference.cli",
    "attnres_megatron.megatron_lm.pretrain_gpt_attnres",
)

_MEGATRON = r"megatron(_fsdp)?\."  # Megatron-Core / Megatron-LM modules (and standalone Megatron-FSDP)


@dataclass(frozen=True)
class KnownWarning:
    """An upstream warning to hide: its category, a regex of its message's start, a regex of its module."""

    category: type[Warning]
    message: str
    module: str


UPSTREAM_WARNINGS = (
    KnownWarning(UserWarning, r"Transformer Engine and Apex are not installed\. Falling back to ", _MEGATRON),
    KnownWarning(UserWarning, r"Apex is not installed\. Falling back to Torch Norm", _MEGATRON),
    KnownWarning(
        UserWarning,
        r"full scope is deprecated\. Use empty cuda_graph_scope",
        r"megatron\.core\.transformer\.transformer_config$",
    ),
)

# Advice that only concerns CUDA devices, hidden once the run is known to be on CPU.
CPU_WARNINGS = (
    KnownWarning(
        UserWarning,
        r"When using (async grad allreduce|sequence parallelism) it is recommended to set the "
        r"environment variable CUDA_DEVICE_MAX_CONNECTIONS",
        r"megatron\.core\.tensor_parallel\.layers$",
    ),
    KnownWarning(UserWarning, r"CUDA initialization: Found no NVIDIA driver", r"torch\.cuda"),
)


@dataclass(frozen=True)
class OptionalPackage:
    """A package the plugin uses when present: import name, name shown, what it adds."""

    module: str
    name: str
    adds: str
    executable: Optional[str] = None  # also counts as installed when this program is on PATH


# The one list of optional packages (setup.py extras, plus Apex) and what each adds.
OPTIONAL_PACKAGES = (
    OptionalPackage("transformer_engine", "transformer_engine", "FP8, fused TE layers, context parallelism"),
    OptionalPackage("apex", "apex", "fused norms and optimizers"),
    OptionalPackage("mpi4py", "mpi4py", "mpirun launch without MASTER_ADDR"),
    OptionalPackage("tensorboard", "tensorboard", "--tensorboard-dir"),
    OptionalPackage("matplotlib", "matplotlib", "depth heatmaps, attnres-profile plots"),
    OptionalPackage("triton", "triton", "--attn-res-impl triton"),
    OptionalPackage("ninja", "ninja", "fused C++ CPU kernels", executable="ninja"),
    OptionalPackage("fla", "flash-linear-attention", "Kimi Linear KDA kernels on CUDA"),
    OptionalPackage("tqdm", "tqdm", "progress bar"),
)


def verbose_requested(argv: Optional[Sequence[str]] = None) -> bool:
    """Whether ``--verbose-warnings`` (or an abbreviation argparse would accept) is in ``argv``."""
    args = sys.argv[1:] if argv is None else argv
    return any(len(arg) > len("--v") and VERBOSE_FLAG.startswith(arg) for arg in args)


def add_verbose_warnings_arg(
    parser: Union[argparse.ArgumentParser, argparse._ArgumentGroup],
) -> None:
    """Register ``--verbose-warnings`` (the filters read ``sys.argv`` before parsing; this documents it)."""
    parser.add_argument(VERBOSE_FLAG, action="store_true", help=VERBOSE_HELP)


def install_filters(known: Sequence[KnownWarning] = UPSTREAM_WARNINGS) -> None:
    """Ignore each of these warnings in this process (idempotent)."""
    for each in known:
        warnings.filterwarnings("ignore", each.message, each.category, each.module)


def quiet_start(argv: Optional[Sequence[str]] = None) -> bool:
    """Install the upstream filters unless ``--verbose-warnings`` is given; whether they were."""
    if verbose_requested(argv):
        return False
    install_filters()
    return True


def hide_cpu_advice(device: str, verbose: bool = False) -> None:
    """On a CPU run, also hide the advice that only concerns CUDA devices."""
    if device == "cpu" and not verbose:
        install_filters(CPU_WARNINGS)


def started_as_entry_point(
    argv: Optional[Sequence[str]] = None, orig_argv: Optional[Sequence[str]] = None
) -> bool:
    """Whether this process runs one of the entry points (console script, ``-m`` or file path).

    Processes that ``multiprocessing`` spawns (e.g. for checkpoint saving) get the parent's
    ``sys.argv``, so they count too.
    """
    argv = sys.argv if argv is None else argv
    orig_argv = getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
    program = argv[0] if argv else ""
    name = os.path.basename(program).removesuffix(".exe").removesuffix("-script.py")
    files = tuple(os.path.join(*module.split(".")) + ".py" for module in ENTRY_MODULES)
    if name in ENTRY_SCRIPTS or os.path.normpath(program).endswith(files):
        return True
    return any(flag == "-m" and module in ENTRY_MODULES for flag, module in zip(orig_argv, orig_argv[1:]))


def quiet_entry_point() -> bool:
    """Install the filters when this process runs an entry point (called on package import)."""
    return started_as_entry_point() and quiet_start()


def package_installed(package: OptionalPackage) -> bool:
    """Whether ``package`` can be imported (found, not imported) or its program is on PATH."""
    try:
        found = importlib.util.find_spec(package.module) is not None
    except (ImportError, ValueError):
        found = False
    return found or bool(package.executable and shutil.which(package.executable))


def missing_optional_packages(
    packages: Sequence[OptionalPackage] = OPTIONAL_PACKAGES,
) -> list[OptionalPackage]:
    """The optional packages that are not installed."""
    return [package for package in packages if not package_installed(package)]


def optional_packages_line(packages: Sequence[OptionalPackage] = OPTIONAL_PACKAGES) -> Optional[str]:
    """``optional packages not installed: name (what it adds), ...``; ``None`` when all are present."""
    missing = missing_optional_packages(packages)
    if not missing:
        return None
    return "optional packages not installed: " + ", ".join(f"{p.name} ({p.adds})" for p in missing)

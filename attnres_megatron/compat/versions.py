"""The megatron-core releases this plugin is tested with, and the refusal of any other.

``setup.py`` reads :data:`MEGATRON_CORE_REQUIREMENT` from this file without importing the
package, so install-time and import-time checks cannot disagree. Nothing here may import
anything outside the standard library and ``packaging`` (a megatron-core dependency).
"""

from __future__ import annotations

MEGATRON_CORE_SPECIFIER = ">=0.16.0,<0.17"
"""The tested range: every megatron-core 0.16 release (0.16.0 and 0.16.1)."""

MEGATRON_CORE_REQUIREMENT = f"megatron-core{MEGATRON_CORE_SPECIFIER}"


def check_megatron_core_version(installed: str | None = None) -> str:
    """Return megatron-core's version; ImportError naming the fix when absent or out of range."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.specifiers import SpecifierSet

    fix = f"pip install '{MEGATRON_CORE_REQUIREMENT}'"
    if installed is None:
        try:
            installed = version("megatron-core")
        except PackageNotFoundError:
            missing = "attnres-megatron needs megatron-core; it is not installed."
            raise ImportError(f"{missing} Run: {fix}") from None
    if installed not in SpecifierSet(MEGATRON_CORE_SPECIFIER, prereleases=True):
        raise ImportError(
            f"attnres-megatron is tested with {MEGATRON_CORE_REQUIREMENT}; found megatron-core {installed}. "
            f"Run: {fix} (or install attnres-megatron in its own virtual environment)."
        )
    return installed


MEGATRON_LM_MAJOR_MINOR = (0, 16)
"""The Megatron-LM release line whose training loop the plugin runs in (core_r0.16)."""


def check_megatron_lm_version() -> None:
    """ImportError naming the fix unless the importable Megatron-LM checkout is core_r0.16.

    Reads the checkout's own ``megatron/core/package_info.py`` (next to ``megatron/training``):
    the ``megatron.core`` that is imported may be the installed wheel instead.
    """
    import importlib.util
    import re
    from pathlib import Path

    spec = importlib.util.find_spec("megatron.training")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("Megatron-LM's megatron.training is not importable; set MEGATRON_LM_DIR.")
    info = Path(list(spec.submodule_search_locations)[0]).parent / "core" / "package_info.py"
    text = info.read_text() if info.is_file() else ""
    found = tuple(int(m) for m in re.findall(r"^(?:MAJOR|MINOR)\s*=\s*(\d+)", text, re.M)[:2])
    if found != MEGATRON_LM_MAJOR_MINOR:
        raise ImportError(
            f"Megatron-LM {'.'.join(map(str, found)) or 'of unknown version'} found ({info}); the "
            "AttnRes providers support core_r0.16. Check out core_v0.16.1 (or core_r0.16.0)."
        )

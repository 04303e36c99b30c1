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

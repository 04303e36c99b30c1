"""The tested megatron-core range, the refusal of others at import, and the CPU lock."""

from __future__ import annotations

import importlib
from importlib.metadata import requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import attnres_megatron
from attnres_megatron.compat import versions
from attnres_megatron.compat.versions import MEGATRON_CORE_REQUIREMENT, check_megatron_core_version

LOCK = Path(__file__).resolve().parents[1] / "constraints" / "cpu.txt"


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{line!r} in {LOCK.name} is not an exact pin"
            pins[requirement.name.lower().replace("_", "-")] = spec.version
    return pins


@pytest.mark.parametrize("installed", ["0.16.0", "0.16.1", "0.16.2rc0"])
def test_every_0_16_release_is_accepted(installed):
    assert check_megatron_core_version(installed) == installed


@pytest.mark.parametrize("installed", ["0.15.3", "0.17.0", "1.0.0"])
def test_other_releases_are_refused_with_the_fix(installed):
    fix = r"Run: pip install 'megatron-core>="
    with pytest.raises(ImportError, match=rf"found megatron-core {installed}\. {fix}"):
        check_megatron_core_version(installed)


def test_importing_the_package_refuses_an_untested_megatron_core(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.15.0")
    refusal = "tested with megatron-core>=0.16.0,<0.17; found megatron-core 0.15.0"
    with pytest.raises(ImportError, match=refusal):
        importlib.reload(attnres_megatron)
    monkeypatch.undo()
    importlib.reload(attnres_megatron)


def test_missing_megatron_core_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(ImportError, match="megatron-core; it is not installed. Run: pip install"):
        versions.check_megatron_core_version()


def test_installed_metadata_declares_the_tested_range():
    declared = [str(Requirement(line)) for line in requires("attnres-megatron")]
    assert str(Requirement(MEGATRON_CORE_REQUIREMENT)) in declared


def test_the_lock_pins_versions_inside_every_declared_range():
    """Each requirement of the package and its extras admits the locked version (when locked)."""
    pins = locked_versions()
    checked = 0
    for line in requires("attnres-megatron"):
        requirement = Requirement(line)
        name = requirement.name.lower().replace("_", "-")
        if name in pins:
            assert requirement.specifier.contains(pins[name], prereleases=True), (line, pins[name])
            checked += 1
    assert checked >= 10  # torch, megatron-core, numpy, psutil, packaging, test tools


def test_this_environment_runs_the_locked_versions():
    """CI installs from the lock: what is installed is exactly what it pins."""
    if "+cpu" not in version("torch"):
        pytest.skip("the lock applies to CPU machines (a CUDA build of torch is installed here)")
    mismatched = {}
    for name, pinned in locked_versions().items():
        try:
            installed = version(name)
        except importlib.metadata.PackageNotFoundError:
            mismatched[name] = (pinned, None)
            continue
        if installed.split("+")[0] != pinned:
            mismatched[name] = (pinned, installed)
    assert not mismatched, f"installed versions differ from {LOCK.name}: {mismatched}; run scripts/install.sh"

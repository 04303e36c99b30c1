"""The registry of adaptations: every target exists, CPU entries stay off CUDA machines, and
only entry points install them (never a model builder)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import torch

from attnres_megatron.compat import registry

PACKAGE = Path(registry.__file__).resolve().parents[1]
INSTALLERS = {"install_adaptations", "enable_cpu_backend"}
# Where the adaptations may be installed: the programs' start-up, never model code.
ENTRY_POINT_FILES = {
    "training/distributed.py",  # attnres-pretrain, attnres-profile and the tools start here
    "megatron_lm/launch.py",  # both Megatron-LM routes
    "compat/registry.py",
    "compat/cpu_backend.py",
}


def _dotted_attributes(target: str) -> list[str]:
    """``pkg.mod.Cls.attr`` or ``pkg.mod.{a,b}.attr`` or ``pkg.mod.x, y`` -> each dotted path."""
    match = re.match(r"([\w.]*)\.\{(.*)\}([\w.]*)", target)
    if match:
        prefix, names, rest = match.groups()
        return [f"{prefix}.{name}{rest}" for name in names.split(",")]
    return [target.split(",")[0].split(" ")[0]]


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            value = getattr(value, name)
        return value
    raise ImportError(dotted)


def test_every_entry_names_its_scope_package_reason_and_versions():
    targets = [entry.target for entry in registry.ADAPTATIONS]
    assert len(targets) == len(set(targets))
    for entry in registry.ADAPTATIONS:
        assert entry.scope in registry.SCOPES and entry.package in ("megatron-core", "megatron-lm", "torch")
        assert len(entry.reason) > 30 and callable(entry.install)
        assert "0.16" in entry.versions


@pytest.mark.parametrize(
    "entry",
    [entry for entry in registry.ADAPTATIONS if entry.package == "megatron-core"],
    ids=lambda entry: entry.target.split(" ")[0].rsplit(".", 1)[-1],
)
def test_megatron_core_targets_exist_in_the_installed_release(entry):
    for dotted in _dotted_attributes(entry.target):
        module, _, _ = dotted.rpartition(".")
        _resolve(module)  # the module (or class) holding the replaced attribute
        if not dotted.endswith(("te_general_gemm", "HAVE_TE")):  # defined only with TE
            _resolve(dotted)


def test_scopes_select_the_entries_for_each_device():
    cpu = registry.adaptations_for("cpu")
    cuda = registry.adaptations_for("cuda")
    with_lm = registry.adaptations_for("cuda", megatron_lm=True)
    assert all(entry.scope == "all" for entry in cuda)
    assert {entry.scope for entry in cpu} == {"cpu", "all"}
    assert not any(entry.package == "megatron-lm" for entry in cpu + cuda)
    assert {entry.target for entry in with_lm} - {entry.target for entry in cuda} == {
        entry.target
        for entry in registry.ADAPTATIONS
        if entry.package == "megatron-lm" and entry.scope == "all"
    }
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        registry.adaptations_for("tpu")


def test_cpu_entries_refuse_a_machine_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="must not be enabled where CUDA is available"):
        registry.install_adaptations("cpu")


def test_installing_is_once_per_process(monkeypatch):
    calls: list[str] = []
    entry = registry.Adaptation("x.y", "megatron-core", "all", "a test entry " * 3, lambda: calls.append("x"))
    monkeypatch.setattr(registry, "ADAPTATIONS", (entry,))
    monkeypatch.setattr(registry, "_INSTALLED", set())
    registry.install_adaptations("cuda")
    registry.install_adaptations("cuda")
    assert calls == ["x"] and registry.installed_targets() == {"x.y"}


def _installer_calls(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    called = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name in INSTALLERS or (name or "").startswith("install_"):
                called.add(name)
    return called


def test_only_entry_points_install_adaptations():
    installing = {
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if _installer_calls(path) & (INSTALLERS | {"install_attnres_schedule", "install_planned_shapes"})
    }
    assert installing <= ENTRY_POINT_FILES, installing - ENTRY_POINT_FILES
    for folder in ("models", "layers", "ops", "pipeline"):
        assert not [p for p in (PACKAGE / folder).rglob("*.py") if _installer_calls(p)], folder


def test_the_table_prints_every_entry():
    text = registry.describe()
    assert all(entry.target in text and entry.reason in text for entry in registry.ADAPTATIONS)

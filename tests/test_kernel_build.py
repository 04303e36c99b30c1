"""The C++ CPU kernels' build cache: stale locks, bounded waits, the cache key, verified libraries.

Each test builds into its own directory (``build_root``), never the shared cache; all but the last
replace the compile and import steps, since what they test is the lock and hash logic. The last
checks one real build (~25 s on 2 cores): the one this test session already made in the shared
cache, where it found none there when it started and a test before this one used the kernels,
else its own, in its own directory."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnres_megatron.ops import cpu_extension, kernel_cache
from attnres_megatron.ops.build_lock import LOCK_NAME, TORCH_BATON, BuildLockTimeout
from attnres_megatron.ops.kernel_cache import digest_path, file_digest, record_digest, unverified_reason

# Read when the tests are collected, before any of them runs.
SHARED_CACHE_BUILT_BEFORE = unverified_reason(cpu_extension.library_path()) is None


class FakeBuild:
    """Stands in for the compiler and the importer: records what was built and what was loaded."""

    def __init__(self, monkeypatch) -> None:
        self.compiled: list[list[str]] = []
        self.loaded: list[bytes] = []
        monkeypatch.setattr(cpu_extension, "compile_library", self.compile)
        monkeypatch.setattr(cpu_extension, "import_library", self.load)

    def compile(self, name: str, sources: list[str], directory: Path) -> str:
        self.compiled.append(sorted(entry.name for entry in directory.iterdir()))
        (directory / f"{name}.so").write_bytes(b"built here")
        return "built module"

    def load(self, name: str, library: Path) -> str:
        self.loaded.append(library.read_bytes())
        return "cached module"


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_stale_lock_from_a_killed_build_is_cleared_with_a_message(tmp_path, monkeypatch, capsys):
    fake = FakeBuild(monkeypatch)
    directory = cpu_extension.library_path(tmp_path).parent
    directory.mkdir(parents=True)
    (directory / TORCH_BATON).touch()  # torch's FileBaton, left by a killed build: waited on forever before
    pid = dead_pid()
    record = {"pid": pid, "host": socket.gethostname(), "since": time.time() - 60}
    (directory / LOCK_NAME).write_text(json.dumps(record))
    started = time.monotonic()
    assert cpu_extension.load_cpu_extension(tmp_path, lock_timeout=5) == "built module"
    assert time.monotonic() - started < 3
    err = capsys.readouterr().err
    assert f"removing a stale kernel build lock in {directory}" in err
    assert f"left by pid {pid} on host {socket.gethostname()}, no longer running" in err
    assert fake.compiled == [[LOCK_NAME]]  # the baton was gone before the build started
    assert not (directory / TORCH_BATON).exists() and (directory / LOCK_NAME).read_text() == ""


def test_waiting_for_a_live_build_is_bounded_and_names_the_holder(tmp_path, monkeypatch):
    fake = FakeBuild(monkeypatch)
    directory = cpu_extension.library_path(tmp_path).parent
    directory.mkdir(parents=True)
    holder = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        os.write(holder, json.dumps({"pid": os.getpid(), "host": "builder", "since": time.time()}).encode())
        started = time.monotonic()
        with pytest.raises(BuildLockTimeout, match=f"waiting for the kernel build in {directory}") as info:
            cpu_extension.load_cpu_extension(tmp_path, lock_timeout=0.5)
        assert 0.5 <= time.monotonic() - started < 3
        assert f"held by pid {os.getpid()} on host builder" in str(info.value)
    finally:
        os.close(holder)
    assert fake.compiled == []
    assert cpu_extension.load_cpu_extension(tmp_path, lock_timeout=0.5) == "built module"  # released


@pytest.mark.parametrize("recorded", [False, True], ids=["no_recorded_hash", "hash_mismatch"])
def test_a_foreign_library_is_rebuilt_never_loaded(tmp_path, monkeypatch, capsys, recorded):
    fake = FakeBuild(monkeypatch)
    library = cpu_extension.library_path(tmp_path)
    library.parent.mkdir(parents=True)
    if recorded:
        library.write_bytes(b"built here")
        record_digest(library)
    library.write_bytes(b"foreign code")
    (library.parent / "main.o").write_bytes(b"foreign object")
    assert cpu_extension.load_cpu_extension(tmp_path) == "built module"
    assert fake.loaded == [] and fake.compiled == [[LOCK_NAME]]  # nothing foreign left to link either
    reason = "its sha256 differs from the one recorded" if recorded else "no hash was recorded at build time"
    assert f"not loading {library}: {reason}" in capsys.readouterr().err
    assert digest_path(library).read_text().strip() == file_digest(library)
    assert cpu_extension.load_cpu_extension(tmp_path) == "cached module"
    assert fake.loaded == [b"built here"] and len(fake.compiled) == 1


def test_a_library_that_does_not_load_is_rebuilt(tmp_path, monkeypatch, capsys):
    fake = FakeBuild(monkeypatch)
    library = cpu_extension.library_path(tmp_path)
    library.parent.mkdir(parents=True)
    library.write_bytes(b"truncated")
    record_digest(library)

    def broken(name, path):
        raise ImportError("invalid ELF header")

    monkeypatch.setattr(cpu_extension, "import_library", broken)
    assert cpu_extension.load_cpu_extension(tmp_path) == "built module"
    assert "it does not load (invalid ELF header); rebuilding it" in capsys.readouterr().err
    assert len(fake.compiled) == 1


def test_the_cache_key_covers_sources_flags_and_the_cpu(monkeypatch):
    sources, functions = ["int f();"], ["f"]
    base = kernel_cache.cache_key(sources, functions, ["-march=native"], [])
    assert base == kernel_cache.cache_key(sources, functions, ["-march=native"], [])
    assert base != kernel_cache.cache_key(["int g();"], functions, ["-march=native"], [])
    assert base != kernel_cache.cache_key(sources, functions, ["-O3", "-march=native"], [])
    monkeypatch.setattr(kernel_cache, "cpu_signature", lambda: "another CPU: flags avx512f")
    assert base != kernel_cache.cache_key(sources, functions, ["-march=native"], [])


def test_the_cpu_signature_holds_the_instruction_set_flags():
    signature = kernel_cache.cpu_signature()
    assert signature
    if Path("/proc/cpuinfo").is_file() and "flags" in Path("/proc/cpuinfo").read_text():
        assert "flags" in signature and ("sse2" in signature or "avx" in signature)


def test_real_build_records_its_hash_and_loads_from_the_cache(tmp_path, monkeypatch):
    import torch

    shared = cpu_extension.library_path()
    if not SHARED_CACHE_BUILT_BEFORE and unverified_reason(shared) is None:
        # This session built the shared cache's library (the first test to use the kernels did,
        # through this same function): that is the real build checked here, not compiled twice.
        build_root = cpu_extension.default_build_root()
    else:
        build_root = tmp_path
    module = cpu_extension.load_cpu_extension(build_root)
    library = cpu_extension.library_path(build_root)
    # Python keeps one extension module per name and process: where an earlier test already
    # imported the kernels, the module is that one, and the build here is checked on disk.
    assert library.is_file() and Path(module.__file__).name == library.name
    assert digest_path(library).read_text().strip() == file_digest(library)
    assert all(hasattr(module, name) for name in cpu_extension.FUNCTIONS)

    def no_compiler(*args, **kwargs):
        raise AssertionError("a verified library was rebuilt")

    monkeypatch.setattr(cpu_extension, "compile_library", no_compiler)
    again = cpu_extension.load_cpu_extension(build_root)
    rows = torch.randn(2, 4, 8)
    out, _, _ = again.fused_forward(list(rows.unbind(0)), torch.zeros(8), torch.ones(8), 1e-6)
    torch.testing.assert_close(out, rows.mean(0))  # zero query: the mean of the sources

"""The launch scripts in examples/ parse with ``bash -n`` and say what they need and run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted([*EXAMPLES.glob("*.sh"), *EXAMPLES.glob("*.sbatch")])
EXPECTED = {
    "pretrain_tiny_cpu.sh",
    "pretrain_torchrun.sh",
    "pretrain_mpirun.sh",
    "slurm_attnres_moe.sbatch",
}


def header(path: Path) -> list[str]:
    """The leading comment block (shebang and #SBATCH lines included)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def test_expected_examples_exist():
    assert EXPECTED <= {path.name for path in SCRIPTS}


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.name)
def test_script_parses(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.name)
def test_script_header_says_what_it_needs_and_runs(path):
    lines = header(path)
    assert lines and lines[0].startswith("#!") and "bash" in lines[0], f"{path.name}: no bash shebang"
    text = "\n".join(lines)
    for key in ("Needs:", "Runs:"):
        assert any(line.lstrip("# ").startswith(key) for line in lines), f"{path.name}: no {key!r} in\n{text}"
    body = path.read_text(encoding="utf-8")
    assert "set -euo pipefail" in body, f"{path.name}: missing set -euo pipefail"


def test_sbatch_directives_precede_commands():
    path = EXAMPLES / "slurm_attnres_moe.sbatch"
    directives = [line for line in header(path) if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=2" in directives and "#SBATCH --ntasks-per-node=8" in directives
    assert "#SBATCH --gpus-per-node=8" in directives

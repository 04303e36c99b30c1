"""Launch Megatron-LM's training loop (both routes) and ``attnres-pretrain`` on the CPU, and read
what they logged. Used by ``test_megatron_lm_training.py``; needs a Megatron-LM core_v0.16.1
checkout named by ``MEGATRON_LM_DIR``.

Routes:
* ``driver``: ``python -m attnres_megatron.megatron_lm.pretrain_gpt_attnres`` with ``MEGATRON_LM_DIR``;
* ``patched``: Megatron-LM's own ``pretrain_gpt.py`` with ``patches/`` applied, run from a directory
  that holds the patched script, its two sibling modules and a link to the checkout's
  ``megatron`` package (exactly the layout of a patched checkout; the checkout is not modified);
* ``attnres-pretrain``: ``python -m attnres_megatron.training.pretrain``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "patches" / "megatron_lm_core_r0.16_pretrain_gpt.patch"
CHECKOUT = os.environ.get("MEGATRON_LM_DIR")
SKIP_REASON = (
    "Megatron-LM's training loop is not on PyPI: set MEGATRON_LM_DIR to a Megatron-LM core_v0.16.1 "
    "checkout (commit 55ac7082) to run these tests (README, 'Using with Megatron-LM')"
)
SCRIPT_MODULES = ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py")
ROUTES = ("driver", "patched")


def checkout_available() -> bool:
    return bool(CHECKOUT) and Path(CHECKOUT, "pretrain_gpt.py").is_file()


@dataclass
class Run:
    """One finished launch: its output and where it wrote TensorBoard events."""

    returncode: int
    output: str
    board: Path

    def scalars(self, tag: str) -> dict[int, float]:
        """``tag``'s values by iteration, from the run's TensorBoard events."""
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(self.board), size_guidance={"scalars": 0})
        events.Reload()
        return {event.step: event.value for event in events.Scalars(tag)}


def patched_checkout(directory: Path) -> Path:
    """A patched ``pretrain_gpt.py`` beside the checkout's modules and ``megatron`` package."""
    script = directory / "pretrain_gpt.py"
    if script.is_file():
        return script
    directory.mkdir(parents=True, exist_ok=True)
    for name in SCRIPT_MODULES:
        shutil.copy(Path(CHECKOUT, name), directory / name)
    (directory / "megatron").symlink_to(Path(CHECKOUT, "megatron").resolve(), target_is_directory=True)
    done = subprocess.run(["git", "apply", str(PATCH)], cwd=directory, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return script


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(route: str, nproc: int, workdir: Path) -> list[str]:
    """The launcher and entry point of ``route`` with ``nproc`` processes."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        launcher += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    if route == "driver":
        return [*launcher, "-m", "attnres_megatron.megatron_lm.pretrain_gpt_attnres"]
    if route == "patched":
        return [*launcher, str(patched_checkout(workdir.parent / "patched-checkout"))]
    if route == "attnres-pretrain":
        return [*launcher, "-m", "attnres_megatron.training.pretrain"]
    raise ValueError(route)


def environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "PYTHONPATH")}
    env.update(MEGATRON_LM_DIR=str(CHECKOUT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def launch(route: str, argv: list[str], workdir: Path, nproc: int = 1, timeout: float = 420) -> Run:
    """Run ``route`` on the CPU with ``argv``, TensorBoard events under ``workdir/board``."""
    workdir.mkdir(parents=True, exist_ok=True)
    board = workdir / "board"
    device = [] if "--device" in argv else ["--device", "cpu"]
    full = [*command(route, nproc, workdir), *argv, *device, "--tensorboard-dir", str(board)]
    done = subprocess.run(
        full, cwd=workdir, env=environment(), capture_output=True, text=True, timeout=timeout
    )
    return Run(done.returncode, done.stdout + done.stderr, board)

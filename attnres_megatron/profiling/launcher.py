"""Start the profile's worker processes torchrun-style when no launcher did (e.g. PP on one machine)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from attnres_megatron.training.launch_env import LOOPBACK, free_port

LAUNCHER_PREFIXES = ("OMPI_COMM_WORLD_", "PMI_", "SLURM_")
SPAWNED_MARKER = "ATTNRES_PROFILE_LOCAL_WORKERS"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def worker_env(rank: int, world_size: int, port: int, device: str) -> dict[str, str]:
    """This process's environment without launcher variables, plus torchrun's for ``rank``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in LAUNCHER_VARS and not key.startswith(LAUNCHER_PREFIXES)
    }
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    env[SPAWNED_MARKER] = "1"
    if device != "cuda" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world_size))
    return env


def spawn_workers(argv: list[str], world_size: int, device: str) -> int:
    """Run ``attnres-profile argv`` in ``world_size`` local processes; the first failure stops the rest."""
    port = free_port(LOOPBACK)
    command = [sys.executable, "-m", "attnres_megatron.profiling.cli", *argv]
    workers = [
        subprocess.Popen(command, env=worker_env(rank, world_size, port, device))
        for rank in range(world_size)
    ]
    try:
        while True:
            codes = [worker.poll() for worker in workers]
            failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                rank, code = failed[0]
                print(f"error: attnres-profile worker rank {rank} exited with code {code}", file=sys.stderr)
                return code
            if all(code == 0 for code in codes):
                return 0
            time.sleep(0.1)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
                try:
                    worker.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    worker.kill()

"""Checkpoint directories on disk: Megatron-LM's layout, written atomically.

``ROOT/iter_0000100/`` holds one checkpoint and ``ROOT/latest_checkpointed_iteration.txt``
names the newest. A save writes ``ROOT/.saving.iter_0000100/`` (shards, then the manifest) and
renames it into place; a checkpoint it replaces is first renamed to
``ROOT/.replaced.iter_0000100/`` and deleted only after the tracker is rewritten (a fsynced
temporary file renamed over it). A save killed at any moment therefore leaves every complete
checkpoint complete: the one the tracker names is ``iter_*``, or its ``.replaced`` copy while a
replacement was half done. Standard library only.
"""

from __future__ import annotations

import os
import shutil
import signal
from typing import Optional

from attnres_megatron.training.checkpoint_manifest import (
    MANIFEST_FILE,
    ManifestError,
    fsync_path,
    read_manifest,
    write_manifest,
)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MEGATRON_METADATA = "metadata.json"  # written last by Megatron-Core's dist_checkpointing.save
STAGING_PREFIX = ".saving."
REPLACED_PREFIX = ".replaced."
# Test hook: SIGKILL this process when a save reaches the named stage (see SAVE_STAGES).
KILL_AT_ENV = "ATTNRES_CHECKPOINT_KILL_AT"
SAVE_STAGES = ("staging", "shards", "manifest", "set-aside", "renamed", "tracker-temp", "tracker")


def fault_point(stage: str) -> None:
    """Kill the process here when ``$ATTNRES_CHECKPOINT_KILL_AT`` names ``stage`` (tests)."""
    if os.environ.get(KILL_AT_ENV) == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def staging_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"{STAGING_PREFIX}iter_{iteration:07d}")


def replaced_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"{REPLACED_PREFIX}iter_{iteration:07d}")


def is_complete(path: str) -> bool:
    """A finished checkpoint: it has a manifest (or, saved by an older version, Megatron's metadata)."""
    return os.path.isfile(os.path.join(path, MANIFEST_FILE)) or os.path.isfile(
        os.path.join(path, MEGATRON_METADATA)
    )


def resolve(root: str, iteration: int) -> Optional[str]:
    """The complete checkpoint of ``iteration``: ``iter_*``, else the copy a killed save set aside."""
    for path in (iteration_dir(root, iteration), replaced_dir(root, iteration)):
        if os.path.isdir(path) and is_complete(path):
            return path
    return None


def read_tracker(root: str) -> Optional[str]:
    """The tracker's text (stripped), None without one."""
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return handle.read().strip()


def write_tracker(root: str, iteration: int) -> None:
    """Rewrite the tracker atomically: fsynced temporary file, rename, fsync of the directory."""
    temporary = os.path.join(root, f".{TRACKER_FILE}.tmp")
    with open(temporary, "w") as handle:
        handle.write(str(iteration))
        handle.flush()
        os.fsync(handle.fileno())
    fault_point("tracker-temp")
    os.replace(temporary, os.path.join(root, TRACKER_FILE))
    fsync_path(root)


def complete_checkpoints(root: str) -> dict[int, str]:
    """Iteration -> directory of every complete checkpoint under ``root``."""
    if not os.path.isdir(root):
        return {}
    found = {}
    for name in os.listdir(root):
        digits = name.removeprefix(REPLACED_PREFIX).removeprefix("iter_")
        if name.removeprefix(REPLACED_PREFIX).startswith("iter_") and digits.isdigit():
            path = resolve(root, int(digits))
            if path is not None:
                found[int(digits)] = path
    return found


def run_id_of(path: str) -> Optional[str]:
    """The id of the run that saved the checkpoint at ``path`` (None: unknown -- an older version,
    or an unreadable manifest, which the load's verification reports)."""
    try:
        manifest = read_manifest(path)
    except ManifestError:
        return None
    return manifest.get("run_id") if manifest else None


def prepare_staging(root: str, iteration: int) -> str:
    """An empty temporary directory for ``iteration`` (a killed save's leftovers removed)."""
    path = staging_dir(root, iteration)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def commit(root: str, iteration: int) -> str:
    """Move the finished staging directory of ``iteration`` into place and point the tracker at it."""
    final, aside = iteration_dir(root, iteration), replaced_dir(root, iteration)
    if os.path.isdir(aside):  # a replacement killed between its two renames
        if os.path.isdir(final):
            shutil.rmtree(aside)
        else:
            os.rename(aside, final)
    if os.path.isdir(final):
        os.rename(final, aside)
        fsync_path(root)
        fault_point("set-aside")
    os.rename(staging_dir(root, iteration), final)
    fsync_path(root)
    fault_point("renamed")
    write_tracker(root, iteration)
    fault_point("tracker")
    shutil.rmtree(aside, ignore_errors=True)
    return final


def publish(root: str, iteration: int, digests: dict[str, str], run_id: Optional[str]) -> str:
    """Finish a save whose shards are in the staging directory: manifest last, then commit."""
    write_manifest(staging_dir(root, iteration), digests, iteration=iteration, run_id=run_id)
    fault_point("manifest")
    return commit(root, iteration)

"""The checksum manifest of a checkpoint directory: the sha256 of every file, written last.

``attnres_manifest.json`` records the digest of each file the save wrote, the iteration and the
id of the run that wrote it. It is written inside the temporary directory after every shard
(so its presence means the save finished) and checked before anything is read on load: a
missing, truncated or altered file is reported by name. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any, Optional

MANIFEST_FILE = "attnres_manifest.json"
FORMAT = "attnres-checkpoint-manifest/1"
CHUNK = 1 << 22


class ManifestError(RuntimeError):
    """A checkpoint file does not match the manifest, or the manifest is unreadable."""


def fsync_path(path: str) -> None:
    """Flush a file's or a directory's data and metadata to the storage device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: str) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(directory: str, names: Iterable[str], sync: bool = False) -> dict[str, str]:
    """Name -> sha256 of files in ``directory`` (each also fsynced with ``sync``)."""
    digests = {}
    for name in names:
        path = os.path.join(directory, name)
        digests[name] = file_digest(path)
        if sync:
            fsync_path(path)
    return digests


def checkpoint_files(directory: str) -> list[str]:
    """The files a manifest covers: every regular file in ``directory`` but the manifest."""
    return sorted(
        name
        for name in os.listdir(directory)
        if name != MANIFEST_FILE and os.path.isfile(os.path.join(directory, name))
    )


def write_manifest(directory: str, digests: dict[str, str], **info: Any) -> None:
    """Write the manifest (through a fsynced temporary file) and fsync the directory."""
    manifest = {"format": FORMAT, "algorithm": "sha256", **info, "files": dict(sorted(digests.items()))}
    temporary = os.path.join(directory, f".{MANIFEST_FILE}.tmp")
    with open(temporary, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, os.path.join(directory, MANIFEST_FILE))
    fsync_path(directory)


def read_manifest(directory: str) -> Optional[dict[str, Any]]:
    """The manifest of ``directory``; None when there is none (a checkpoint of an older version)."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as error:
        raise ManifestError(f"{path} is unreadable ({error})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest.get("format") != FORMAT or not isinstance(files, dict):
        raise ManifestError(f"{path} is not a checkpoint manifest ({FORMAT})")
    return manifest


def find_mismatches(directory: str, manifest: dict[str, Any], names: Iterable[str]) -> list[str]:
    """Problems with the files ``names`` of the manifest: missing, or another sha256."""
    problems = []
    for name in names:
        path = os.path.join(directory, name)
        if os.path.basename(name) != name or not os.path.isfile(path):
            problems.append(f"{name} is missing")
            continue
        actual = file_digest(path)
        if actual != manifest["files"][name]:
            problems.append(
                f"{name} does not match its sha256 in {MANIFEST_FILE} (file altered or truncated)"
            )
    return problems

"""Training data through Megatron-Core's dataset stack (indexed datasets, ``GPTDataset``, blends).

Pieces, in the order a run uses them:

* :func:`default_corpus_prefix` builds the embedded default corpus (the Python standard
  library's sources, one document per file, byte tokens) into a Megatron indexed dataset
  (``.bin``/``.idx``) once, in a cache directory, and returns its path prefix.
  ``tools/preprocess_data.py`` builds indexed datasets from your own text/JSONL files.
* :func:`build_datasets` turns a Megatron blend (``["prefix"]`` or ``["0.3", "p1", "0.7", "p2"]``)
  and a split string (``"969,30,1"``) into train/valid datasets with
  ``BlendedMegatronDatasetBuilder`` + ``GPTDatasetConfig`` + ``GPTDataset``.
* :class:`DataParallelBatches` yields, per training step, this data-parallel rank's
  micro-batches in the order of Megatron's ``MegatronPretrainingSampler``; it is a pure
  function of the step, so resuming at step N reproduces the uninterrupted run.

C++ helpers: ``GPTDataset`` and ``BlendedDataset`` build their sample/blending indices with
``megatron.core.datasets.helpers_cpp``. The megatron-core wheel ships it precompiled; if it is
missing (a source checkout), :func:`ensure_dataset_helpers` compiles it once with Megatron's own
``compile_helpers()`` (``make`` in the package directory; needs g++, pybind11 and write access),
on global rank 0 only when ``torch.distributed`` is initialised.

Cache directory: ``cache_dir`` argument, else ``$ATTNRES_CACHE_DIR``, else
``~/.cache/attnres-megatron``. It holds ``stdlib-byte-v1/`` (the default corpus) and
``dataset-indices/<content digest>/`` (Megatron's cached document/sample/shuffle indices, one
directory per data content: sha256 of each ``.idx`` and the ``.bin`` size, so a prefix regenerated
in place gets fresh indices).

Before any work, :func:`check_prefixes` checks every ``.bin``/``.idx`` pair (magic, version, dtype,
index size, document indices, ``.bin`` size = tokens x dtype size) and names each broken file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from attnres_megatron.training.corpus import stdlib_source_files
from attnres_megatron.training.tokenizers import DatasetTokenizer, build_tokenizer

CACHE_ENV = "ATTNRES_CACHE_DIR"
DEFAULT_CACHE_ROOT = Path("~/.cache/attnres-megatron")
DEFAULT_CORPUS_DIR = "stdlib-byte-v1"
DATASET_INDEX_DIR = "dataset-indices"
PREPROCESS_HINT = (
    "python tools/preprocess_data.py --input FILES --output-prefix PREFIX "
    "[--tokenizer-type TYPE --tokenizer-model PATH]"
)


class DataError(ValueError):
    """A data configuration or input problem, with a message that names the cause and the fix."""


# --------------------------------------------------------------------------- indexed datasets


def dtype_for_vocab(vocab_size: int) -> type[np.number]:
    """The smallest token dtype Megatron's indexed dataset can store ``vocab_size`` ids in."""
    if vocab_size <= 0:
        raise DataError(f"Vocabulary size must be positive, got {vocab_size}.")
    if vocab_size <= 1 << 8:
        return np.uint8
    if vocab_size <= 1 << 16:
        return np.uint16
    if vocab_size <= np.iinfo(np.int32).max:
        return np.int32
    raise DataError(f"Vocabulary size {vocab_size} does not fit the int32 token storage.")


@dataclass
class IndexedDatasetStats:
    """What :func:`write_indexed_dataset` wrote."""

    prefix: str
    documents: int
    tokens: int
    dtype: str


def write_indexed_dataset(
    documents: Iterable[Union[Sequence[int], np.ndarray]],
    output_prefix: Union[str, os.PathLike],
    vocab_size: int,
    eod: Optional[int],
    progress: Optional[Callable[[int, int], None]] = None,
) -> IndexedDatasetStats:
    """Write token documents to ``output_prefix.bin``/``.idx`` with Megatron's ``IndexedDatasetBuilder``.

    Each document becomes one sequence (and one document) with ``eod`` appended (unless
    ``eod`` is None). The files are written under temporary names and renamed into place
    only when complete, so a reader never sees a half-written dataset. ``progress(documents,
    tokens)`` is called after each document. Raises :class:`DataError` for ids outside
    ``[0, vocab_size)`` and when there are no documents (nothing is left behind then).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = os.fspath(output_prefix)
    directory = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(directory, exist_ok=True)
    dtype = dtype_for_vocab(vocab_size)
    suffix = f".tmp-{os.getpid()}-{time.monotonic_ns()}"
    bin_tmp, idx_tmp = prefix + ".bin" + suffix, prefix + ".idx" + suffix
    documents_written = tokens_written = 0
    try:
        builder = IndexedDatasetBuilder(bin_tmp, dtype=dtype)
        for document in documents:
            ids = np.asarray(document, dtype=np.int64).reshape(-1)
            if eod is not None:
                ids = np.append(ids, np.int64(eod))
            if ids.size == 0:
                continue
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab_size:
                raise DataError(
                    f"Document {documents_written} has token id {low if low < 0 else high} outside "
                    f"the vocabulary [0, {vocab_size}); the tokenizer's vocab_size is wrong."
                )
            builder.add_document(ids.astype(dtype, copy=False), [int(ids.size)])
            documents_written += 1
            tokens_written += int(ids.size)
            if progress is not None:
                progress(documents_written, tokens_written)
        builder.finalize(idx_tmp)
        if documents_written == 0:
            raise DataError(f"No documents to write to {prefix}.bin/.idx: every input was empty.")
        os.replace(bin_tmp, prefix + ".bin")
        os.replace(idx_tmp, prefix + ".idx")
    finally:
        for path in (bin_tmp, idx_tmp):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    return IndexedDatasetStats(prefix, documents_written, tokens_written, np.dtype(dtype).name)


def ensure_dataset_helpers() -> None:
    """Make ``megatron.core.datasets.helpers_cpp`` importable, compiling it once if needed.

    The megatron-core wheel ships the extension precompiled, so this is normally only an
    import. Otherwise Megatron's own ``compile_helpers()`` runs ``make`` in the package
    directory (needs g++, pybind11 and write access) on global rank 0, the other ranks
    waiting on a barrier when ``torch.distributed`` is initialised.
    """
    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401

        return
    except ImportError:
        pass
    from megatron.core.datasets.utils import compile_helpers

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        try:
            compile_helpers()
        except SystemExit as err:
            raise RuntimeError(
                "Megatron-Core's C++ dataset helpers (megatron/core/datasets/helpers.cpp) are not "
                "built and compiling them failed; install g++ and pybind11 (pip install pybind11) "
                "and make the megatron/core/datasets directory writable, or reinstall the "
                "megatron-core wheel, which ships them precompiled."
            ) from err
    if distributed:
        torch.distributed.barrier()
    import megatron.core.datasets.helpers_cpp  # noqa: F401


# --------------------------------------------------------------------------- the default corpus


def cache_root(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """``cache_dir``, else ``$ATTNRES_CACHE_DIR``, else ``~/.cache/attnres-megatron`` (absolute)."""
    chosen = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT
    return Path(chosen).expanduser().resolve()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (``fcntl.flock``; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _corpus_documents(files: Sequence[Path], tokenizer: DatasetTokenizer) -> Iterator[np.ndarray]:
    """Token ids of each file (bytes as they are for the byte tokenizer, else UTF-8 text)."""
    for path in files:
        data = path.read_bytes()
        if tokenizer.is_byte_level:
            yield np.frombuffer(data, dtype=np.uint8)
        else:
            yield np.asarray(tokenizer.tokenize(data.decode("utf-8", errors="replace")), dtype=np.int64)


def _corpus_files(max_bytes: Optional[int]) -> list[Path]:
    """Standard-library files in order, whole files up to ``max_bytes`` (at least one file)."""
    files = stdlib_source_files()
    if max_bytes is None:
        return files
    if max_bytes <= 0:
        raise DataError(f"max_bytes must be positive, got {max_bytes}.")
    chosen, total = [], 0
    for path in files:
        if chosen and total + path.stat().st_size > max_bytes:
            break
        chosen.append(path)
        total += path.stat().st_size
    return chosen


def _corpus_location(root: Path, tokenizer: DatasetTokenizer, max_bytes: Optional[int]) -> tuple[Path, str]:
    """(final directory, prefix name) of one default-corpus variant."""
    identity = dict(tokenizer.unique_identifiers)
    if identity == build_tokenizer().unique_identifiers:  # the default: UTF-8 bytes, NUL ends
        family = DEFAULT_CORPUS_DIR
    else:
        digest = hashlib.md5(json.dumps(identity, sort_keys=True).encode(), usedforsecurity=False)
        family = f"stdlib-{digest.hexdigest()[:12]}-v1"
    variant = f"py{sys.version_info.major}.{sys.version_info.minor}-{max_bytes or 'all'}"
    return root / family / variant, "stdlib"


def _corpus_is_complete(prefix: Path) -> bool:
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


def _build_corpus_locked(
    final_dir: Path, name: str, tokenizer: DatasetTokenizer, max_bytes: Optional[int]
) -> None:
    """Build the corpus variant in a temporary directory and rename it into place (under a lock)."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final_dir.parent / f".{final_dir.name}.lock"):
        if _corpus_is_complete(final_dir / name):
            return
        files = _corpus_files(max_bytes)
        staging = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
        try:
            stats = write_indexed_dataset(
                _corpus_documents(files, tokenizer), staging / name, tokenizer.vocab_size, tokenizer.eod
            )
            manifest = {
                "source": "python standard library sources, one document per file",
                "python": sys.version.split()[0],
                "files": len(files),
                "documents": stats.documents,
                "tokens": stats.tokens,
                "dtype": stats.dtype,
                "tokenizer": tokenizer.unique_identifiers,
                "max_bytes": max_bytes,
            }
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            if final_dir.exists():  # an incomplete leftover from a crashed build of older code
                shutil.rmtree(final_dir)
            os.rename(staging, final_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def default_corpus_prefix(
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    max_bytes: Optional[int] = None,
    tokenizer: Optional[DatasetTokenizer] = None,
) -> str:
    """Path prefix (no ``.bin``/``.idx``) of the default corpus, built on first use.

    The corpus is the standard library's sources (``corpus.stdlib_source_files``), one
    document per file, each followed by the end-of-document id; ``max_bytes`` keeps whole
    files up to that many bytes (None: all of them). It lives at
    ``<cache root>/stdlib-byte-v1/py<X.Y>-<max_bytes|all>/stdlib`` (the cache root is
    :func:`cache_root`; ``stdlib-<digest>-v1`` for a ``tokenizer`` other than the default
    byte-level one, which tokenizes each file's UTF-8 text), is built once and reused: a
    rebuild never happens while the ``.bin``/``.idx`` pair exists. Building happens in a
    temporary directory renamed into place under a file lock, so concurrent processes never
    see partial files and only one builds. When ``torch.distributed`` is initialised this is
    collective: global rank 0 builds first, then a barrier (so call it on every rank).
    """
    tok = tokenizer or build_tokenizer()
    final_dir, name = _corpus_location(cache_root(cache_dir), tok, max_bytes)
    prefix = final_dir / name
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        if torch.distributed.get_rank() == 0 and not _corpus_is_complete(prefix):
            _build_corpus_locked(final_dir, name, tok, max_bytes)
        torch.distributed.barrier()
    if not _corpus_is_complete(prefix):  # not distributed, or a rank whose file system rank 0 lacks
        _build_corpus_locked(final_dir, name, tok, max_bytes)
    return str(prefix)


# --------------------------------------------------------------------------- GPT datasets


def parse_blend(data_path: Union[str, Sequence[str]]) -> tuple[list[str], Optional[list[float]]]:
    """(prefixes, weights or None) from Megatron blend syntax, validated.

    ``["prefix"]`` or ``["p1", "p2"]`` (unweighted) or ``["0.3", "p1", "0.7", "p2"]``
    (weight/prefix pairs). A single string is split on whitespace. Raises
    :class:`DataError` for an empty blend, an odd-length or mixed list, or weights that are
    negative, non-finite or all zero.
    """
    items = data_path.split() if isinstance(data_path, str) else [str(item) for item in data_path]
    if not items:
        raise DataError("The data path (blend) is empty; give a prefix or weight/prefix pairs.")

    def number(text: str) -> Optional[float]:
        try:
            return float(text)
        except ValueError:
            return None

    numeric = [number(item) is not None for item in items]
    if not any(numeric):
        return items, None
    pairs_ok = len(items) % 2 == 0 and all(numeric[0::2]) and not any(numeric[1::2])
    if not pairs_ok:
        raise DataError(
            f"Malformed data blend {items}: expected either prefixes only (['p1', 'p2']) or "
            f"weight/prefix pairs (['0.3', 'p1', '0.7', 'p2']); "
            + (
                f"got an odd number ({len(items)}) of items with weights among them."
                if len(items) % 2
                else "a weight is not followed by a prefix or a prefix is missing its weight."
            )
        )
    weights = [float(item) for item in items[0::2]]
    prefixes = items[1::2]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"Malformed data blend {items}: weights must be finite, >= 0 and not all 0.")
    return prefixes, weights


INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
INDEX_HEADER_BYTES = 34  # magic 9, version 8, dtype code 1, sequence count 8, document count 8
# Megatron-Core's indexed_dataset.DType codes.
TOKEN_DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


@dataclass(frozen=True)
class IndexHeader:
    """The header of a Megatron ``.idx`` file."""

    dtype: np.dtype
    sequences: int
    document_entries: int  # len(document_indices): documents + 1


def read_index_header(idx_path: str) -> IndexHeader:
    """The header of ``idx_path``, checked; :class:`DataError` (``data file PATH: ...``) otherwise."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as stream:
        head = stream.read(INDEX_HEADER_BYTES)
    if not head.startswith(INDEX_MAGIC) and not INDEX_MAGIC.startswith(head):
        raise DataError(
            f"data file {idx_path}: not a Megatron indexed dataset index (starts with {head[:9]!r}, "
            f"expected {INDEX_MAGIC!r})"
        )
    if len(head) < INDEX_HEADER_BYTES:
        raise DataError(
            f"data file {idx_path}: truncated ({size} bytes, shorter than the "
            f"{INDEX_HEADER_BYTES}-byte header)"
        )
    version = int.from_bytes(head[9:17], "little")
    if version != INDEX_VERSION:
        raise DataError(
            f"data file {idx_path}: index version {version}; Megatron-Core reads version {INDEX_VERSION}"
        )
    code = head[17]
    if code not in TOKEN_DTYPE_CODES:
        raise DataError(f"data file {idx_path}: unknown token dtype code {code}")
    sequences = int.from_bytes(head[18:26], "little")
    entries = int.from_bytes(head[26:34], "little")
    return IndexHeader(np.dtype(TOKEN_DTYPE_CODES[code]), sequences, entries)


def _index_arrays(idx_path: str, header: IndexHeader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sequence lengths, sequence pointers, document indices) of a checked ``.idx`` (memory-mapped)."""
    size = os.path.getsize(idx_path)
    needed = INDEX_HEADER_BYTES + header.sequences * (4 + 8) + header.document_entries * 8
    if size < needed:
        raise DataError(
            f"data file {idx_path}: truncated ({size} bytes; its header's {header.sequences} sequences and "
            f"{header.document_entries} document entries need {needed})"
        )
    if size not in (needed, needed + header.sequences):  # + one mode byte per sequence: multimodal
        raise DataError(
            f"data file {idx_path}: {size} bytes, but its header's {header.sequences} sequences and "
            f"{header.document_entries} document entries need {needed}"
        )
    if header.sequences == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty.astype(np.int32), empty, np.zeros(header.document_entries, dtype=np.int64)
    raw = np.memmap(idx_path, dtype=np.uint8, mode="r")
    offset = INDEX_HEADER_BYTES
    lengths = np.frombuffer(raw, dtype=np.int32, count=header.sequences, offset=offset)
    offset += lengths.nbytes
    pointers = np.frombuffer(raw, dtype=np.int64, count=header.sequences, offset=offset)
    offset += pointers.nbytes
    documents = np.frombuffer(raw, dtype=np.int64, count=header.document_entries, offset=offset)
    return lengths, pointers, documents


def _file_version(prefix: str) -> tuple:
    """What identifies this version of ``prefix.idx`` and ``prefix.bin``: path, size, mtime, inode."""
    version: tuple = ()
    for path in (f"{prefix}.idx", f"{prefix}.bin"):
        stat = os.stat(path)
        version += (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    return version


def check_indexed_files(prefix: str) -> None:
    """Raise :class:`DataError` naming ``prefix.idx`` or ``prefix.bin`` when the pair is not a readable
    Megatron indexed dataset: bad magic, version or dtype, a truncated or inconsistent index, or a
    ``.bin`` whose size differs from the token count x dtype size the ``.idx`` describes (each file
    version is checked once per process)."""
    _check_version(prefix, _file_version(prefix))


@functools.lru_cache(maxsize=256)
def _check_version(prefix: str, version: tuple) -> bool:
    """:func:`check_indexed_files` of one file version (only successes are remembered)."""
    idx_path, bin_path = f"{prefix}.idx", f"{prefix}.bin"
    header = read_index_header(idx_path)
    lengths, pointers, documents = _index_arrays(idx_path, header)
    ordered = documents.size > 0 and documents[0] == 0 and documents[-1] == header.sequences
    if not ordered or np.any(np.diff(documents) < 0):
        raise DataError(
            f"data file {idx_path}: inconsistent document indices (not ascending from 0 to "
            f"{header.sequences}, the sequence count)"
        )
    if lengths.size and int(lengths.min()) < 0:
        raise DataError(f"data file {idx_path}: negative sequence lengths")
    itemsize = header.dtype.itemsize
    expected = int(lengths.sum(dtype=np.int64)) * itemsize
    actual = os.path.getsize(bin_path)
    if actual != expected:
        state = "truncated" if actual < expected else "longer than its index says"
        raise DataError(
            f"data file {bin_path}: {state} ({actual} bytes; {idx_path} describes "
            f"{expected // itemsize} tokens of {header.dtype.name}, {expected} bytes)"
        )
    ends = pointers + lengths.astype(np.int64) * itemsize
    if pointers.size and (int(pointers.min()) < 0 or int(ends.max()) > actual):
        raise DataError(f"data file {idx_path}: sequence pointers outside {bin_path} ({actual} bytes)")
    return True


def check_prefixes(prefixes: Sequence[str]) -> None:
    """Raise :class:`DataError` naming every missing or broken ``.bin``/``.idx`` file of ``prefixes``
    (:func:`check_indexed_files`), before any work."""
    problems = []
    for prefix in prefixes:
        missing = [p for p in (f"{prefix}.bin", f"{prefix}.idx") if not os.path.isfile(p)]
        if missing:
            hint = ""
            if prefix.endswith((".bin", ".idx")):
                hint = f" (give the prefix without the extension: {prefix[:-4]})"
            files = "data files " + ", ".join(missing) if len(missing) > 1 else f"data file {missing[0]}"
            problems.append(f"{files}: missing (no such file){hint}")
            continue
        try:
            check_indexed_files(prefix)
        except DataError as error:
            problems.append(str(error))
        except OSError as error:
            problems.append(f"data file {prefix}.idx/.bin: unreadable ({error.strerror or error})")
    if problems:
        raise DataError(
            "\n  ".join(problems)
            + f"\nCreate (or regenerate) them with: {PREPROCESS_HINT} (PREFIX as above; both files "
            "from the same run)."
        )


def dataset_content_id(prefix: str) -> str:
    """A cheap identity of the dataset's content: sha256 of ``prefix.idx`` and the size of ``prefix.bin``
    (memoised per file version)."""
    return _content_id(_file_version(prefix))


@functools.lru_cache(maxsize=256)
def _content_id(version: tuple) -> str:
    """sha256 of the ``.idx`` at ``version[0]`` and the ``.bin`` size ``version[5]``."""
    digest = hashlib.sha256()
    with open(version[0], "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 22), b""):
            digest.update(chunk)
    digest.update(f"bin:{version[5]}".encode())
    return digest.hexdigest()


def index_cache_dir(root: Union[str, os.PathLike], prefixes: Sequence[str]) -> Path:
    """Where Megatron's document/sample/shuffle indices of ``prefixes`` are cached: a directory under
    ``root`` named by the data's content, so a prefix regenerated in place never reuses stale indices
    (Megatron's own cache key holds the path, not the content)."""
    digest = hashlib.sha256("\n".join(dataset_content_id(prefix) for prefix in prefixes).encode())
    return Path(root) / digest.hexdigest()[:20]


def parse_split(split: str) -> list[float]:
    """Validated ``"train,valid,test"`` weights (1 to 3 non-negative numbers, not all zero)."""
    parts = [part.strip() for part in str(split).replace("/", ",").split(",")]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise DataError(
            f"Malformed split {split!r}: expected up to three comma-separated non-negative weights "
            f"for train,valid,test, e.g. '969,30,1'."
        )
    return values + [0.0] * (3 - len(values))


@contextlib.contextmanager
def _process_group_for_megatron() -> Iterator[None]:
    """A one-process gloo group while Megatron builds datasets, if none is initialised.

    ``BlendedDataset`` calls ``torch.distributed.get_rank()`` unconditionally when it builds
    (rather than loads) its cached blending indices; a temporary world of one makes blends
    work in single-process use (tools, tests). It is torn down afterwards.
    """
    if not torch.distributed.is_available() or torch.distributed.is_initialized():
        yield
        return
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _always() -> bool:
    return True


def _check_split_documents(
    prefixes: Sequence[str], split_matrix: Sequence[Optional[tuple[float, float]]], split: str
) -> None:
    """Raise :class:`DataError` if a split that is built gets no documents of some prefix.

    Uses Megatron's own rule (``round(bookend * number_of_sequences)``).
    """
    problems = []
    for prefix in prefixes:
        sequences = read_index_header(f"{prefix}.idx").sequences
        for name, bookends in zip(("train", "valid", "test"), split_matrix):
            if bookends is None:
                continue
            begin, end = (int(round(b * float(sequences))) for b in bookends)
            if end <= begin:
                problems.append(f"{prefix} ({sequences} documents) gives the {name} split none")
    if problems:
        raise DataError(
            f"Split {split!r}: "
            + "; ".join(problems)
            + ". Use more (or smaller) documents, e.g. --split-lines in tools/preprocess_data.py, or "
            "give that split a larger share (or ask it for 0 samples)."
        )


def build_split_datasets(
    data_path: Union[str, Sequence[str]],
    split: str,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
    tokenizer: Optional[DatasetTokenizer] = None,
    *,
    test_samples: int = 0,
    path_to_cache: Optional[Union[str, os.PathLike]] = None,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    mid_level_dataset_surplus: float = 0.005,
) -> tuple[Optional[Any], Optional[Any], Optional[Any]]:
    """(train, valid, test) Megatron datasets for a blend, via ``BlendedMegatronDatasetBuilder``.

    ``data_path`` is Megatron blend syntax (see :func:`parse_blend`), ``split`` the
    ``"train,valid,test"`` weights of each prefix's documents. The train dataset has at least
    ``train_samples`` samples (``GPTDataset`` concatenates documents and repeats epochs as
    needed), valid at least ``valid_samples`` (None when that is 0 or the split gives valid
    no documents), test at least ``test_samples`` (None when that is 0). Each sample is a dict
    with ``tokens`` and ``labels`` (``[seq_length]`` int64), ``loss_mask`` and ``position_ids``.
    A blend with more than one prefix yields a ``BlendedDataset``, otherwise a ``GPTDataset``.

    Everything is validated before any work: the blend, the split, the sizes and the
    ``.bin``/``.idx`` files (:func:`check_prefixes`). Megatron's document/sample/shuffle indices are
    cached under ``path_to_cache`` (default ``<cache root>/dataset-indices``), in a subdirectory named
    by the data's content (:func:`index_cache_dir`). ``is_built_on_rank``
    (default: every rank, since each rank of this trainer reads its own batches) is passed to
    Megatron. When ``torch.distributed`` is initialised this is collective: rank 0 builds the
    indices first, the others load them after a barrier.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights = parse_blend(data_path)
    split_weights = parse_split(split)
    if seq_length <= 0:
        raise DataError(f"seq_length must be positive, got {seq_length}.")
    for name, value in (("train_samples", train_samples), ("valid_samples", valid_samples)):
        if value < 0:
            raise DataError(f"{name} must be >= 0, got {value}.")
    if test_samples < 0:
        raise DataError(f"test_samples must be >= 0, got {test_samples}.")
    if train_samples > 0 and split_weights[0] == 0:
        raise DataError(f"Split {split!r} gives the train split no documents but train_samples > 0.")
    check_prefixes(prefixes)
    tok = tokenizer or build_tokenizer()
    ensure_dataset_helpers()

    root = Path(path_to_cache) if path_to_cache is not None else cache_root() / DATASET_INDEX_DIR
    cache = index_cache_dir(root, prefixes)
    cache.mkdir(parents=True, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(list(prefixes), weights),
        split=",".join(str(w) for w in split_weights),
        path_to_cache=str(cache),
        tokenizer=tok,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
        mid_level_dataset_surplus=mid_level_dataset_surplus,
        mmap_bin_files=True,
    )
    # Splits nobody asked for are not built (Megatron would otherwise build them, and it never
    # returns from a split of a prefix that has no documents); the others keep their documents.
    sizes = [train_samples, valid_samples, test_samples]
    config.split_matrix = [rng if size > 0 else None for rng, size in zip(config.split_matrix, sizes)]
    _check_split_documents(prefixes, config.split_matrix, split)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank or _always, config)
    with _process_group_for_megatron():
        train, valid, test = builder.build()
    if train is not None and train_samples > 0 and len(train) < train_samples:
        raise DataError(
            f"The train dataset has {len(train)} samples, fewer than train_samples={train_samples}: an "
            f"unweighted blend of several prefixes covers one epoch only; give weights "
            f"(['1', 'p1', '1', 'p2'])."
        )
    if valid_samples == 0:
        valid = None
    return train, valid, test if test_samples > 0 else None


def build_datasets(*args: Any, **kwargs: Any) -> tuple[Any, Optional[Any]]:
    """(train, valid) of :func:`build_split_datasets` (same arguments)."""
    train, valid, _test = build_split_datasets(*args, **kwargs)
    return train, valid


def build_mock_datasets(
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int = 0,
    test_samples: int = 0,
    tokenizer: Optional[DatasetTokenizer] = None,
) -> tuple[Optional[Any], Optional[Any], Optional[Any]]:
    """(train, valid, test) ``MockGPTDataset``s (Megatron's ``--mock-data``): no files, ids from
    the tokenizer's vocabulary; a split asked for 0 samples is None."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

    if seq_length <= 0 or min(train_samples, valid_samples, test_samples) < 0:
        raise DataError(
            f"seq_length must be positive and sample counts >= 0; got {seq_length}, "
            f"{train_samples}, {valid_samples}, {test_samples}."
        )
    ensure_dataset_helpers()
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=None,  # Megatron-Core's mock mode (split 1,1,1)
        tokenizer=tokenizer or build_tokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    sizes = [train_samples, valid_samples, test_samples]
    config.split_matrix = [rng if size > 0 else None for rng, size in zip(config.split_matrix, sizes)]
    builder = BlendedMegatronDatasetBuilder(MockGPTDataset, sizes, _always, config)
    with _process_group_for_megatron():
        datasets = builder.build()
    return tuple(dataset if size > 0 else None for dataset, size in zip(datasets, sizes))


# --------------------------------------------------------------------------- batches


class DataParallelBatches:
    """Per-step micro-batches of one data-parallel rank, in ``MegatronPretrainingSampler`` order.

    Step ``s`` consumes global samples ``[s * global_batch_size, (s + 1) * global_batch_size)``.
    Micro-batch ``m`` of data-parallel rank ``r`` holds samples
    ``s * global_batch_size + m * micro_batch_size * dp_size + r * micro_batch_size + i`` for
    ``i < micro_batch_size``: like Megatron's sampler, each group of ``micro_batch_size *
    dp_size`` consecutive samples is cut into one consecutive slice per rank (the same layout
    as the trainer's current ``micro_batches``). Batches depend only on the step, so
    ``start_step=N`` (or ``consumed_samples=N * global_batch_size``) continues an interrupted
    run exactly. Iterating yields ``[(tokens, labels), ...]`` (``num_micro_batches`` pairs of
    ``[micro_batch_size, seq_length]`` int64 tensors on ``device``) per step.
    """

    def __init__(
        self,
        dataset: Any,
        global_batch_size: int,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        start_step: int = 0,
        consumed_samples: Optional[int] = None,
        device: Union[str, torch.device] = "cpu",
    ) -> None:
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise DataError("micro_batch_size and data_parallel_size must be positive.")
        if global_batch_size <= 0 or global_batch_size % (micro_batch_size * data_parallel_size):
            raise DataError(
                f"global_batch_size {global_batch_size} must be a positive multiple of micro_batch_size "
                f"({micro_batch_size}) x data-parallel size ({data_parallel_size})."
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise DataError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size}).")
        if consumed_samples is not None:
            if consumed_samples % global_batch_size:
                raise DataError(
                    f"consumed_samples {consumed_samples} is not a multiple of global_batch_size "
                    f"{global_batch_size}."
                )
            start_step = consumed_samples // global_batch_size
        if start_step < 0:
            raise DataError(f"start_step must be >= 0, got {start_step}.")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.num_micro_batches = global_batch_size // (micro_batch_size * data_parallel_size)
        self.step = start_step
        self.device = torch.device(device)

    @classmethod
    def from_parallel_state(
        cls,
        dataset: Any,
        global_batch_size: int,
        micro_batch_size: int,
        start_step: int = 0,
        device: Union[str, torch.device] = "cpu",
    ) -> DataParallelBatches:
        """Rank and size from Megatron's ``parallel_state`` data-parallel group."""
        from megatron.core import parallel_state

        return cls(
            dataset,
            global_batch_size,
            micro_batch_size,
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
            start_step=start_step,
            device=device,
        )

    @property
    def consumed_samples(self) -> int:
        """Global samples consumed before the next step (Megatron's ``consumed_train_samples``)."""
        return self.step * self.global_batch_size

    def sample_indices(self, step: int) -> list[list[int]]:
        """Dataset indices of each of this rank's micro-batches at ``step``."""
        base = step * self.global_batch_size
        group = self.micro_batch_size * self.data_parallel_size
        offset = self.data_parallel_rank * self.micro_batch_size
        return [
            [base + m * group + offset + i for i in range(self.micro_batch_size)]
            for m in range(self.num_micro_batches)
        ]

    def batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's ``(tokens, labels)`` micro-batches at ``step`` (does not move ``self.step``)."""
        end = (step + 1) * self.global_batch_size
        if end > len(self.dataset):
            raise DataError(
                f"Step {step} needs samples up to {end}, but the dataset has {len(self.dataset)}; "
                f"build it with train_samples >= train_iters x global_batch_size."
            )
        result = []
        for indices in self.sample_indices(step):
            samples = [self.dataset[index] for index in indices]
            tokens = torch.stack([sample["tokens"] for sample in samples]).long()
            labels = torch.stack([sample["labels"] for sample in samples]).long()
            result.append((tokens.to(self.device), labels.to(self.device)))
        return result

    def __iter__(self) -> DataParallelBatches:
        return self

    def __next__(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if (self.step + 1) * self.global_batch_size > len(self.dataset):
            raise StopIteration
        result = self.batches(self.step)
        self.step += 1
        return result

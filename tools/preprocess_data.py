"""Turn text and JSONL files into a Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

Inputs (files or glob patterns, in the order given, each glob sorted):

* ``*.jsonl`` / ``*.json`` / ``*.ndjson``: one JSON object per line, the document text in
  ``--json-key`` (default ``text``); blank lines are skipped.
* anything else: UTF-8 text, one document per file, or one per non-empty line with
  ``--split-lines``.

Input that cannot be decoded (bytes that are not UTF-8, a malformed JSON line, a line without
``--json-key``) stops the tool with exit status 2 and a message naming the file and line.

Every document is tokenized with the Megatron-Core tokenizer that Megatron-LM's flags name
(``--tokenizer-type``, default ``ByteLevelTokenizer``; ``--tokenizer-model``, ``--vocab-size``;
see ``attnres_megatron/training/tokenizers.py``), the same flags ``attnres-pretrain`` takes,
followed by the end-of-document id, and written with Megatron-Core's ``IndexedDatasetBuilder``
(token dtype uint8/uint16/int32 from the vocabulary size). Empty documents are skipped. The
output appears only when complete.

Example::

    python tools/preprocess_data.py --input 'corpus/*.txt' data.jsonl --output-prefix data/my \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer/ --workers 2
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from attnres_megatron.training.data import DataError, IndexedDatasetStats, write_indexed_dataset  # noqa: E402
from attnres_megatron.training.tokenizers import (  # noqa: E402
    TokenizerError,
    add_tokenizer_args,
    build_tokenizer,
    init_worker_tokenizer,
    tokenize_in_worker,
    tokenizer_settings,
)

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
LOG_EVERY_SECONDS = 10.0

logger = logging.getLogger("preprocess_data")


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files named by ``patterns`` (paths or globs), in order, without duplicates.

    Raises :class:`DataError` naming every pattern that matches no file.
    """
    files: list[Path] = []
    missing = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = [Path(p) for p in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(p)]
        else:
            matches = [Path(expanded)] if os.path.isfile(expanded) else []
        if not matches:
            missing.append(pattern)
        files.extend(path for path in matches if path not in files)
    if missing:
        raise DataError(f"Input not found (no such file, or the glob matches no file): {', '.join(missing)}")
    return files


def decode_utf8(raw: bytes, path: Path, first_line: int = 1) -> str:
    """``raw`` as UTF-8; :class:`DataError` naming ``path``, the line and the column of a bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + raw.count(b"\n", 0, err.start)
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); convert "
            "the file to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8) or fix that line."
        ) from None


def json_text(line: str, path: Path, number: int, json_key: str) -> str:
    """The ``json_key`` text of one JSONL line; :class:`DataError` naming the file and line otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{number}: malformed JSON line ({err.msg}).") from err
    if not isinstance(record, dict) or json_key not in record:
        raise DataError(
            f"{path}:{number}: expected a JSON object with the key {json_key!r} "
            f"(set --json-key); got {type(record).__name__}"
            + (f" with keys {sorted(record)}" if isinstance(record, dict) else "")
            + "."
        )
    text = record[json_key]
    if not isinstance(text, str):
        raise DataError(f"{path}:{number}: {json_key!r} is {type(text).__name__}, not a string.")
    return text


def iter_documents(path: Path, json_key: str = "text", split_lines: bool = False) -> Iterator[str]:
    """Document texts of one input file (see the module docstring for the formats); undecodable
    input (bad UTF-8, a malformed JSON line, a missing key) is a :class:`DataError` naming the file
    and the line."""
    if path.suffix.lower() in JSONL_SUFFIXES:
        with path.open("rb") as stream:
            for number, raw in enumerate(stream, start=1):
                line = decode_utf8(raw, path, number)
                if line.strip():
                    yield json_text(line, path, number, json_key)
        return
    text = decode_utf8(path.read_bytes(), path)
    if split_lines:
        for line in text.splitlines():
            if line.strip():
                yield line
    else:
        yield text


class Progress:
    """tqdm when installed, else a log line every ``LOG_EVERY_SECONDS`` and at the end."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.start = self.last = time.monotonic()
        self.bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(unit=" docs", desc="preprocess", file=sys.stderr)
            except ImportError:
                self.bar = None
        self.documents = self.tokens = 0

    def __call__(self, documents: int, tokens: int) -> None:
        """Record the running totals."""
        if self.bar is not None:
            self.bar.update(documents - self.documents)
        self.documents, self.tokens = documents, tokens
        now = time.monotonic()
        if self.enabled and self.bar is None and now - self.last >= LOG_EVERY_SECONDS:
            self.last = now
            logger.info(
                "%d documents, %d tokens (%.0f tokens/s)", documents, tokens, tokens / (now - self.start)
            )

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer: Optional[argparse.Namespace] = None,
    json_key: str = "text",
    split_lines: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> IndexedDatasetStats:
    """Tokenize ``inputs`` into ``output_prefix.bin``/``.idx``; returns what was written.

    ``tokenizer`` holds the tokenizer flags (``tokenizers.tokenizer_args(...)``; None: the
    byte-level default). Raises :class:`DataError` for missing inputs, malformed JSONL lines and
    empty output (then no output files are left behind), ``TokenizerError`` for bad flags.
    """
    files = expand_inputs(inputs)
    tok = build_tokenizer(tokenizer)
    texts = (text for path in files for text in iter_documents(path, json_key, split_lines) if text)
    meter = Progress(progress)
    try:
        if workers > 1:
            # fork starts workers without re-importing Megatron; spawn where fork is unavailable.
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with context.Pool(
                workers, initializer=init_worker_tokenizer, initargs=(tokenizer_settings(tokenizer),)
            ) as pool:
                documents = pool.imap(tokenize_in_worker, texts, chunksize=64)
                stats = write_indexed_dataset(documents, output_prefix, tok.vocab_size, tok.eod, meter)
        else:
            documents = (tok.tokenize(text) for text in texts)
            stats = write_indexed_dataset(documents, output_prefix, tok.vocab_size, tok.eod, meter)
    except DataError as err:
        if str(err).startswith("No documents"):
            raise DataError(
                f"No documents in {', '.join(map(str, files))} (all empty); nothing written to "
                f"{output_prefix}.bin/.idx."
            ) from err
        raise
    finally:
        meter.close()
    logger.info(
        "Wrote %s.bin/.idx: %d documents, %d tokens (%s) from %d files",
        stats.prefix,
        stats.documents,
        stats.tokens,
        stats.dtype,
        len(files),
    )
    return stats


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="Input files or glob patterns.")
    parser.add_argument("--output-prefix", required=True, help="Writes PREFIX.bin and PREFIX.idx.")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text (default: text).")
    parser.add_argument(
        "--split-lines", action="store_true", help="Text files: one document per non-empty line."
    )
    parser.add_argument("--workers", type=int, default=1, help="Tokenizer processes (default 1).")
    parser.add_argument("--quiet", action="store_true", help="No progress output.")
    add_tokenizer_args(parser)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (2 on a data error, with the message on stderr)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.workers < 1:
        print("error: --workers must be >= 1", file=sys.stderr)
        return 2
    try:
        preprocess(
            args.input,
            args.output_prefix,
            tokenizer=args,
            json_key=args.json_key,
            split_lines=args.split_lines,
            workers=args.workers,
            progress=not args.quiet,
        )
    except (DataError, TokenizerError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

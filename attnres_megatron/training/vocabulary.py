"""The model's vocabulary: the tokenizer's, padded by Megatron-LM's rule, checked against the data.

The padded size is a multiple of ``--make-vocab-size-divisible-by`` x
``--tensor-model-parallel-size`` (Megatron-LM's rule; the extra ids are never produced by the
tokenizer). ``attnres-pretrain`` decides it once at start-up (:func:`prepare_vocabulary`), keeps
it in ``args.padded_vocab_size`` (saved with the run's arguments in every checkpoint, so
``--load`` and ``tools/plot_depth_attention.py`` rebuild the same model) and, before any work,
refuses data files holding ids outside the tokenizer's vocabulary.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from attnres_megatron.training.data import DataError, check_prefixes, parse_blend, read_index_header
from attnres_megatron.training.tokenizers import DatasetTokenizer, TokenizerError, build_tokenizer

CHUNK_TOKENS = 1 << 24  # tokens read per vectorised min/max over a memory-mapped .bin


class VocabularyError(ValueError):
    """A vocabulary that does not fit the data or the checkpoint, naming the fix."""


def vocab_size_with_padding(vocab_size: int, divisible_by: int, tensor_parallel_size: int = 1) -> int:
    """The smallest multiple of ``divisible_by`` x ``tensor_parallel_size`` >= ``vocab_size``."""
    if vocab_size < 1 or divisible_by < 1 or tensor_parallel_size < 1:
        raise VocabularyError(
            f"vocabulary padding needs positive sizes; got vocabulary {vocab_size}, --make-vocab-size-"
            f"divisible-by {divisible_by}, --tensor-model-parallel-size {tensor_parallel_size}."
        )
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def padded_vocab_size(args: Any) -> int:
    """The model's vocabulary for ``args``: its tokenizer's, padded (the one place that decides it)."""
    if args.make_vocab_size_divisible_by < 1:
        raise VocabularyError(
            f"--make-vocab-size-divisible-by must be >= 1; got {args.make_vocab_size_divisible_by}."
        )
    return vocab_size_with_padding(
        build_tokenizer(args).vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
    )


def token_dtype(prefix: str) -> np.dtype:
    """The token dtype in the header of ``prefix.idx`` (Megatron's indexed dataset)."""
    return read_index_header(f"{prefix}.idx").dtype


def token_id_range(prefix: str) -> Optional[tuple[int, int]]:
    """(smallest, largest) token id in ``prefix.bin`` (None when empty), by a chunked vectorised pass."""
    dtype = token_dtype(prefix)
    if os.path.getsize(f"{prefix}.bin") < dtype.itemsize:
        return None
    tokens = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r")
    low, high = np.iinfo(dtype).max, np.iinfo(dtype).min
    for start in range(0, tokens.size, CHUNK_TOKENS):
        chunk = tokens[start : start + CHUNK_TOKENS]
        low, high = min(low, int(chunk.min())), max(high, int(chunk.max()))
    return int(low), int(high)


def fits_without_reading(prefix: str, vocab_size: int) -> bool:
    """Whether the token dtype of ``prefix`` cannot hold an id outside ``[0, vocab_size)``."""
    info = np.iinfo(token_dtype(prefix))
    return info.min >= 0 and info.max < vocab_size


def check_data_vocabulary(prefixes: Sequence[str], tokenizer: DatasetTokenizer) -> None:
    """Raise :class:`VocabularyError` naming each data file with ids outside the tokenizer's vocabulary."""
    vocab = tokenizer.vocab_size
    problems = []
    for prefix in prefixes:
        if fits_without_reading(prefix, vocab):
            continue
        span = token_id_range(prefix)
        if span is not None and (span[0] < 0 or span[1] >= vocab):
            problems.append(f"data file {prefix} holds ids {span[0]}..{span[1]}")
    if problems:
        raise VocabularyError(
            f"token ids outside the vocabulary of {vocab} ids (--tokenizer-type {tokenizer.describe()}): "
            + "; ".join(problems)
            + ". The data was preprocessed with another tokenizer: pass the --tokenizer-type/"
            "--tokenizer-model (and --vocab-size) it was made with, or preprocess it again with this "
            "one (tools/preprocess_data.py)."
        )


def checkpoint_vocab_size(load_dir: str) -> Optional[int]:
    """The padded vocabulary saved with the latest checkpoint under ``load_dir`` (None if unknown)."""
    from megatron.core import dist_checkpointing

    from attnres_megatron.training.checkpointing import READ_ERRORS, iteration_dir, latest_iteration

    try:
        path = iteration_dir(load_dir, latest_iteration(load_dir))
        common = dist_checkpointing.load_common_state_dict(path)
    except READ_ERRORS:
        return None  # the load itself reports what is wrong with the checkpoint
    saved = common.get("args") if isinstance(common, dict) else None
    value = saved.get("padded_vocab_size") if isinstance(saved, dict) else None
    return value if isinstance(value, int) else None


def prepare_vocabulary(args: argparse.Namespace) -> int:
    """Start-up, before any work: build the tokenizer, set ``args.padded_vocab_size``, check the
    ``--data-path`` files and the ``--load`` checkpoint against it; exits with the error."""
    try:
        tokenizer = build_tokenizer(args)
        args.padded_vocab_size = padded_vocab_size(args)
        if args.tokenizer_model:  # saved with the run's arguments: absolute, for --load and tools
            args.tokenizer_model = os.path.abspath(os.path.expanduser(args.tokenizer_model))
        if args.data_path and not getattr(args, "mock_data", False):
            prefixes, _ = parse_blend(args.data_path)
            check_prefixes(prefixes)
            check_data_vocabulary(prefixes, tokenizer)
        saved = checkpoint_vocab_size(args.load) if args.load else None
        if saved is not None and saved != args.padded_vocab_size:
            raise VocabularyError(
                f"--load {args.load} holds a model with a vocabulary of {saved} ids, but "
                f"--tokenizer-type {tokenizer.describe()} padded to a multiple of "
                f"--make-vocab-size-divisible-by {args.make_vocab_size_divisible_by} x "
                f"--tensor-model-parallel-size {args.tensor_model_parallel_size} gives "
                f"{args.padded_vocab_size}: pass the saving run's tokenizer flags."
            )
    except (TokenizerError, VocabularyError, DataError) as error:
        raise SystemExit(f"error: {error}") from None
    return args.padded_vocab_size

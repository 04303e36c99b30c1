"""Megatron-Core tokenizers (``megatron.core.tokenizers``) behind Megatron-LM's tokenizer flags.

``--tokenizer-type`` names the tokenizer as Megatron-LM does and picks a Megatron-Core library:

* ``ByteLevelTokenizer`` (default; Megatron-Core's ``byte-level`` library, which Megatron-LM has
  no type name for): UTF-8 bytes are the ids, NUL (0) ends a document, vocabulary 256 (or
  ``--vocab-size`` >= 256). Needs no file and no download; the built-in corpus uses it.
* ``HuggingFaceTokenizer``: ``--tokenizer-model`` is a pretrained tokenizer directory or a
  ``tokenizer.json`` file, read by transformers' ``AutoTokenizer`` (local paths only).
* ``TikTokenizer``: ``--tokenizer-model`` is Megatron's tiktoken JSON (a list of
  ``{"rank", "token_bytes", "token_str"}``); ``--tiktoken-pattern``,
  ``--tiktoken-num-special-tokens`` and ``--vocab-size`` (special tokens included).
* ``SentencePieceTokenizer``, ``GPTSentencePieceTokenizer``, ``Llama2Tokenizer``: a
  SentencePiece ``.model`` file in ``--tokenizer-model``.
* ``NullTokenizer``: ``--vocab-size N``: ids are the numbers in the text, ``N`` ends a document.

:class:`DatasetTokenizer` adapts the Megatron-Core tokenizer to what ``GPTDataset`` and
``tools/preprocess_data.py`` use. The padded vocabulary of the model is decided in
``vocabulary.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from attnres_megatron.training.corpus import BYTE_VOCAB_SIZE

BYTE_LEVEL = "ByteLevelTokenizer"
DEFAULT_TOKENIZER_TYPE = BYTE_LEVEL
BYTE_EOD = 0  # NUL ends a document, as in the built-in corpus
NO_PAD = -1  # Megatron-Core's id for "no padding token": documents hold no padding

# Megatron-LM's --tokenizer-type names (plus ByteLevelTokenizer) -> Megatron-Core library.
LIBRARIES = {
    BYTE_LEVEL: "byte-level",
    "HuggingFaceTokenizer": "huggingface",
    "TikTokenizer": "tiktoken",
    "SentencePieceTokenizer": "sentencepiece",
    "GPTSentencePieceTokenizer": "sentencepiece",
    "Llama2Tokenizer": "sentencepiece",
    "NullTokenizer": "null",
}
PACKAGES = {"huggingface": "transformers", "tiktoken": "tiktoken", "sentencepiece": "sentencepiece"}
TAKES_VOCAB_SIZE = (BYTE_LEVEL, "TikTokenizer", "NullTokenizer")
# End-of-document tokens looked for when a Hugging Face tokenizer names no eos_token.
EOD_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>")
# Files larger than this (model weights in a model directory) count by size only in the digest.
DIGEST_MAX_FILE_BYTES = 64 << 20
TOKENIZER_FLAGS = (
    "tokenizer_type",
    "tokenizer_model",
    "vocab_size",
    "tiktoken_pattern",
    "tiktoken_num_special_tokens",
)
INSTALL_HINT = "pip install 'attnres-megatron[tokenizers]'"


class TokenizerError(ValueError):
    """A tokenizer flag problem, with a message naming the flag and the fix."""


class _ReplacedFlag(argparse.Action):
    """``--tokenizer`` (removed): refuse it, naming the flags that replace it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: Any = None):
        parser.error(
            "--tokenizer was replaced by Megatron-LM's --tokenizer-type and --tokenizer-model: "
            f"'--tokenizer byte' is the default (--tokenizer-type {BYTE_LEVEL}); a tokenizer.json is "
            "'--tokenizer-type HuggingFaceTokenizer --tokenizer-model PATH'."
        )


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add Megatron-LM's tokenizer flags (and the refusal of the removed ``--tokenizer``)."""
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type",
        choices=tuple(LIBRARIES),
        default=DEFAULT_TOKENIZER_TYPE,
        help=f"Megatron-Core tokenizer; {BYTE_LEVEL}: UTF-8 bytes, NUL ends a document, no file.",
    )
    group.add_argument(
        "--tokenizer-model",
        default=None,
        help="Tokenizer file or directory: a Hugging Face tokenizer.json or pretrained directory, a "
        "tiktoken JSON, a SentencePiece .model (local paths; tools/train_tokenizer.py makes one).",
    )
    group.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help=f"Vocabulary before padding, for {', '.join(TAKES_VOCAB_SIZE)} "
        f"(byte-level default {BYTE_VOCAB_SIZE}; NullTokenizer adds its end-of-document id).",
    )
    group.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="Pad the model's vocabulary to a multiple of this x --tensor-model-parallel-size.",
    )
    group.add_argument(
        "--tiktoken-pattern", choices=("v1", "v2"), default=None, help="TikTokenizer split (unset: v2)."
    )
    group.add_argument(
        "--tiktoken-num-special-tokens",
        type=int,
        default=1000,
        help="TikTokenizer: ids reserved for special tokens before the ranks.",
    )
    group.add_argument("--tokenizer", nargs="?", action=_ReplacedFlag, help=argparse.SUPPRESS)
    return parser


def tokenizer_args(**flags: Any) -> argparse.Namespace:
    """The tokenizer flags' defaults, updated with ``flags`` (for tools and tests)."""
    args = add_tokenizer_args(argparse.ArgumentParser(add_help=False)).parse_args([])
    for name, value in flags.items():
        if not hasattr(args, name):
            raise TypeError(f"tokenizer_args() got an unknown flag {name!r}")
        setattr(args, name, value)
    return args


def tokenizer_settings(args: Optional[Any] = None) -> argparse.Namespace:
    """The flags that building a tokenizer reads (defaults for None): picklable, for workers."""
    defaults = tokenizer_args()
    return argparse.Namespace(
        **{name: getattr(args, name, getattr(defaults, name)) for name in TOKENIZER_FLAGS}
    )


class DatasetTokenizer:
    """A Megatron-Core tokenizer as ``GPTDataset`` and preprocessing use it."""

    # ``pad`` is NO_PAD: documents never hold padding (Megatron-Core's byte-level pad id would be
    # a real byte, which GPTDataset would then overwrite). ``unique_identifiers`` (hashed into
    # cached dataset indices) name the type, the absolute model path and a digest of its
    # contents, so a retrained tokenizer at the same path gets new caches.

    def __init__(self, tokenizer: Any, settings: argparse.Namespace, model_path: Optional[Path]) -> None:
        self.tokenizer = tokenizer
        self.tokenizer_type: str = settings.tokenizer_type
        self._vocab_size = int(tokenizer.vocab_size)
        self._eod = int(tokenizer.eod)
        self.unique_identifiers: dict[str, Any] = {
            "class": type(self).__name__,
            "tokenizer_type": self.tokenizer_type,
            "vocab_size": self._vocab_size,
            "eod": self._eod,
        }
        if model_path is not None:
            self.unique_identifiers["tokenizer_model"] = str(model_path)
            self.unique_identifiers["model_digest"] = _digest(model_path)
        if self.tokenizer_type == "TikTokenizer":
            self.unique_identifiers["tiktoken_pattern"] = settings.tiktoken_pattern or "v2"
            self.unique_identifiers["tiktoken_num_special_tokens"] = settings.tiktoken_num_special_tokens

    @property
    def vocab_size(self) -> int:
        """Ids are in ``[0, vocab_size)`` (special tokens included, before padding)."""
        return self._vocab_size

    @property
    def eod(self) -> int:
        """The end-of-document id appended after every document."""
        return self._eod

    @property
    def pad(self) -> int:
        """``NO_PAD``: no id in the data is padding."""
        return NO_PAD

    @property
    def is_byte_level(self) -> bool:
        """Whether ids are the UTF-8 bytes of the text."""
        return self.tokenizer_type == BYTE_LEVEL

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-document id)."""
        return [int(i) for i in self.tokenizer.tokenize(text)]

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        return self.tokenizer.detokenize([int(i) for i in ids])

    def describe(self) -> str:
        """``TYPE (MODEL)`` for messages."""
        model = self.unique_identifiers.get("tokenizer_model")
        return f"{self.tokenizer_type}" + (f" ({model})" if model else "")

    def __repr__(self) -> str:
        return f"DatasetTokenizer({self.describe()}, vocab_size={self.vocab_size}, eod={self.eod})"


def _digest(path: Path) -> str:
    """A short content digest of a tokenizer file or directory (large files by size only)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path) if file != path else file.name}:{size}\n".encode())
        if size <= DIGEST_MAX_FILE_BYTES:
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _check_settings(settings: argparse.Namespace) -> Optional[Path]:
    """Validate the flags of ``settings``; the absolute ``--tokenizer-model`` path (or None)."""
    kind, library = settings.tokenizer_type, LIBRARIES.get(settings.tokenizer_type)
    if library is None:
        raise TokenizerError(f"--tokenizer-type {kind} is not one of {', '.join(LIBRARIES)}.")
    vocab = settings.vocab_size
    if vocab is not None and kind not in TAKES_VOCAB_SIZE:
        raise TokenizerError(
            f"--vocab-size is for {', '.join(TAKES_VOCAB_SIZE)}; the vocabulary of --tokenizer-type "
            f"{kind} comes from --tokenizer-model: drop --vocab-size."
        )
    if kind == BYTE_LEVEL and vocab is not None and vocab < BYTE_VOCAB_SIZE:
        raise TokenizerError(f"--vocab-size {vocab} is below {BYTE_LEVEL}'s {BYTE_VOCAB_SIZE} bytes.")
    if kind == "NullTokenizer" and (vocab is None or vocab < 1):
        raise TokenizerError("--tokenizer-type NullTokenizer needs --vocab-size N (N >= 1).")
    package = PACKAGES.get(library)
    if package and importlib.util.find_spec(package) is None:
        raise TokenizerError(f"--tokenizer-type {kind} needs the '{package}' package: {INSTALL_HINT}.")
    if library in ("byte-level", "null"):
        if settings.tokenizer_model is not None:
            raise TokenizerError(f"--tokenizer-type {kind} reads no file: drop --tokenizer-model.")
        return None
    if not settings.tokenizer_model:
        raise TokenizerError(f"--tokenizer-type {kind} needs --tokenizer-model PATH (a local path).")
    path = Path(settings.tokenizer_model).expanduser().resolve()
    if not path.exists():
        raise TokenizerError(
            f"--tokenizer-model {settings.tokenizer_model}: no such file or directory (only local "
            "tokenizers are read; tools/train_tokenizer.py trains a Hugging Face one)."
        )
    if library != "huggingface" and not path.is_file():
        raise TokenizerError(f"--tokenizer-model {settings.tokenizer_model} must be a file for {kind}.")
    if kind == "TikTokenizer":
        _check_tiktoken_sizes(settings, path)
    return path


def _check_tiktoken_sizes(settings: argparse.Namespace, path: Path) -> None:
    """The ranks file has enough entries for ``--vocab-size`` minus the special tokens."""
    from megatron.core.tokenizers.text.libraries.tiktoken_tokenizer import DEFAULT_TIKTOKEN_MAX_VOCAB

    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        entries = None
    if not isinstance(entries, list):
        raise TokenizerError(
            f"--tokenizer-model {path} is not a tiktoken JSON (a list of rank, token_bytes, token_str)."
        )
    ranks = len(entries)
    special = settings.tiktoken_num_special_tokens
    vocab = settings.vocab_size or DEFAULT_TIKTOKEN_MAX_VOCAB
    if not 0 < special < vocab <= special + ranks:
        raise TokenizerError(
            f"TikTokenizer: --vocab-size {vocab} must exceed --tiktoken-num-special-tokens {special} "
            f"and be at most it plus the {ranks} ranks of {path} (e.g. --vocab-size {special + ranks})."
        )


def _library_kwargs(settings: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of the Megatron-Core library, from the flags (as Megatron-LM passes them)."""
    kind = settings.tokenizer_type
    if kind == BYTE_LEVEL:
        return {"vocab_size": settings.vocab_size or BYTE_VOCAB_SIZE, "_eos_id": BYTE_EOD}
    if kind == "NullTokenizer":
        return {"vocab_size": settings.vocab_size}
    if kind == "TikTokenizer":
        kwargs = {"num_special_tokens": settings.tiktoken_num_special_tokens}
        if settings.tiktoken_pattern:
            kwargs["pattern"] = settings.tiktoken_pattern
        if settings.vocab_size:
            kwargs["vocab_size"] = settings.vocab_size
        return kwargs
    return {}


def _from_pretrained(settings: argparse.Namespace, path: Optional[Path]) -> Any:
    """``MegatronTokenizer.from_pretrained`` for the flags (a lone tokenizer.json via a directory)."""
    # AutoTokenizer reads directories (a file path is taken for a hub name): a tokenizer.json file
    # is read from a temporary directory that holds only a link to it.
    from megatron.core.tokenizers import MegatronTokenizer

    metadata = {"library": LIBRARIES[settings.tokenizer_type]}
    kwargs = _library_kwargs(settings)
    if path is None:
        return MegatronTokenizer.from_pretrained(metadata_path=metadata, **kwargs)
    if metadata["library"] != "huggingface" or path.is_dir():
        return MegatronTokenizer.from_pretrained(tokenizer_path=str(path), metadata_path=metadata, **kwargs)
    with tempfile.TemporaryDirectory(prefix="attnres-tokenizer-") as directory:
        os.symlink(path, os.path.join(directory, "tokenizer.json"))
        return MegatronTokenizer.from_pretrained(tokenizer_path=directory, metadata_path=metadata, **kwargs)


def _ensure_eod(tokenizer: Any, settings: argparse.Namespace) -> None:
    """Give a Hugging Face tokenizer without an ``eos_token`` the first known EOD token it has."""
    if tokenizer.eod is not None:
        return
    if settings.tokenizer_type == "HuggingFaceTokenizer":
        vocab = tokenizer._tokenizer.tokenizer.get_vocab()
        for name in EOD_TOKENS:
            if name in vocab:
                tokenizer._tokenizer.add_special_tokens({"eos_token": name})
                return
    raise TokenizerError(
        f"--tokenizer-model {settings.tokenizer_model} has no end-of-document token: set eos_token in "
        f"its tokenizer_config.json or add one of {', '.join(EOD_TOKENS)} (tools/train_tokenizer.py "
        "adds <|endoftext|>)."
    )


_CACHE: dict[tuple, DatasetTokenizer] = {}


def build_tokenizer(args: Optional[Any] = None) -> DatasetTokenizer:
    """The tokenizer the flags in ``args`` name (None: the default), built once per process."""
    settings = tokenizer_settings(args)
    key = tuple(getattr(settings, name) for name in TOKENIZER_FLAGS)
    if key not in _CACHE:
        path = _check_settings(settings)
        try:
            tokenizer = _from_pretrained(settings, path)
        except (AssertionError, ValueError, OSError, KeyError, RuntimeError) as err:
            raise TokenizerError(
                f"--tokenizer-type {settings.tokenizer_type} --tokenizer-model {settings.tokenizer_model}: "
                f"Megatron-Core could not build the tokenizer: {err or type(err).__name__}"
            ) from err
        _ensure_eod(tokenizer, settings)
        _CACHE[key] = DatasetTokenizer(tokenizer, settings, path)
    return _CACHE[key]


# Worker-process helpers for multiprocessing pools (importable, so any start method works).
_WORKER_TOKENIZER: Optional[DatasetTokenizer] = None


def init_worker_tokenizer(settings: argparse.Namespace) -> None:
    """Pool initializer: build the tokenizer of ``settings`` once in this worker process."""
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = build_tokenizer(settings)


def tokenize_in_worker(text: str) -> list[int]:
    """Tokenize ``text`` with the tokenizer built by :func:`init_worker_tokenizer`."""
    if _WORKER_TOKENIZER is None:
        raise RuntimeError("init_worker_tokenizer() has not run in this process.")
    return _WORKER_TOKENIZER.tokenize(text)

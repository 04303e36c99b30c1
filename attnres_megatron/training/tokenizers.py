"""Tokenizers for the Megatron-Core dataset stack (``GPTDataset`` and the preprocessing tool).

``GPTDataset`` needs only a small part of Megatron's tokenizer interface: ``.eod`` (the
end-of-document id), ``.vocab_size``, optionally ``.pad``, and ``.unique_identifiers`` (a
JSON-serialisable dict hashed into the names of the cached dataset indices). The
preprocessing tool also needs ``.tokenize(text) -> list[int]``; ``.detokenize(ids)`` is the
inverse. Every tokenizer here provides all of these.

End of document for the byte tokenizer: by default ``ByteTokenizer`` reuses byte 0 (NUL) as
the end-of-document id, so the vocabulary stays 256 (the model's current ``BYTE_VOCAB_SIZE``;
tokens are stored as ``uint8``) and documents are separated exactly like
``corpus.load_stdlib_corpus`` separates them. NUL bytes essentially never occur in text; a
document that does contain one gets a spurious document boundary there (it only matters with
``reset_position_ids``/``reset_attention_mask``/``eod_mask_loss``). ``ByteTokenizer(eod_id=256)``
(spec ``"byte-eod256"``) gives a dedicated id instead: vocabulary 257, stored as ``uint16``.

``load_tokenizer(spec)`` accepts ``"byte"``, ``"byte-eod256"``, a local Hugging Face
``tokenizers`` JSON file (``tokenizer.json``) or a local tiktoken BPE ranks file
(``*.tiktoken``). Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

BYTE_EOD_NUL = 0
BYTE_EOD_DEDICATED = 256

# Names tried, in order, for the end-of-document token of a Hugging Face or tiktoken tokenizer.
EOD_TOKEN_CANDIDATES = (
    "<|endoftext|>",
    "</s>",
    "<|end_of_text|>",
    "<eos>",
    "<|eos|>",
    "[SEP]",
    "<|im_end|>",
)


@runtime_checkable
class TokenizerLike(Protocol):
    """What the dataset code in this package relies on (a subset of ``MegatronTokenizer``)."""

    unique_identifiers: dict[str, Any]

    @property
    def vocab_size(self) -> int:  # pragma: no cover - protocol
        """The number of token ids (all ids are in ``[0, vocab_size)``)."""
        ...

    @property
    def eod(self) -> int:  # pragma: no cover - protocol
        """The end-of-document id appended after every document."""
        ...

    def tokenize(self, text: str) -> list[int]:  # pragma: no cover - protocol
        """Token ids of ``text`` (no end-of-document id)."""
        ...

    def detokenize(self, ids: Sequence[int]) -> str:  # pragma: no cover - protocol
        """Text of ``ids``."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens, with ``eod_id`` as the end-of-document id.

    ``eod_id=0`` (default): NUL doubles as end of document, ``vocab_size == 256``.
    ``eod_id=256``: a dedicated id, ``vocab_size == 257``.
    """

    def __init__(self, eod_id: int = BYTE_EOD_NUL) -> None:
        if eod_id not in (BYTE_EOD_NUL, BYTE_EOD_DEDICATED):
            raise ValueError(
                f"ByteTokenizer eod_id must be {BYTE_EOD_NUL} (NUL, vocabulary 256) or "
                f"{BYTE_EOD_DEDICATED} (dedicated id, vocabulary 257); got {eod_id}."
            )
        self._eod = eod_id
        self._vocab_size = 256 if eod_id == BYTE_EOD_NUL else 257
        self.unique_identifiers: dict[str, Any] = {"class": type(self).__name__, "eod": eod_id}

    @property
    def vocab_size(self) -> int:
        """256 with the NUL end of document, 257 with the dedicated one."""
        return self._vocab_size

    @property
    def eod(self) -> int:
        """The end-of-document id."""
        return self._eod

    @property
    def eos(self) -> int:
        """Alias of :attr:`eod` (some Megatron code asks for ``eos``)."""
        return self._eod

    def tokenize(self, text: str | bytes) -> list[int]:
        """UTF-8 bytes of ``text`` (``bytes`` are taken as they are)."""
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        return list(data)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Decode ids as UTF-8 (invalid sequences replaced); the dedicated EOD id is dropped."""
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(eod_id={self._eod})"


def _find_eod(lookup: Any, candidates: Sequence[str], explicit: Optional[str], where: str) -> int:
    """The id of ``explicit`` or of the first known end-of-document token that ``lookup`` knows."""
    names = [explicit] if explicit else list(candidates)
    for name in names:
        token_id = lookup(name)
        if token_id is not None:
            return int(token_id)
    raise ValueError(
        f"{where} has none of the end-of-document tokens {names}; name the token with "
        f"load_tokenizer(..., eod_token='...')."
    )


class _FileTokenizer:
    """What the file-backed tokenizers share: path, vocabulary size, EOD id, identifiers."""

    def _describe(self, path: str | os.PathLike, vocab_size: int, eod: int) -> None:
        self.path = str(path)
        self._vocab_size = vocab_size
        self._eod = eod
        self.unique_identifiers: dict[str, Any] = {
            "class": type(self).__name__,
            "path": os.path.abspath(self.path),
            "eod": self._eod,
        }

    @property
    def vocab_size(self) -> int:
        """Vocabulary size, special tokens included."""
        return self._vocab_size

    @property
    def eod(self) -> int:
        """The end-of-document id."""
        return self._eod


class HuggingFaceJSONTokenizer(_FileTokenizer):
    """A local Hugging Face ``tokenizers`` JSON file (``tokenizer.json``); needs ``tokenizers``."""

    def __init__(self, path: str | os.PathLike, eod_token: Optional[str] = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ImportError(
                f"Reading the Hugging Face tokenizer file {path} needs the 'tokenizers' package: "
                f"pip install tokenizers (or use --tokenizer byte)."
            ) from err
        self._tokenizer = Tokenizer.from_file(str(path))
        self._describe(
            path,
            int(self._tokenizer.get_vocab_size(with_added_tokens=True)),
            _find_eod(self._tokenizer.token_to_id, EOD_TOKEN_CANDIDATES, eod_token, str(path)),
        )

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens added by a post-processor."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


class TiktokenBPETokenizer(_FileTokenizer):
    """A local tiktoken BPE ranks file (base64 token and rank per line); needs ``tiktoken``.

    The GPT-4 (``cl100k_base``) split pattern is used unless ``pattern`` is given. The
    end-of-document token ``<|endoftext|>`` (or ``eod_token``) is added after the ranks.
    """

    CL100K_PATTERN = (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
        r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
    )

    def __init__(
        self,
        path: str | os.PathLike,
        eod_token: Optional[str] = None,
        pattern: Optional[str] = None,
    ) -> None:
        try:
            import tiktoken
            from tiktoken.load import load_tiktoken_bpe
        except ImportError as err:
            raise ImportError(
                f"Reading the tiktoken BPE file {path} needs the 'tiktoken' package: pip install "
                f"tiktoken (or use --tokenizer byte)."
            ) from err
        ranks = load_tiktoken_bpe(str(path))
        eod = len(ranks)
        self._encoding = tiktoken.Encoding(
            name=Path(path).stem,
            pat_str=pattern or self.CL100K_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={eod_token or "<|endoftext|>": eod},
        )
        self._describe(path, int(self._encoding.n_vocab), eod)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token text in documents is encoded as ordinary text."""
        return list(self._encoding.encode_ordinary(text))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        return self._encoding.decode([int(i) for i in ids])


def _looks_like_hf_json(path: Path) -> bool:
    """Whether ``path`` is a JSON document with a ``model`` entry (a ``tokenizers`` file)."""
    if path.suffix.lower() != ".json":
        return False
    try:
        with path.open("r", encoding="utf-8") as stream:
            return "model" in json.load(stream)
    except (OSError, ValueError):
        return False


def load_tokenizer(spec: str | TokenizerLike = "byte", eod_token: Optional[str] = None) -> TokenizerLike:
    """A tokenizer from ``spec``; nothing is downloaded.

    ``spec`` is ``"byte"`` (bytes, NUL as end of document, vocabulary 256), ``"byte-eod256"``
    (bytes, end-of-document id 256, vocabulary 257), the path of a local Hugging Face
    ``tokenizers`` JSON file (``tokenizer.json``, or a directory holding one), the path of a
    local tiktoken BPE ranks file, or an already-built tokenizer (returned as is).
    ``eod_token`` names the end-of-document token of a file-based tokenizer.
    """
    if not isinstance(spec, str):
        return spec
    name = spec.strip()
    if name.lower() in ("byte", "bytes"):
        return ByteTokenizer(BYTE_EOD_NUL)
    if name.lower() in ("byte-eod256", "byte257"):
        return ByteTokenizer(BYTE_EOD_DEDICATED)
    path = Path(name).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(
            f"Tokenizer {spec!r} is neither 'byte', 'byte-eod256' nor an existing file. Give a local "
            f"Hugging Face tokenizer.json or a tiktoken BPE file (nothing is downloaded)."
        )
    if not path.is_file():
        raise ValueError(f"Tokenizer path {path} is not a file (and holds no tokenizer.json).")
    if _looks_like_hf_json(path):
        return HuggingFaceJSONTokenizer(path, eod_token=eod_token)
    if path.suffix.lower() == ".json":
        raise ValueError(
            f"{path} is not a Hugging Face 'tokenizers' JSON file (no 'model' entry); only "
            f"tokenizer.json files are supported, not vocab.json/merges.txt pairs."
        )
    return TiktokenBPETokenizer(path, eod_token=eod_token)


# Worker-process helpers for multiprocessing pools (importable, so any start method works).
_WORKER_TOKENIZER: Optional[TokenizerLike] = None


def init_worker_tokenizer(spec: str) -> None:
    """Pool initializer: load the tokenizer ``spec`` once in this worker process."""
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(spec)


def tokenize_in_worker(text: str) -> list[int]:
    """Tokenize ``text`` with the tokenizer loaded by :func:`init_worker_tokenizer`."""
    if _WORKER_TOKENIZER is None:
        raise RuntimeError("init_worker_tokenizer() has not run in this process.")
    return _WORKER_TOKENIZER.tokenize(text)

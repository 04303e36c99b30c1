"""Train a byte-level BPE tokenizer (Hugging Face ``tokenizers``) for attnres-pretrain.

The text is the built-in corpus (the Python standard library's sources, whole files up to
``--corpus-bytes``) or the given ``--input`` files (UTF-8 text, or JSONL with ``--json-key``).
The tokenizer splits like GPT-2 (byte-level pre-tokenizer, so any text encodes without unknown
tokens), learns merges up to ``--vocab-size`` ids (the 256 bytes and ``<|endoftext|>``, id 0,
included) and is written as a pretrained tokenizer directory: ``tokenizer.json`` plus a
``tokenizer_config.json`` naming ``<|endoftext|>`` as its end-of-document (eos) token. Pass the
directory (or its ``tokenizer.json``) to ``attnres-pretrain`` and ``tools/preprocess_data.py`` with
``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``.

Example::

    python tools/train_tokenizer.py --vocab-size 1000 --output runs/bpe1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "tools"):  # the package, and preprocess_data for --input
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

EOD_TOKEN = "<|endoftext|>"
MIN_VOCAB_SIZE = 257  # the 256 bytes and the end-of-document token


def corpus_texts(max_bytes: int) -> Iterator[str]:
    """The built-in corpus: standard-library sources, whole files up to ``max_bytes``."""
    with warnings.catch_warnings():  # the package imports Megatron-Core, which warns about apex/TE
        warnings.simplefilter("ignore")
        from attnres_megatron.training.corpus import stdlib_source_files

    total = 0
    for path in stdlib_source_files():
        size = path.stat().st_size
        if total and total + size > max_bytes:
            return
        total += size
        yield path.read_text(encoding="utf-8", errors="replace")


def file_texts(patterns: Sequence[str], json_key: str) -> Iterator[str]:
    """Documents of the ``--input`` files, read as ``tools/preprocess_data.py`` reads them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from preprocess_data import expand_inputs, iter_documents

    for path in expand_inputs(patterns):
        yield from iter_documents(path, json_key)


def train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE ``tokenizers.Tokenizer`` of ``vocab_size`` ids trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_pretrained(tokenizer, output: Path) -> None:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` naming the eos token into ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOD_TOKEN,
        "eos_token": EOD_TOKEN,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    (output / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, required=True, help="Ids in all (>= 257).")
    parser.add_argument("--output", type=Path, required=True, help="Directory to write the tokenizer to.")
    parser.add_argument(
        "--input", nargs="+", default=None, help="Text/JSONL files or globs (default: the built-in corpus)."
    )
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text (default: text).")
    parser.add_argument(
        "--corpus-bytes", type=int, default=8 << 20, help="Bytes of the built-in corpus to train on."
    )
    parser.add_argument("--min-frequency", type=int, default=2, help="Fewest occurrences of a merged pair.")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (2 with a message on bad input)."""
    args = parse_args(argv)
    if args.vocab_size < MIN_VOCAB_SIZE:
        print(f"error: --vocab-size must be >= {MIN_VOCAB_SIZE} (bytes and {EOD_TOKEN}).", file=sys.stderr)
        return 2
    if args.corpus_bytes < 1 or args.min_frequency < 1:
        print("error: --corpus-bytes and --min-frequency must be >= 1.", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        texts = file_texts(args.input, args.json_key) if args.input else corpus_texts(args.corpus_bytes)
        tokenizer = train_bpe(texts, args.vocab_size, args.min_frequency)
    except (ValueError, OSError, ImportError) as err:  # a DataError names the input
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_pretrained(tokenizer, args.output)
    size = tokenizer.get_vocab_size()
    short = f" (the text has too few distinct pairs for {args.vocab_size})" if size < args.vocab_size else ""
    print(
        f"wrote {args.output}: byte-level BPE, {size} ids{short}, {EOD_TOKEN} = "
        f"{tokenizer.token_to_id(EOD_TOKEN)}, {time.perf_counter() - start:.1f} s\n"
        f"use: --tokenizer-type HuggingFaceTokenizer --tokenizer-model {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

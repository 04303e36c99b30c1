"""A real text corpus present on every machine: the Python standard library's sources.

Tokens are bytes (vocabulary 256), so no tokenizer or download is needed.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

BYTE_VOCAB_SIZE = 256


def stdlib_source_files() -> list[Path]:
    """The standard library's ``.py`` files in a fixed order (tests excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        path
        for path in sorted(root.rglob("*.py"))
        if "test" not in path.relative_to(root).parts[0] and "site-packages" not in path.parts
    ]
    if not files:
        raise FileNotFoundError(f"No Python sources found under the standard library at {root}.")
    return files


def load_stdlib_corpus(max_bytes: int = 8 << 20) -> torch.Tensor:
    """Concatenate standard-library sources (separated by a NUL byte) up to ``max_bytes``."""
    chunks, total = [], 0
    for path in stdlib_source_files():
        data = path.read_bytes() + b"\0"
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()


class TokenWindows:
    """Random ``seq_length + 1`` windows of a token stream, from a seeded generator."""

    def __init__(self, tokens: torch.Tensor, seq_length: int, seed: int):
        if tokens.numel() <= seq_length + 1:
            raise ValueError(
                f"--seq-length {seq_length} needs more than {seq_length + 1} tokens; the corpus "
                f"has {tokens.numel()}."
            )
        self.tokens = tokens
        self.seq_length = seq_length
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), each ``[batch_size, seq_length]``; the draw is the same on
        every rank, so ranks slice one global batch."""
        starts = torch.randint(
            0, self.tokens.numel() - self.seq_length - 1, (batch_size,), generator=self.generator
        )
        windows = torch.stack([self.tokens[s : s + self.seq_length + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

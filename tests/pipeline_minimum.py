"""The strict minimum of pipeline transfers, by set arithmetic over tensor identities.

Written for the tests without ``attnres_megatron.pipeline.layout``: a tensor of one
micro-batch is ``(block, sublayers accumulated)``, ``b0`` is ``(0, 0)``, and block ``k``
after its ``a``-th sublayer is ``(k, a)`` (complete at ``a = S``). A chunk starting at
sublayer ``j0 > 0`` reads ``b0``, every complete block, and the partial sum of the block
``j0`` falls in (the complete block ``j0 / S`` itself at a boundary). A rank knows a
tensor once it received or produced it; a hop carries what its receiver's rank lacks.
"""

from __future__ import annotations

from collections.abc import Sequence

Identity = tuple[int, int]


def sublayer_ranges(layers_per_chunk: Sequence[int]) -> list[tuple[int, int]]:
    """``[start, end)`` in sublayers of each chunk, in chunk order."""
    ranges, start = [], 0
    for count in layers_per_chunk:
        ranges.append((2 * start, 2 * (start + count)))
        start += count
    return ranges


def reads_at_start(start: int, block_size: int) -> set[Identity]:
    if start == 0:
        return set()
    reads = {(0, 0)} | {(block, block_size) for block in range(1, start // block_size + 1)}
    if start % block_size:
        reads.add((start // block_size + 1, start % block_size))
    return reads


def produced(start: int, end: int, block_size: int) -> set[Identity]:
    made = {(j // block_size + 1, j % block_size + 1) for j in range(start, end)}
    return made | ({(0, 0)} if start == 0 else set())


def hop_tensors(ranges: Sequence[tuple[int, int]], pipeline_size: int, block_size: int, cached: bool = True):
    """Tensors the hop into each chunk ``1 .. C-1`` carries (chunk ``c`` runs on rank ``c % P``)."""
    known: dict[int, set[Identity]] = {}
    hops = []
    for chunk, (start, end) in enumerate(ranges):
        rank = known.setdefault(chunk % pipeline_size, set())
        reads = reads_at_start(start, block_size)
        if chunk:
            hops.append(len(reads - rank) if cached else len(reads))
        rank |= reads | produced(start, end, block_size)
    return hops

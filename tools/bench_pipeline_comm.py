"""Pipeline boundary traffic of AttnRes against standard residuals (pure arithmetic, no torch).

For each (PP, V) pair the model's L layers are split evenly over the C = PP * V model chunks
(chunk ``c = vp_stage * PP + pp_rank`` runs the layers ``[c*L/C, (c+1)*L/C)``; when C does not
divide L, the ``L % C`` extra layers go to the LAST chunks, one each; Megatron's own default
split refuses such L, so those rows are a what-if). One forward micro-batch crosses C - 1
chunk boundaries ("hops"); each row counts the [s, b, h] tensors those hops carry:

* ``standard residual``: the hidden state, one tensor per hop;
* ``Full AttnRes naive``: S = 1 (every sublayer output is a source), no cache;
* ``Block naive``: every hop carries all sources the receiver needs (b0, the completed blocks
  and the current block's partial sum), no cache;
* ``Block cached``: cross-stage caching (paper Eq. 8) at the strict minimum: a rank knows a
  tensor of a micro-batch once it has received or produced it (the block its previous chunk
  ended with included), so a hop carries only the blocks its receiver's rank lacks, plus the
  partial sum. This is exactly what the plugin sends: the counts come from the plugin's own
  layout module, ``attnres_megatron/pipeline/layout.py`` (pure; loaded from its file so the
  tool does not import Megatron), and ``tests/test_pipeline.py`` checks them against the bytes
  measured under Megatron-Core's schedules;
* ``Block padded uniform``: every hop padded to the widest cached hop, what a schedule
  with one fixed p2p tensor shape must send (for V = 1 the same as padding to the widest hop).

The backward pass sends the gradients of the same tensors, so its traffic equals the
forward's. The paper's Eq. 7 (naive) and Eq. 8 (cached) are printed beside the exact
counts, with N_p = N / C (see ``paper_counts``).

Example: ``python tools/bench_pipeline_comm.py --pp 3 9 --vpp 1 3 --markdown comm.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

VARIANTS = (
    "standard residual",
    "Full AttnRes naive",
    "Block naive",
    "Block cached",
    "Block padded uniform",
)
MIB = 1 << 20
MAX_LISTED_HOPS = 8


if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))
from plan_pipeline_stages import load_layout  # noqa: E402  (one loader of the pure layout module)

layout = load_layout()
PipelineLayout = layout.PipelineLayout


def b0_hops(plan: PipelineLayout, cached: bool) -> int:
    """How many hops carry b0: all of them without the cache, else those of virtual stage 0."""
    return sum(0 in plan.blocks_received(chunk, cached) for chunk in plan.chunks[1:])


def paper_counts(num_blocks: int, pipeline_size: int, virtual_size: int) -> dict[str, float]:
    """The paper's Eq. 7 and Eq. 8 in units of [s, b, h] tensors (blocks).

    Eq. 7: C(C-1)/2 * N_p; Eq. 8: P(P-1)/2 * N_p + (V-1) * P^2 * N_p, with C = P V.
    N_p is taken as N / C, blocks produced per chunk: the paper's derivation ("the j-th
    chunk has accumulated j N_p blocks"; later transitions carry "P N_p incremental blocks")
    only adds up to N blocks with that reading. Reading N_p as N / P (blocks per physical
    stage) gives values V times larger; both are returned, the first is the one compared.
    """
    chunks = pipeline_size * virtual_size
    per_chunk = num_blocks / chunks
    per_stage = num_blocks / pipeline_size

    def eq7(n_p: float) -> float:
        return chunks * (chunks - 1) / 2 * n_p

    def eq8(n_p: float) -> float:
        return pipeline_size * (pipeline_size - 1) / 2 * n_p + (virtual_size - 1) * pipeline_size**2 * n_p

    return {
        "n_p": per_chunk,
        "eq7_naive": eq7(per_chunk),
        "eq8_cached": eq8(per_chunk),
        "n_p_per_stage": per_stage,
        "eq7_naive_np_per_stage": eq7(per_stage),
        "eq8_cached_np_per_stage": eq8(per_stage),
    }


@dataclass
class Row:
    """One (PP, V, variant) line of the table."""

    pp: int
    vpp: int
    variant: str
    chunks: int
    layers_per_chunk: list[int]
    hop_tensors: list[int]
    max_tensors_per_hop: int
    total_tensors: int
    total_bytes: int
    max_bytes_per_hop: int
    ratio_to_standard: float


@dataclass
class PaperComparison:
    """Eq. 7 / Eq. 8 beside the exact Block counts of one (PP, V) pair, with the reasons they differ."""

    pp: int
    vpp: int
    num_blocks: int
    n_p: float
    eq7_naive: float
    eq8_cached: float
    eq7_naive_np_per_stage: float
    eq8_cached_np_per_stage: float
    naive_total: int
    cached_total: int
    naive_without_b0: int
    cached_without_b0: int
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    """Everything the tool computes (written as JSON)."""

    config: dict
    tensor_bytes: int
    num_blocks: int
    rows: list[Row]
    paper: list[PaperComparison]
    skipped: list[str]
    notes: list[str]


def explain_difference(
    plan: PipelineLayout, exact_without_b0: int, paper_value: float, label: str, cached: bool = False
) -> str:
    """One sentence on why our exact count and the paper's equation differ (or that they agree)."""
    per_block = plan.sublayers_per_block
    aligned = all(chunk.start % per_block == 0 for chunk in plan.chunks[1:])
    uneven = len({chunk.end - chunk.start for chunk in plan.chunks}) > 1
    if math.isclose(exact_without_b0, paper_value):
        reason = "equal once b0 is left out" + (" (every boundary is a block boundary)" if aligned else "")
        return f"{label}: {reason}."
    reasons = []
    kept_ends = cached and any(
        chunk.end % per_block == 0 and plan.next_on_rank(chunk) is not None for chunk in plan.chunks
    )
    if kept_ends and exact_without_b0 < paper_value:
        reasons.append(
            "a rank keeps the block its previous chunk ended with (it produced it and sent it on as "
            "the partial sum), so no later hop carries it back, while the paper's P*N_p incremental "
            "blocks per later hop include it"
        )
    if not aligned:
        reasons.append(
            "some boundaries fall inside a block: the partial sum is a whole [s, b, h] tensor "
            "on the wire, while the paper charges the fraction j*N_p"
            + (
                "; a block that a rank first received as a partial sum is sent again once complete"
                if cached
                else ""
            )
        )
    if uneven:
        reasons.append("the layer split is uneven (remainder on the last chunks)")
    if not reasons:
        reasons.append("the per-chunk block count N_p is not an integer")
    return (
        f"{label}: exact {exact_without_b0} (without b0) vs paper {paper_value:g}, because "
        + "; ".join(reasons)
        + "."
    )


def compute(
    num_layers: int,
    sublayers_per_block: int,
    hidden: int,
    seq: int,
    micro_batch: int,
    bytes_per_element: int,
    pp_sizes: Sequence[int],
    vpp_sizes: Sequence[int],
) -> Report:
    """All rows, paper comparisons and notes for the given shape and (PP, V) grid."""
    if min(num_layers, sublayers_per_block, hidden, seq, micro_batch, bytes_per_element) < 1:
        raise ValueError("all sizes must be positive integers")
    tensor_bytes = seq * micro_batch * hidden * bytes_per_element
    num_blocks = layout.num_blocks(num_layers, sublayers_per_block)
    rows: list[Row] = []
    paper: list[PaperComparison] = []
    skipped: list[str] = []
    for pp in pp_sizes:
        for vpp in vpp_sizes:
            chunks = pp * vpp
            if pp < 2:
                skipped.append(f"PP={pp} V={vpp}: no pipeline boundary (PP must be >= 2); skipped.")
                continue
            if num_layers < chunks:
                skipped.append(
                    f"PP={pp} V={vpp}: {num_layers} layers cannot give each of the {chunks} chunks "
                    "at least one layer (AttnRes needs >= 1 layer per chunk); skipped."
                )
                continue
            layers = layout.even_split(num_layers, chunks)
            plan = PipelineLayout.from_layer_counts(pp, vpp, sublayers_per_block, layers)
            full = PipelineLayout.from_layer_counts(pp, vpp, 1, layers)
            widths = {
                "standard residual": [1] * (chunks - 1),
                "Full AttnRes naive": full.hop_sources(cached=False),
                "Block naive": plan.hop_sources(cached=False),
                "Block cached": plan.hop_sources(cached=True),
            }
            widths["Block padded uniform"] = [max(widths["Block cached"])] * (chunks - 1)
            standard_total = chunks - 1
            for variant in VARIANTS:
                hop = widths[variant]
                rows.append(
                    Row(
                        pp=pp,
                        vpp=vpp,
                        variant=variant,
                        chunks=chunks,
                        layers_per_chunk=layers,
                        hop_tensors=hop,
                        max_tensors_per_hop=max(hop),
                        total_tensors=sum(hop),
                        total_bytes=sum(hop) * tensor_bytes,
                        max_bytes_per_hop=max(hop) * tensor_bytes,
                        ratio_to_standard=sum(hop) / standard_total,
                    )
                )
            counts = paper_counts(num_blocks, pp, vpp)
            naive_total = sum(widths["Block naive"])
            cached_total = sum(widths["Block cached"])
            naive_wo_b0 = naive_total - b0_hops(plan, cached=False)
            cached_wo_b0 = cached_total - b0_hops(plan, cached=True)
            notes = [
                f"b0 (the embedding output) is not a block in the paper; it rides on "
                f"{b0_hops(plan, cached=False)} hops without the cache and "
                f"{b0_hops(plan, cached=True)} with it.",
                explain_difference(plan, naive_wo_b0, counts["eq7_naive"], "Eq. 7"),
                explain_difference(plan, cached_wo_b0, counts["eq8_cached"], "Eq. 8", cached=True),
            ]
            if num_layers % chunks:
                notes.append(
                    f"{num_layers} layers over {chunks} chunks is uneven ({layers}): Megatron's default "
                    "split needs L divisible by PP*V; use --decoder-first/last-pipeline-num-layers "
                    "or --pipeline-model-parallel-layout for such a split."
                )
            if 2 * num_layers % sublayers_per_block:
                notes.append(
                    f"S={sublayers_per_block} does not divide {2 * num_layers} sublayers: the last "
                    "block is partial, so Eq. 7/8's N_p (N/C) overcounts slightly."
                )
            paper.append(
                PaperComparison(
                    pp=pp,
                    vpp=vpp,
                    num_blocks=num_blocks,
                    n_p=counts["n_p"],
                    eq7_naive=counts["eq7_naive"],
                    eq8_cached=counts["eq8_cached"],
                    eq7_naive_np_per_stage=counts["eq7_naive_np_per_stage"],
                    eq8_cached_np_per_stage=counts["eq8_cached_np_per_stage"],
                    naive_total=naive_total,
                    cached_total=cached_total,
                    naive_without_b0=naive_wo_b0,
                    cached_without_b0=cached_wo_b0,
                    notes=notes,
                )
            )
    general = [
        "Counts are per micro-batch, forward; the backward sends the gradients of the same tensors "
        "(same count, same bytes).",
        "Standard residual: one hidden state per hop. AttnRes: b0, the completed blocks and the "
        "current block's partial sum the receiver lacks; a partial sum at a block boundary is the "
        "just-completed block.",
        "Block cached is the strict minimum, what the plugin sends: a rank knows a tensor of a "
        "micro-batch once it has received or produced it, including the block its previous chunk "
        "ended with (sent on as the partial sum), so no hop carries a block back to its rank.",
        "Block padded uniform: every hop padded to the widest cached hop (one fixed p2p shape).",
        "Paper N_p = N / C (blocks per chunk, the reading under which Eq. 7/8 add up to N blocks); "
        "with N_p = N / P the equations are V times larger (both are in the JSON).",
    ]
    config = {
        "layers": num_layers,
        "block_size": sublayers_per_block,
        "hidden": hidden,
        "seq": seq,
        "micro_batch": micro_batch,
        "bytes_per_element": bytes_per_element,
        "pp": list(pp_sizes),
        "vpp": list(vpp_sizes),
        "split_rule": "even; remainder layers to the last chunks",
        "cache_rule": "strict minimum: a rank knows every tensor it received or produced",
    }
    return Report(config, tensor_bytes, num_blocks, rows, paper, skipped, general)


def format_hops(hops: Sequence[int]) -> str:
    """The per-hop widths as a list when short, else ``min..max (n hops)``."""
    if len(set(hops)) == 1:
        return f"{hops[0]} (all {len(hops)})"
    if len(hops) <= MAX_LISTED_HOPS:
        return "[" + ", ".join(str(width) for width in hops) + "]"
    return f"{min(hops)}..{max(hops)} ({len(hops)} hops)"


def markdown(report: Report) -> str:
    """The report as markdown: the traffic table, the paper comparison, notes."""
    cfg = report.config
    lines = [
        f"Pipeline boundary traffic per micro-batch (forward; backward is the same): "
        f"L={cfg['layers']} layers, S={cfg['block_size']} sublayers per block -> "
        f"N={report.num_blocks} blocks + b0; one tensor = [s={cfg['seq']}, b={cfg['micro_batch']}, "
        f"h={cfg['hidden']}] x {cfg['bytes_per_element']} B = {report.tensor_bytes / MIB:.2f} MiB.",
        "",
        "| PP | V | layers/chunk | variant | tensors per hop | max/hop | total tensors | total MiB "
        "| x standard |",
        "|---:|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for row in report.rows:
        split = format_hops(row.layers_per_chunk)
        lines.append(
            f"| {row.pp} | {row.vpp} | {split} | {row.variant} | {format_hops(row.hop_tensors)} "
            f"| {row.max_tensors_per_hop} | {row.total_tensors} | {row.total_bytes / MIB:,.1f} "
            f"| {row.ratio_to_standard:.2f} |"
        )
    lines += [
        "",
        "Paper Eq. 7 / Eq. 8 (Block, in tensors, N_p = N / C) beside the exact totals:",
        "",
        "| PP | V | N_p | Eq. 7 naive | exact naive (w/o b0) | Eq. 8 cached | exact cached (w/o b0) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cmp in report.paper:
        lines.append(
            f"| {cmp.pp} | {cmp.vpp} | {cmp.n_p:.3g} | {cmp.eq7_naive:g} | {cmp.naive_total} "
            f"({cmp.naive_without_b0}) | {cmp.eq8_cached:g} | {cmp.cached_total} ({cmp.cached_without_b0}) |"
        )
    lines += ["", "Notes:", ""]
    for cmp in report.paper:
        for note in cmp.notes:
            lines.append(f"- PP={cmp.pp} V={cmp.vpp}: {note}")
    for note in report.skipped + report.notes:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="AttnRes pipeline boundary traffic vs standard residuals (Kimi Linear 48B by default)."
    )
    parser.add_argument("--layers", type=int, default=27, help="transformer layers L")
    parser.add_argument("--block-size", type=int, default=6, help="sublayers per AttnRes block S")
    parser.add_argument("--hidden", type=int, default=2304, help="hidden size h")
    parser.add_argument("--seq", type=int, default=4096, help="sequence length s")
    parser.add_argument("--micro-batch", type=int, default=1, help="micro-batch size b")
    parser.add_argument("--bytes-per-element", type=int, default=2, help="2 for bf16, 4 for fp32")
    parser.add_argument("--pp", type=int, nargs="+", default=[3, 9], help="pipeline sizes P")
    parser.add_argument("--vpp", type=int, nargs="+", default=[1, 3], help="virtual stages per rank V")
    parser.add_argument("--output", default="bench_pipeline_comm.json", help="JSON report path")
    parser.add_argument("--markdown", default=None, help="also write the markdown table here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = compute(
            args.layers,
            args.block_size,
            args.hidden,
            args.seq,
            args.micro_batch,
            args.bytes_per_element,
            args.pp,
            args.vpp,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = markdown(report)
    print(text, end="")
    Path(args.output).write_text(json.dumps(asdict(report), indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

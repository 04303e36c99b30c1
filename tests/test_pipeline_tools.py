"""Fast checks of the pure pipeline layout (attnres_megatron/pipeline/layout.py) and the two
tools built on it, tools/bench_pipeline_comm.py and tools/plan_pipeline_stages.py (no
processes). Transfer counts are checked against the strict minimum computed by set
arithmetic in tests/pipeline_minimum.py, not by the layout code."""

from __future__ import annotations

import ast
import importlib.util
import itertools
import json
import os
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest
from pipeline_minimum import hop_tensors, sublayer_ranges

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (tools is not a package); registered so dataclasses resolve."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench = load_tool("bench_pipeline_comm")
planner = load_tool("plan_pipeline_stages")
layout = bench.layout  # attnres_megatron/pipeline/layout.py, the plugin's own

KIMI = dict(
    num_layers=27,
    sublayers_per_block=6,
    hidden=2304,
    seq=4096,
    micro_batch=1,
    bytes_per_element=2,
    pp_sizes=[3, 9],
    vpp_sizes=[1, 3],
)


@pytest.fixture(scope="module")
def kimi_report():
    return bench.compute(**KIMI)


def rows_by(report, pp: int, vpp: int) -> dict:
    return {row.variant: row for row in report.rows if row.pp == pp and row.vpp == vpp}


# --------------------------------------------------------------------------- bench


def test_one_pure_layout_module_serves_the_model_and_both_tools():
    assert bench.layout is planner.layout is sys.modules["attnres_megatron.pipeline.layout"]
    assert planner.even_split is layout.even_split and planner.sources_at is layout.sources_at
    tree = ast.parse(Path(layout.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "math", "collections.abc", "dataclasses", "functools", "typing"}


def test_even_split_puts_remainder_on_last_chunks():
    assert layout.even_split(27, 3) == [9, 9, 9]
    assert layout.even_split(10, 4) == [2, 2, 3, 3]
    assert layout.chunk_ranges([2, 3]) == ((0, 4), (4, 10))
    with pytest.raises(ValueError):
        layout.even_split(3, 4)
    with pytest.raises(ValueError, match="has no layers"):
        layout.PipelineLayout.from_layer_counts(2, 1, 2, [2, 0])


# PP x V: (naive, cached) tensors per micro-batch, forward, Kimi Linear 48B (27 layers, S = 6)
KIMI_TABLE = {(3, 1): (11, 11), (3, 3): (44, 17), (9, 1): (44, 44), (9, 3): (152, 83)}


def test_kimi_table_is_the_strict_minimum(kimi_report):
    for (pp, vpp), (naive, cached) in KIMI_TABLE.items():
        rows = rows_by(kimi_report, pp, vpp)
        ranges = sublayer_ranges(rows["Block cached"].layers_per_chunk)
        assert rows["Block cached"].hop_tensors == hop_tensors(ranges, pp, 6)
        assert rows["Block naive"].hop_tensors == hop_tensors(ranges, pp, 6, cached=False)
        assert rows["Full AttnRes naive"].hop_tensors == hop_tensors(ranges, pp, 1, cached=False)
        assert (rows["Block naive"].total_tensors, rows["Block cached"].total_tensors) == (naive, cached)


def random_layouts(count: int, seed: int):
    rng = random.Random(seed)
    for _ in range(count):
        pp, vpp, block = rng.randint(2, 4), rng.randint(1, 4), rng.randint(1, 8)
        counts = [rng.randint(1, 4) for _ in range(pp * vpp)]
        yield layout.PipelineLayout.from_layer_counts(pp, vpp, block, counts)


def test_layout_sends_the_strict_minimum_on_random_splits():
    for plan in random_layouts(400, 7):
        args = (list(plan.chunk_ranges), plan.pipeline_size, plan.sublayers_per_block)
        assert plan.hop_sources() == hop_tensors(*args)
        assert plan.hop_sources(cached=False) == hop_tensors(*args, cached=False)
        counts = [(end - start) // 2 for start, end in plan.chunk_ranges]
        assert planner.received_tensors(counts, plan.pipeline_size, plan.sublayers_per_block) == [
            0,
            *hop_tensors(*args),
        ]


def test_kept_blocks_have_one_holder_per_rank_and_are_never_sent_on():
    for plan in random_layouts(200, 5):
        for chunk in plan.chunks:
            following = plan.next_on_rank(chunk)
            if following is not None:  # knowledge only grows: a block read from the rank's hold
                assert set(plan.blocks_held(chunk)) <= set(plan.blocks_known(following))
            if chunk.index + 1 < len(plan.chunks):  # ... is known to the next chunk's rank too
                assert set(plan.blocks_known(chunk)) <= set(plan.blocks_known(plan.chunks[chunk.index + 1]))
            for block in plan.blocks_known(chunk):
                holder = plan.holder(chunk, block)
                assert holder.pp_rank == chunk.pp_rank and holder.index < chunk.index
            held = [plan.blocks_held(c) for c in plan.chunks if c.pp_rank == chunk.pp_rank]
            assert sum(map(len, held)) == len(set().union(*map(set, held)))


def test_all_kimi_combinations_present(kimi_report):
    assert {(row.pp, row.vpp) for row in kimi_report.rows} == {(3, 1), (3, 3), (9, 1), (9, 3)}
    assert len(kimi_report.rows) == 4 * len(bench.VARIANTS)
    assert kimi_report.skipped == []
    assert kimi_report.tensor_bytes == 4096 * 2304 * 2


def test_standard_residual_is_one_tensor_per_hop(kimi_report):
    for row in kimi_report.rows:
        if row.variant == "standard residual":
            assert row.hop_tensors == [1] * (row.chunks - 1)
            assert row.ratio_to_standard == 1.0
            assert row.total_bytes == (row.chunks - 1) * kimi_report.tensor_bytes


def test_cached_never_exceeds_naive_and_padding_never_below_cached(kimi_report):
    for pp, vpp in {(row.pp, row.vpp) for row in kimi_report.rows}:
        rows = rows_by(kimi_report, pp, vpp)
        naive, cached = rows["Block naive"], rows["Block cached"]
        padded = rows["Block padded uniform"]
        assert cached.total_tensors <= naive.total_tensors
        assert all(c <= n for c, n in zip(cached.hop_tensors, naive.hop_tensors))
        if vpp == 1:
            assert cached.hop_tensors == naive.hop_tensors
        assert padded.total_tensors >= cached.total_tensors
        assert padded.hop_tensors == [max(cached.hop_tensors)] * (pp * vpp - 1)
        assert rows["Full AttnRes naive"].total_tensors >= naive.total_tensors


def test_kimi_pp3_hop_widths(kimi_report):
    rows = rows_by(kimi_report, 3, 1)
    assert rows["Block cached"].layers_per_chunk == [9, 9, 9]
    # after 18 sublayers: b0..b2 + partial = 4; after 36: b0..b5 + partial = 7
    assert rows["Block cached"].hop_tensors == [4, 7]
    assert rows["Block naive"].hop_tensors == [4, 7]
    assert rows["Block padded uniform"].hop_tensors == [7, 7]
    assert rows["Full AttnRes naive"].hop_tensors == [19, 37]  # b0 + every sublayer output
    assert rows["Block cached"].total_bytes == 11 * kimi_report.tensor_bytes


def test_paper_equations_match_once_b0_is_left_out_when_aligned(kimi_report):
    by_pair = {(cmp.pp, cmp.vpp): cmp for cmp in kimi_report.paper}
    pp3v3 = by_pair[(3, 3)]
    assert pp3v3.n_p == 1
    assert pp3v3.eq7_naive == 36 and pp3v3.naive_without_b0 == 36 and pp3v3.naive_total == 44
    # below Eq. 8: no hop carries back the block the receiver's rank ended its previous chunk with
    assert pp3v3.eq8_cached == 21 and pp3v3.cached_without_b0 == 15 and pp3v3.cached_total == 17
    assert any("keeps the block its previous chunk ended with" in note for note in pp3v3.notes)
    pp9v3 = by_pair[(9, 3)]  # boundaries inside blocks: exact exceeds the paper
    assert pp9v3.cached_without_b0 > pp9v3.eq8_cached
    assert any("inside a block" in note for note in pp9v3.notes)


def test_too_few_layers_is_skipped_with_a_note():
    report = bench.compute(**{**KIMI, "num_layers": 8, "pp_sizes": [3], "vpp_sizes": [1, 3]})
    assert {(row.pp, row.vpp) for row in report.rows} == {(3, 1)}
    assert len(report.skipped) == 1 and "PP=3 V=3" in report.skipped[0]


def test_bench_cli_writes_json_and_markdown(tmp_path, capsys):
    out, md = tmp_path / "comm.json", tmp_path / "comm.md"
    assert bench.main(["--output", str(out), "--markdown", str(md)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["layers"] == 27 and len(data["rows"]) == 20
    cached = [r for r in data["rows"] if r["variant"] == "Block cached" and r["pp"] == 3 and r["vpp"] == 1]
    assert cached[0]["hop_tensors"] == [4, 7]
    text = md.read_text()
    assert text == capsys.readouterr().out
    assert "| 3 | 1 | 9 (all 3) | Block cached | [4, 7] | 7 | 11 |" in text
    assert "Eq. 8" in text


# --------------------------------------------------------------------------- planner

NO_EXTRAS = dict(first_stage_extra=0.0, last_stage_extra=0.0)


def test_sources_formula_agrees_with_plugin_counting():
    for block in (1, 2, 6):
        for sublayer in range(1, 40):
            # plugin: b0 .. b_{(j-1)//S} + partial (a just-finished block is still the partial)
            assert planner.sources_at(sublayer, block) == (sublayer - 1) // block + 2
    assert planner.sources_at(0, 6) == 1


@pytest.mark.parametrize("objective", planner.OBJECTIVES)
@pytest.mark.parametrize("num_layers,pp,vpp", [(27, 3, 1), (24, 4, 1), (24, 3, 2), (18, 3, 3)])
def test_free_aggregation_gives_the_even_split(num_layers, pp, vpp, objective):
    cost = planner.CostModel(source_cost=0.0, transfer_cost=0.0, **NO_EXTRAS)
    plan = planner.plan_stages(num_layers, 6, pp, vpp, cost, objective)
    assert plan.chunk_layers == tuple([num_layers // (pp * vpp)] * (pp * vpp))
    assert plan.is_megatron_default
    assert plan.megatron_args() == (["--num-virtual-stages-per-pipeline-rank", str(vpp)] if vpp > 1 else [])


def test_costly_aggregation_moves_layers_off_later_stages():
    cost = planner.CostModel(source_cost=0.2, transfer_cost=0.0, **NO_EXTRAS)
    for pp in (3, 4, 9):
        layers = planner.plan_stages(27, 6, pp, 1, cost).stage_layers
        assert sum(layers) == 27
        assert all(a >= b for a, b in zip(layers, layers[1:])), layers
        assert layers[0] > layers[-1]


def test_v1_dp_is_exact():
    rng = random.Random(3)
    for _ in range(10):
        num_layers, pp, block = rng.randint(4, 12), rng.randint(2, 4), rng.randint(1, 8)
        if num_layers < pp:
            continue
        cost = planner.CostModel(
            source_cost=rng.uniform(0, 0.3),
            transfer_cost=rng.uniform(0, 0.3),
            first_stage_extra=rng.uniform(0, 1),
            last_stage_extra=rng.uniform(0, 1),
        )
        plan = planner.plan_stages(num_layers, block, pp, 1, cost)
        brute = min(
            planner.evaluate_split(counts, block, pp, 1, cost).bottleneck
            for counts in planner.compositions(num_layers, pp)
        )
        assert plan.bottleneck == pytest.approx(brute)


def test_plan_never_worse_than_even_split():
    rng = random.Random(11)
    for _ in range(25):
        pp, vpp = rng.randint(2, 5), rng.randint(1, 3)
        num_layers = rng.randint(pp * vpp, 40)
        block = rng.randint(1, 10)
        objective = rng.choice(planner.OBJECTIVES)
        cost = planner.CostModel(
            layer_cost=rng.uniform(0.5, 2),
            source_cost=rng.uniform(0, 0.2),
            transfer_cost=rng.uniform(0, 0.2),
            first_stage_extra=rng.uniform(0, 1),
            last_stage_extra=rng.uniform(0, 1),
        )
        plan = planner.plan_stages(num_layers, block, pp, vpp, cost, objective)
        even = planner.even_plan(num_layers, block, pp, vpp, cost, objective)
        assert sum(plan.chunk_layers) == num_layers and min(plan.chunk_layers) >= 1
        assert len(plan.chunk_layers) == pp * vpp
        assert plan.objective_value <= even.objective_value + 1e-9
        if objective == "stage-sum":
            assert plan.bottleneck <= even.bottleneck + 1e-9


def megatron_config_from_flags(args: list[str], num_layers: int, pp: int, **fields):
    """The TransformerConfig Megatron-Core builds from the planner's flags (virtual stages from the
    layout as Megatron-LM derives them); an AttnRes config when ``fields`` ask for one."""
    import torch
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout
    from megatron.core.transformer.transformer_config import TransformerConfig

    from attnres_megatron.config import AttnResTransformerConfig

    flags = dict(zip(args[::2], args[1::2]))
    layout = flags.get("--pipeline-model-parallel-layout")
    first = flags.get("--decoder-first-pipeline-num-layers")
    last = flags.get("--decoder-last-pipeline-num-layers")
    if layout is not None:  # Megatron-LM refuses the layout beside any of these
        assert not {"--num-virtual-stages-per-pipeline-rank", "--decoder-first-pipeline-num-layers"} & set(
            flags
        )
        vpp = PipelineParallelLayerLayout.get_num_stages_from_str(layout) // pp
    else:
        vpp = int(flags.get("--num-virtual-stages-per-pipeline-rank", 1))
    config_class = AttnResTransformerConfig if fields else TransformerConfig
    return config_class(
        num_layers=num_layers,
        hidden_size=64,
        num_attention_heads=4,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        num_layers_in_first_pipeline_stage=int(first) if first else None,
        num_layers_in_last_pipeline_stage=int(last) if last else None,
        pipeline_model_parallel_layout=layout,
        pipeline_dtype=torch.float32,
        **fields,
    )


def megatron_counts_from_flags(args: list[str], num_layers: int, pp: int) -> list[list[int]]:
    """Layers per [vp_stage][pp_rank] of the model Megatron-Core builds from the planner's flags."""
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    config = megatron_config_from_flags(args, num_layers, pp)
    vpp = config.virtual_pipeline_model_parallel_size or 1
    layout = config.pipeline_model_parallel_layout
    if layout is not None:  # parsed and validated by the config; what each rank builds
        return [[layout.layout[rank][vp].count(LayerType.decoder) for rank in range(pp)] for vp in range(vpp)]
    return [
        [
            get_num_layers_to_build(config, vp_stage=vp if vpp > 1 else None, pp_rank=rank)
            for rank in range(pp)
        ]
        for vp in range(vpp)
    ]


@pytest.mark.parametrize(
    "num_layers,block,pp,vpp,expect",
    [
        (27, 6, 3, 1, "--decoder-first-pipeline-num-layers"),
        (27, 6, 9, 1, "--decoder-first-pipeline-num-layers"),
        (27, 6, 3, 3, "--pipeline-model-parallel-layout"),
        (128, 32, 16, 1, "--pipeline-model-parallel-layout"),
        (93, 24, 8, 2, "--pipeline-model-parallel-layout"),
        (24, 6, 4, 1, None),
        (24, 6, 2, 2, None),
    ],
)
def test_megatron_flags_build_the_planned_split(num_layers, block, pp, vpp, expect):
    plan = planner.plan_stages(num_layers, block, pp, vpp)
    args = plan.megatron_args()
    if expect is not None:
        assert expect in args
    expected = [list(plan.chunk_layers[vp * pp : (vp + 1) * pp]) for vp in range(vpp)]
    assert megatron_counts_from_flags(args, num_layers, pp) == expected
    layout_args = ["--pipeline-model-parallel-layout", plan.layout_string]
    assert megatron_counts_from_flags(layout_args, num_layers, pp) == expected


def test_first_last_flags_with_virtual_stages():
    # every rank's chunks equal and the middle ranks equal: expressible with first/last flags
    plan = planner.evaluate_split([4, 3, 2] * 3, 6, 3, 3)
    args = plan.megatron_args()
    assert args == [
        "--num-virtual-stages-per-pipeline-rank",
        "3",
        "--decoder-first-pipeline-num-layers",
        "12",
        "--decoder-last-pipeline-num-layers",
        "6",
    ]
    assert megatron_counts_from_flags(args, 27, 3) == [[4, 3, 2]] * 3


def test_layout_string_format():
    plan = planner.evaluate_split([1, 2, 3, 1], 4, 2, 2)
    assert plan.layout_string == "Et|t*2|t*3|tL"
    assert plan.megatron_args() == ["--pipeline-model-parallel-layout", "Et|t*2|t*3|tL"]  # V implied
    assert megatron_counts_from_flags(plan.megatron_args(), 7, 2) == [[1, 2], [3, 1]]
    # runs of three or more equal middle stages are written (t*n|)*k, which Megatron unrolls
    assert planner.layout_string([6, 5, 5, 5, 4]) == "Et*6|(t*5|)*3,t*4L"
    assert planner.layout_string([1, 1, 1, 1, 1, 1, 2, 2]) == "Et|(t|)*5,t*2|t*2L"
    assert planner.layout_string([6, 5, 5, 5, 4], compact=False) == "Et*6|t*5|t*5|t*5|t*4L"
    rng = random.Random(2)
    for _ in range(300):
        counts = [rng.choice([1, 1, 2, 3, 12]) for _ in range(rng.randint(1, 24))]
        pp = rng.choice([d for d in range(1, len(counts) + 1) if len(counts) % d == 0])
        for compact in (True, False):
            flags = ["--pipeline-model-parallel-layout", planner.layout_string(counts, compact)]
            got = megatron_counts_from_flags(flags, sum(counts), pp)
            assert [got[index // pp][index % pp] for index in range(len(counts))] == counts


# The planner's cost model, written out again here for the independent checks below (V = 1).
def own_sources(sublayer: int, block: int) -> int:
    """b0, the completed blocks and the partial sum once started (the final mix: sublayer 2L)."""
    return sublayer // block + 1 + (1 if sublayer % block else 0)


def own_stage_costs(counts: list[int], block: int, cost) -> list[float]:
    """Each stage: its layers (two aggregations each), the tensors it receives (b0, completed
    blocks, partial), the embedding on the first and the output (final mix included) on the last."""
    costs, start, total = [], 0, sum(counts)
    for stage, count in enumerate(counts):
        value = 0.0
        for layer in range(start, start + count):
            sources = own_sources(2 * layer, block) + own_sources(2 * layer + 1, block)
            value += cost.layer_cost + cost.source_cost * sources
        if start:
            value += cost.transfer_cost * ((2 * start - 1) // block + 2)
        if stage == 0:
            value += cost.first_stage_extra
        if stage == len(counts) - 1:
            value += cost.last_stage_extra + cost.source_cost * own_sources(2 * total, block)
        costs.append(value)
        start += count
    return costs


@pytest.mark.parametrize(
    "num_layers,block,pp,source_cost",
    [(12, 1, 4, 0.02), (16, 1, 4, 0.0138), (13, 3, 3, 0.05), (10, 2, 2, 0.1), (14, 24, 4, 0.02)],
)
def test_the_planned_layout_builds_the_optimal_split_in_megatron_core(num_layers, block, pp, source_cost):
    """V = 1: the layer counts Megatron-Core builds from the planner's layout string are the
    planner's predicted per-stage counts and minimise the slowest stage, by brute force over every
    split with the cost model written out in this test."""
    cost = planner.CostModel(source_cost=source_cost, transfer_cost=0.03, last_stage_extra=0.2)
    plan = planner.plan_stages(num_layers, block, pp, 1, cost)
    flags = ["--pipeline-model-parallel-layout", plan.layout_string]
    built = megatron_counts_from_flags(flags, num_layers, pp)[0]
    assert built == list(plan.stage_layers)
    bottleneck = {}
    for cuts in itertools.combinations(range(1, num_layers), pp - 1):
        bounds = (0, *cuts, num_layers)
        counts = [bounds[index + 1] - bounds[index] for index in range(pp)]
        bottleneck[tuple(counts)] = max(own_stage_costs(counts, block, cost))
    best = min(bottleneck.values())
    assert bottleneck[tuple(built)] == pytest.approx(best, abs=1e-9)
    assert max(plan.stage_costs) == pytest.approx(best, abs=1e-9)
    assert own_stage_costs(built, block, cost) == pytest.approx(list(plan.stage_costs))


@pytest.mark.parametrize(
    "counts,pp,block",
    [([1, 2, 1, 1], 2, 3), ([2, 1, 3, 1, 1, 2, 2, 1], 4, 3), ([1, 3, 2], 3, 1), ([4, 1, 1, 2, 3, 1], 2, 6)],
)
def test_attn_res_reads_a_layout_for_every_rank_and_virtual_stage(counts, pp, block):
    """The AttnRes layout of a config built from a layout string (Megatron's split, read for every
    chunk from any process) has the chunk ranges of the string and sends the strict minimum."""
    from attnres_megatron.pipeline.megatron_split import layout_from_config

    flags = ["--pipeline-model-parallel-layout", planner.layout_string(counts)]
    config = megatron_config_from_flags(
        flags, sum(counts), pp, attention_residuals="block", attn_res_block_size=block
    )
    plan = layout_from_config(config)
    ranges = sublayer_ranges(counts)  # tests/pipeline_minimum.py, from the counts alone
    assert plan.virtual_size == len(counts) // pp and list(plan.chunk_ranges) == ranges
    assert plan.hop_sources() == hop_tensors(ranges, pp, block)


@pytest.mark.parametrize("pp,vpp", [(4, 1), (4, 2), (3, 3)])
def test_planned_virtual_stage_layouts_build_the_planned_chunks(pp, vpp):
    cost = planner.CostModel(source_cost=0.05)
    plan = planner.plan_stages(20, 2, pp, vpp, cost)
    flags = plan.megatron_args()
    built = megatron_counts_from_flags(flags, 20, pp)
    assert [built[index // pp][index % pp] for index in range(pp * vpp)] == list(plan.chunk_layers)
    assert [sum(column) for column in zip(*built)] == list(plan.stage_layers)


def test_num_blocks_resolves_like_the_plugin():
    from attnres_megatron.config import resolve_sublayers_per_block

    for num_layers, num_blocks in itertools.product((5, 27, 48), (1, 3, 8, 9)):
        assert planner.resolve_block_size(num_layers, None, num_blocks) == resolve_sublayers_per_block(
            "block", num_layers, num_blocks=num_blocks
        )
    with pytest.raises(ValueError):
        planner.resolve_block_size(27, 6, 9)


def test_planner_cli(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert planner.main(["--layers", "27", "--block-size", "6", "--pp", "3", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "--decoder-first-pipeline-num-layers 10 --decoder-last-pipeline-num-layers 8" in text
    assert "predicted speedup" in text
    data = json.loads(out.read_text())
    assert data["plan"]["chunk_layers"] == [10, 9, 8]
    assert data["even_split"]["chunk_layers"] == [9, 9, 9]
    assert data["speedup"] > 1
    assert planner.main(["--layers", "2", "--block-size", "6", "--pp", "3"]) == 2


def test_planner_prints_the_layout_and_evaluates_a_given_split(capsys):
    assert planner.main(["--layers", "16", "--block-size", "1", "--pp", "4", "--print-layout"]) == 0
    printed = capsys.readouterr().out.strip()
    plan = planner.plan_stages(16, 1, 4)
    assert printed == plan.layout_string
    built = megatron_counts_from_flags(["--pipeline-model-parallel-layout", printed], 16, 4)
    assert built == [list(plan.stage_layers)]
    assert planner.main(["--layers", "16", "--block-size", "1", "--pp", "4", "--split", "6,4,3,3"]) == 0
    text = capsys.readouterr().out
    assert "search: given split" in text and "6 | " in text
    assert '--pipeline-model-parallel-layout "Et*6|t*4|t*3|t*3L"' in text
    assert planner.main(["--layers", "16", "--block-size", "1", "--pp", "4", "--split", "6,4,3"]) == 2
    with pytest.raises(SystemExit):
        planner.main(["--layers", "16", "--block-size", "1", "--pp", "4", "8"])  # lists need --table


def test_planner_table_counts_bytes_by_set_arithmetic(tmp_path, capsys):
    out, md = tmp_path / "table.json", tmp_path / "table.md"
    argv = ["--layers", "27", "--block-size", "6", "--pp", "4", "8", "16", "--vpp", "1", "2", "4", "--table"]
    assert planner.main([*argv, "--output", str(out), "--markdown", str(md)]) == 0
    text = capsys.readouterr().out
    assert text == md.read_text() and "| 4 | 1 | 6, 7 x3 |" in text
    data = json.loads(out.read_text())
    pairs = [(row["pp"], row["vpp"]) for row in data["rows"]]
    assert pairs == [(4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (16, 1)]
    assert [note.split(":")[0] for note in data["skipped"]] == ["PP=8 x V=4", "PP=16 x V=2", "PP=16 x V=4"]
    for row in data["rows"]:
        assert row["tensor_bytes"] == 4096 * 2304 * 2
        for which in ("even", "plan"):
            ranges = sublayer_ranges(row[f"{which}_chunk_layers"])
            assert row[f"{which}_cached_tensors"] == sum(hop_tensors(ranges, row["pp"], 6))
            assert row[f"{which}_naive_tensors"] == sum(hop_tensors(ranges, row["pp"], 6, cached=False))
        assert row["speedup"] >= 1.0 and row["plan_imbalance"] >= 1.0
        built = megatron_counts_from_flags(row["plan_megatron_args"], 27, row["pp"])
        flat = [built[index // row["pp"]][index % row["pp"]] for index in range(row["pp"] * row["vpp"])]
        assert flat == row["plan_chunk_layers"]
    assert (data["rows"][0]["even_naive_tensors"], data["rows"][0]["even_cached_tensors"]) == (17, 17)


def test_measurement_calibration_recovers_the_cost_model():
    """tools/measure_pipeline_balance.py's fit, on compute times made from known costs."""
    measure = load_tool("measure_pipeline_balance")
    layer, mix, source, output, block = 0.05, 0.004, 0.0006, 0.006, 2

    def times(layers: int) -> tuple[float, float]:
        none = layers * layer + output
        reads = sum(own_sources(j, block) for j in range(2 * layers + 1))  # 2L mixes + the final one
        return none, none + (2 * layers + 1) * mix + reads * source

    fitted = measure.fit_costs({8: times(8), 16: times(16)}, block)
    assert fitted["layer_s"] == pytest.approx(layer) and fitted["per_mix_s"] == pytest.approx(mix)
    assert fitted["per_source_s"] == pytest.approx(source)
    assert fitted["embedding_output_loss_s"] == pytest.approx(output)
    cost = fitted["cost"]
    unit = layer + 2 * mix
    assert cost.source_cost == pytest.approx(source / unit)
    assert cost.last_stage_extra == pytest.approx((output + mix) / unit)
    # the planner's single-stage cost in these units is the AttnRes run's time
    plan = planner.evaluate_split([16], block, 1, 1, cost)
    assert plan.stage_costs[0] * unit == pytest.approx(times(16)[1])


# --------------------------------------------------------------------------- the flag's refusals

PRETRAIN = [
    *("--device", "cpu", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4"),
    *("--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "5", "--mock-data"),
    *("--attention-residuals", "block", "--attn-res-block-size", "3"),
]
LAYOUT_REFUSALS = {
    "syntax": (
        ["--pipeline-model-parallel-size", "2"],
        "Et*2|tx*2L",
        ["Invalid layer character: x", "x*n repeats"],
    ),
    "layer-count": (
        ["--pipeline-model-parallel-size", "2"],
        "Et*2|t*3L",
        ["the model has 4 transformer layers"],
    ),
    "first-last": (
        ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1"],
        "Et|t*3L",
        ["sets the split itself; drop --decoder-first/last-pipeline-num-layers"],
    ),
    "stages": (
        ["--pipeline-model-parallel-size", "2"],
        "Et|t|t*2L",
        ["has 3 stages", "--pipeline-model-parallel-size 2"],
    ),
    "virtual-stages": (
        ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "3"],
        "Et|t|t|tL",
        ["4 stages = 2 pipeline ranks x 2 virtual stages", "--num-virtual-stages-per-pipeline-rank is 3"],
    ),
    "empty-stage": (
        ["--pipeline-model-parallel-size", "2"],
        "Et*2|t||tL",
        ["stage 2 (pipeline rank 0, virtual stage 1) has no transformer layer", "--print-layout"],
    ),
}


@pytest.mark.parametrize("case", list(LAYOUT_REFUSALS))
def test_attnres_pretrain_refuses_a_bad_layout_before_any_work(pretrain_refusal, case):
    flags, layout_text, messages = LAYOUT_REFUSALS[case]
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    refusal = pretrain_refusal([*PRETRAIN, *flags, "--pipeline-model-parallel-layout", layout_text], env)
    assert refusal.startswith("error: --pipeline-model-parallel-layout"), refusal
    for message in messages:
        assert message in refusal, refusal


def test_an_empty_stage_is_megatrons_business_without_attention_residuals():
    """Megatron-Core accepts stages without transformer layers; only AttnRes needs one per stage."""
    import argparse

    from attnres_megatron.training import early_checks

    fields = dict(
        pipeline_model_parallel_layout="Et*2||t*2L",
        pipeline_model_parallel_size=3,
        num_virtual_stages_per_pipeline_rank=None,
        decoder_first_pipeline_num_layers=None,
        decoder_last_pipeline_num_layers=None,
        model="gpt",
    )
    early_checks.validate_pipeline_layout(argparse.Namespace(**fields, attention_residuals="none"), 4)
    with pytest.raises(
        SystemExit, match="stage 1 .pipeline rank 1, virtual stage 0. has no transformer layer"
    ):
        early_checks.validate_pipeline_layout(argparse.Namespace(**fields, attention_residuals="block"), 4)


MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")
MEGATRON_LM_SNIPPET = """
import json, os, sys
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE=sys.argv[1])
block_size = int(sys.argv[3])
from megatron.training.arguments import parse_args, validate_args
from attnres_megatron.config import AttnResTransformerConfig
from attnres_megatron.megatron_lm.config import transformer_config_kwargs
from attnres_megatron.pipeline.megatron_split import layout_from_config
sys.argv = ["pretrain_gpt.py", *json.loads(sys.argv[2])]
args = parse_args()
validate_args(args)
kwargs = transformer_config_kwargs(args)
keys = ("num_layers", "hidden_size", "num_attention_heads", "pipeline_model_parallel_size",
        "virtual_pipeline_model_parallel_size", "pipeline_model_parallel_layout", "pipeline_dtype")
config = AttnResTransformerConfig(**{key: kwargs[key] for key in keys}, attention_residuals="block",
                                  attn_res_block_size=block_size)
plan = layout_from_config(config)
print("RESULT", json.dumps({"vpp": args.virtual_pipeline_model_parallel_size, "ranges": plan.chunk_ranges}))
"""


@pytest.mark.skipif(
    not (MEGATRON_LM_DIR and Path(MEGATRON_LM_DIR, "megatron/training/arguments.py").is_file()),
    reason="set MEGATRON_LM_DIR to a Megatron-LM core_r0.16 checkout",
)
def test_megatron_lms_parser_takes_the_planners_layout(tmp_path):
    """Megatron-LM's own --pipeline-model-parallel-layout: its parser and validate_args take the
    planner's flags (virtual stages from the layout), its config mapping carries the layout, and
    the AttnRes layout reads every chunk from it; with --num-virtual-stages-per-pipeline-rank beside
    it Megatron-LM refuses, which is why the planner leaves that flag out."""
    import subprocess

    plan = planner.evaluate_split([2, 1, 3, 1, 1, 2, 2, 1], 3, 4, 2)
    base = ["--num-layers", "13", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]
    base += ["--max-position-embeddings", "32", "--micro-batch-size", "1", "--global-batch-size", "8"]
    base += ["--train-iters", "1", "--lr", "1e-3", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64"]
    base += ["--pipeline-model-parallel-size", "4", *plan.megatron_args()]
    env = {**os.environ, "PYTHONPATH": MEGATRON_LM_DIR, "PYTHONWARNINGS": "ignore"}

    def run(flags: list[str]) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", MEGATRON_LM_SNIPPET, "4", json.dumps(flags), "3"]
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)

    done = run(base)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["vpp"] == 2
    assert [tuple(r) for r in result["ranges"]] == sublayer_ranges(plan.chunk_layers)
    refused = run([*base, "--num-virtual-stages-per-pipeline-rank", "2"])
    assert refused.returncode != 0 and "No more than one of the following arguments" in refused.stderr

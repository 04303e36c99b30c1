"""Fast checks of the pure pipeline layout (attnres_megatron/pipeline/layout.py) and the two
tools built on it, tools/bench_pipeline_comm.py and tools/plan_pipeline_stages.py (no
processes). Transfer counts are checked against the strict minimum computed by set
arithmetic in tests/pipeline_minimum.py, not by the layout code."""

from __future__ import annotations

import ast
import importlib.util
import itertools
import json
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


def megatron_counts_from_flags(args: list[str], num_layers: int, pp: int) -> list[list[int]]:
    """Layers per [vp_stage][pp_rank] that Megatron builds from the planner's flags."""
    import torch
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig

    flags = dict(zip(args[::2], args[1::2]))
    vpp = int(flags.get("--num-virtual-stages-per-pipeline-rank", 1))
    if "--pipeline-model-parallel-layout" in flags:
        layout = PipelineParallelLayerLayout(flags["--pipeline-model-parallel-layout"], pp)
        layout.validate_layer_layout(num_layers=num_layers, mtp_num_layers=None)
        assert layout.virtual_pipeline_model_parallel_size == vpp
        return [[layout.layout[rank][vp].count(LayerType.decoder) for rank in range(pp)] for vp in range(vpp)]
    first = flags.get("--decoder-first-pipeline-num-layers")
    last = flags.get("--decoder-last-pipeline-num-layers")
    config = TransformerConfig(
        num_layers=num_layers,
        hidden_size=64,
        num_attention_heads=4,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        num_layers_in_first_pipeline_stage=int(first) if first else None,
        num_layers_in_last_pipeline_stage=int(last) if last else None,
        pipeline_dtype=torch.float32,
    )
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
    layout_args = args[:2] if vpp > 1 else []
    layout_args += ["--pipeline-model-parallel-layout", plan.layout_string]
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
    assert megatron_counts_from_flags(plan.megatron_args(), 7, 2) == [[1, 2], [3, 1]]


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

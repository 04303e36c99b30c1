"""The profiler's summaries against hand-computed numbers: the median step (every column from it),
spreads, per-round ratios, the ratio rule and its warnings, the run order, the CUDA peak meter."""

from __future__ import annotations

import copy

import pytest
import torch

from attnres_megatron.profiling import memory
from attnres_megatron.profiling.cli import _summary, warning_line
from attnres_megatron.profiling.markdown import ratio_cell, split_cells
from attnres_megatron.profiling.report import (
    RATIO_METRICS,
    compute_ratio_spreads,
    compute_ratios,
    ratio_warnings,
    summarize_variant,
)
from attnres_megatron.profiling.runner import round_robin_order, variant_groups
from attnres_megatron.profiling.schema import builtin_errors, load_schema
from attnres_megatron.profiling.spread import (
    MIN_ROUNDS,
    paired_ratios,
    ratio_warning,
    representative_index,
    spread,
)

TOKENS = 1000


def timed_step(step: float, forward: float, backward: float, optimizer: float, started: float) -> dict:
    """One rank's record of a timed step (the fields summarize_variant reads)."""
    return {
        "step_s": step,
        "forward_s": forward,
        "backward_s": backward,
        "optimizer_s": optimizer,
        "forward_cpu_s": forward,
        "backward_cpu_s": backward,
        "p2p_s": 0.0,
        "next_rank_p2p_s": 0.0,
        "previous_rank_p2p_s": 0.0,
        "started_s": started,
    }


def one_rank(name: str, steps: list[tuple[float, float, float, float]]) -> list[dict]:
    """A single-rank variant with these (step, forward, backward, optimizer) timed steps."""
    local = {
        "rank": 0,
        "pp_rank": 0,
        "tp_rank": 0,
        "cp_rank": 0,
        "dp_rank": 0,
        "variant": name,
        "attention_residuals": name,
        "sublayers_per_block": None,
        "sources_at_output": None,
        "interleaved": False,
        "parameters": 10,
        "attn_res_parameters": 0,
        "steps": [timed_step(*split, started=float(index)) for index, split in enumerate(steps)],
        "losses": [1.0],
        "memory": {
            "parameter_bytes": 40,
            "gradient_bytes": 40,
            "optimizer_state_bytes": 80,
            "peak_saved_activation_bytes": 40,
            "cuda_peak_bytes": None,
        },
        "aggregation": {"calls_per_step": 0, "forward_s": 0.0},
        "instrumented_step": {"step_s": 1.0, "forward_s": 0.5, "backward_s": 0.4},
        "ledger": {},
        "boundaries": [],
        "hidden_state_bytes": 4,
        "num_micro_batches": 1,
    }
    return [local]


# The failure, in miniature: load spikes land in different phases of different steps, so
# the medians of the columns taken one by one (forward 4, backward 4, optimizer 1.5, other 1) add
# up to 10.5 against a median step of 11.5; each variant's spike round lands elsewhere.
BASELINE_STEPS = [(10.0, 4.0, 3.0, 2.0), (12.0, 2.0, 8.0, 1.0), (30.0, 4.0, 4.0, 20.0), (11.0, 6.0, 4.0, 0.5)]
BLOCK_STEPS = [(11.0, 4.5, 3.5, 2.5), (13.0, 2.5, 9.0, 1.0), (12.0, 5.0, 4.5, 2.0), (35.0, 9.0, 9.0, 9.0)]


@pytest.fixture
def summarized() -> list[dict]:
    return [
        summarize_variant(one_rank("none", BASELINE_STEPS), "cpu", TOKENS),
        summarize_variant(one_rank("block", BLOCK_STEPS), "cpu", TOKENS),
    ]


def test_median_step_gives_every_column(summarized):
    base, block = summarized
    # baseline step times 10, 12, 30, 11: lower middle of 10 11 | 12 30 is 11, the fourth step
    assert base["representative_step"] == 3
    assert (base["step_time_s"], base["forward_s"], base["backward_s"], base["optimizer_s"]) == (
        11,
        6,
        4,
        0.5,
    )
    assert base["other_s"] == 0.5
    assert (
        base["forward_s"] + base["backward_s"] + base["optimizer_s"] + base["other_s"] == base["step_time_s"]
    )
    assert base["tokens_per_second"] == TOKENS / 11
    assert base["stages"][0]["step_s"] == 11 and base["stages"][0]["compute_cpu_s"] == 10
    # block step times 11, 13, 12, 35: lower middle is 12, the third step
    assert block["representative_step"] == 2
    assert (block["step_time_s"], block["forward_s"], block["other_s"]) == (12, 5, 0.5)
    assert base["step_time_spread_s"] == {"q1": 10.75, "q3": 16.5, "min": 10.0, "max": 30.0, "count": 4}


def test_ratios_pair_rounds_and_spreads_are_quartiles(summarized):
    ratios, spreads = compute_ratios(summarized), compute_ratio_spreads(summarized)
    # step ratios per round: 11/10, 13/12, 12/30, 35/11 -> sorted 0.4, 1.0833, 1.1, 3.1818
    per_round = [1.1, 13 / 12, 0.4, 35 / 11]
    assert ratios["block"]["step_time"] == pytest.approx((13 / 12 + 1.1) / 2, rel=1e-12)
    q1 = 0.4 + 0.75 * (13 / 12 - 0.4)
    q3 = 1.1 + 0.25 * (35 / 11 - 1.1)
    assert spreads["block"]["step_time"] == pytest.approx(
        {"q1": q1, "q3": q3, "min": 0.4, "max": 35 / 11, "count": 4}, rel=1e-12
    )
    assert spreads["block"]["step_time"] == pytest.approx(spread(per_round), rel=1e-12)
    tokens = [10 / 11, 12 / 13, 30 / 12, 11 / 35]  # tokens/s: the baseline's step over the variant's
    assert ratios["block"]["tokens_per_second"] == pytest.approx(statistics_median(tokens), rel=1e-12)
    assert ratios["block"]["peak_memory"] == 1.0 and ratios["block"]["p2p_bytes"] is None
    assert set(ratios["block"]) == set(RATIO_METRICS)
    assert all(value == 1.0 for key, value in ratios["none"].items() if key != "p2p_bytes")
    # [q1, q3] includes 1.0: the step ratio is flagged, with the rule's reason
    (flag,) = [w for w in ratio_warnings(ratios, spreads) if w["metric"] == "step_time"]
    assert flag["variant"] == "block" and "includes 1.0" in flag["reason"]
    assert not [w for w in ratio_warnings(ratios, spreads) if w["variant"] == "none"]
    assert compute_ratios(summarized[1:]) == {} and compute_ratio_spreads(summarized[1:]) == {}


def statistics_median(values: list[float]) -> float:
    ordered = sorted(values)
    return (ordered[1] + ordered[2]) / 2


@pytest.mark.parametrize(
    "ratio, q1, q3, count, expected",
    [
        (1.20, 1.18, 1.22, 5, None),  # 3.3% spread under a 20% overhead
        (0.85, 0.80, 0.89, 5, None),  # a speed-up, 10.6% spread under 15%
        (1.02, 0.99, 1.05, 5, "includes 1.0"),
        (0.89, 0.80, 1.00, 5, "includes 1.0"),  # the interval's end counts
        (1.05, 1.01, 1.12, 5, "relative spread 10.5% exceeds the difference claimed (+5.0%)"),
        (0.95, 0.90, 0.99, 5, "relative spread 9.5% exceeds the difference claimed (-5.0%)"),
        (1.10, 1.06, 1.15, 5, None),  # 8.2% spread under a 10% overhead
        (1.50, 1.50, 1.50, 2, "2 rounds: too few"),
        (1.50, 1.50, 1.50, 1, "1 round: too few"),
    ],
)
def test_ratio_rule_against_hand_computed_numbers(ratio, q1, q3, count, expected):
    reason = ratio_warning(ratio, {"q1": q1, "q3": q3, "min": q1, "max": q3, "count": count})
    if expected is None:
        assert reason is None
    else:
        assert expected in reason
    assert MIN_ROUNDS == 3


def test_representative_index_and_spread():
    assert representative_index([3.0, 1.0, 2.0]) == 2
    assert representative_index([4.0, 1.0, 3.0, 2.0]) == 3  # lower middle of 1 2 | 3 4
    assert representative_index([2.0, 1.0, 2.0]) == 0  # ties: the first
    assert representative_index([5.0]) == 0
    assert spread([5, 1, 4, 2, 3]) == {"q1": 2.0, "q3": 4.0, "min": 1.0, "max": 5.0, "count": 5}
    assert spread([1, 2, 3, 4]) == {"q1": 1.75, "q3": 3.25, "min": 1.0, "max": 4.0, "count": 4}
    assert spread([7]) == {"q1": 7.0, "q3": 7.0, "min": 7.0, "max": 7.0, "count": 1}
    assert paired_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    assert paired_ratios([2.0, 3.0], [1.0, 0.0]) is None
    with pytest.raises(ValueError, match="rounds"):
        paired_ratios([1.0], [1.0, 2.0])


def test_round_robin_order_rotates_and_warms_up_first():
    assert round_robin_order(["a", "b", "c"], 1, 2) == [
        ("warmup", 0, "a"),
        ("warmup", 0, "b"),
        ("warmup", 0, "c"),
        ("timed", 0, "b"),
        ("timed", 0, "c"),
        ("timed", 0, "a"),
        ("timed", 1, "c"),
        ("timed", 1, "a"),
        ("timed", 1, "b"),
    ]
    order = round_robin_order(["none", "block"], 0, 3)
    assert [variant for *_, variant in order] == ["none", "block", "block", "none", "none", "block"]
    assert variant_groups(["none", "block"], sequential=False) == [["none", "block"]]
    assert variant_groups(["none", "block"], sequential=True) == [["none"], ["block"]]


def test_printed_split_adds_up_exactly():
    # 10.046 ms = 3.334 + 3.334 + 3.334 + 0.044: rounded one by one, 3.33 * 3 + 0.04 = 10.03, not 10.05
    variant = {
        "step_time_s": 0.010046,
        "forward_s": 0.003334,
        "backward_s": 0.003334,
        "optimizer_s": 0.003334,
    }
    cells = split_cells(variant)
    assert cells == ["10.05", "3.33", "3.33", "3.33", "0.06"]
    assert ratio_cell(1.0512, {"q1": 1.031, "q3": 1.0724}, False) == "1.051x [1.031-1.072]"
    assert ratio_cell(1.0212, {"q1": 0.99, "q3": 1.05}, True) == "1.021x [0.990-1.050] (!)"
    assert ratio_cell(None, None, False) == "-" and ratio_cell(1.0, None, False) == "1.000x"


def test_summary_logs_every_warning(summarized):
    ratios, spreads = compute_ratios(summarized), compute_ratio_spreads(summarized)
    report = {
        "precision": {"used": "fp32", "requested": "fp32", "fallback_reason": None},
        "variants": [{**v, "memory": {"peak_bytes": 1 << 20}} for v in summarized],
        "ratios": ratios,
        "ratio_spreads": spreads,
        "ratio_warnings": ratio_warnings(ratios, spreads),
    }
    lines = _summary(report).splitlines()
    assert "step 12000.0 ms [IQR 11750.0-18500.0] (fwd 5000.0" in lines[2]
    assert lines[2].endswith("| 1.092x baseline step [IQR 0.912-1.620]")
    warnings = [line for line in lines if line.startswith("> WARNING: attnres-profile: ")]
    flagged = report["ratio_warnings"]
    assert [w["metric"] for w in flagged] == ["step_time", "backward", "optimizer", "tokens_per_second"]
    assert warnings[0] == warning_line(flagged[0])
    assert "block step_time ratio 1.092x is unresolved: the interquartile range" in warnings[0]
    assert warnings[1:] == [
        "> WARNING: attnres-profile: also unresolved: block backward, block optimizer, "
        "block tokens_per_second (see profile.md)"
    ]


def test_schema_parts_accept_the_summaries_and_refuse_broken_ones(summarized):
    schema = load_schema()
    defs = {"$defs": schema["$defs"]}
    ratios, spreads = compute_ratios(summarized), compute_ratio_spreads(summarized)
    assert builtin_errors(spreads["block"], {**defs, "$ref": "#/$defs/ratio_spreads"}) == []
    assert builtin_errors(summarized[0]["steps"][0], {**defs, "$ref": "#/$defs/step"}) == []
    for warning in ratio_warnings(ratios, spreads):
        assert builtin_errors(warning, {**defs, "$ref": "#/$defs/ratio_warning"}) == []
    broken = copy.deepcopy(spreads["block"])
    broken["forward"] = {"q1": 1.0, "q3": 1.1}
    assert builtin_errors(broken, {**defs, "$ref": "#/$defs/ratio_spreads"})
    broken["forward"] = None  # a baseline of 0 has no ratio, hence no spread
    assert builtin_errors(broken, {**defs, "$ref": "#/$defs/ratio_spreads"}) == []


def test_cuda_peak_meter_counts_own_bytes_and_rise(monkeypatch):
    state = {"allocated": 1000, "peak": 1000}  # 1000 bytes of other variants already resident

    def allocate(size: int) -> None:
        state["allocated"] += size
        state["peak"] = max(state["peak"], state["allocated"])

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: state["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: state.update(peak=state["allocated"]))
    meter = memory.CudaPeakMeter(enabled=True)
    with meter.measure(record_peak=False):  # build: 300 bytes of parameters stay
        allocate(300)
    assert (meter.resident, meter.peak) == (300, 0)
    with meter.measure():  # a step: 500 bytes of activations come and go, 100 of state stay
        allocate(500)
        allocate(-500)
        allocate(100)
    assert (meter.resident, meter.peak) == (400, 800)
    allocate(2000)  # another variant's step leaves more behind: not this variant's
    with meter.measure():
        allocate(200)
        allocate(-200)
    assert (meter.resident, meter.peak) == (400, 800)
    off = memory.CudaPeakMeter(enabled=False)
    with off.measure():
        allocate(10)
    assert (off.resident, off.peak) == (0, 0)

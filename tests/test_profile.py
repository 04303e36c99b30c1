"""``attnres-profile``: schema, consistency, pipeline bytes against shapes, FP8 refusal and fallback.

The rules behind the report's summaries (median step, spreads, ratio warnings, run order) are
tested against hand-computed numbers in test_profile_consistency.py; here they are checked on
the reports of real runs."""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys

import forked_cli
import pytest
import torch
from attnres_defaults import PRE_MEGATRON_DEFAULTS, old_ffn

from attnres_megatron.profiling import nvtx, precision
from attnres_megatron.profiling.markdown import split_cells
from attnres_megatron.profiling.memory import SavedActivationTracker, storage_key
from attnres_megatron.profiling.report import PAIRED_METRICS
from attnres_megatron.profiling.runner import round_robin_order
from attnres_megatron.profiling.schema import ReportValidationError, report_errors, validate_report
from attnres_megatron.profiling.spread import ratio_warning, representative_index, spread
from attnres_megatron.profiling.timers import P2P_TIMERS, ScheduleTimers, Stopwatch
from attnres_megatron.profiling.variants import variant_args

LAYERS, HIDDEN, SEQ, MICRO_BATCH = 2, 64, 32, 2
TINY = [
    *PRE_MEGATRON_DEFAULTS,
    *old_ffn(HIDDEN),
    "--device",
    "cpu",
    "--num-layers",
    str(LAYERS),
    "--hidden-size",
    str(HIDDEN),
    "--num-attention-heads",
    "4",
    "--seq-length",
    str(SEQ),
    "--micro-batch-size",
    str(MICRO_BATCH),
    "--corpus-bytes",
    "300000",
]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
FP32 = 4
WARMUP, TIMED = 1, 4  # an even count of timed rounds: the median step is the lower middle one


def profile(out_dir, *args: str) -> subprocess.CompletedProcess:
    """Run ``attnres-profile`` in a process of its own (forked from the preloaded server,
    forked_cli.py; one thread per process: the CPU is shared)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "attnres_megatron.profiling.cli", *args, "--output-dir", str(out_dir)]
    return forked_cli.run(command, env=env, timeout=600)


def load_report(out_dir, result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out_dir / "profile.json").read_text())


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile_cpu")
    result = profile(
        out, *TINY, "--global-batch-size", "4", "--warmup-steps", str(WARMUP), "--timed-steps", str(TIMED)
    )
    return out, load_report(out, result), result.stdout


@pytest.fixture(scope="module")
def pp_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile_pp2")
    result = profile(
        out,
        *TINY,
        "--num-layers",
        "4",
        "--global-batch-size",
        "8",
        "--pipeline-model-parallel-size",
        "2",
        "--attn-res-block-size",
        "3",
        "--warmup-steps",
        "1",
        "--timed-steps",
        "2",
        "--no-plots",
    )
    return load_report(out, result)


def by_name(report: dict) -> dict:
    return {variant["name"]: variant for variant in report["variants"]}


def step_table_rows(markdown: str) -> dict[str, list[str]]:
    """The cells of the step time table of a profile.md, by variant."""
    section = markdown.split("## Step time", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("| ").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0]: cells for cells in rows[1:]}


# ----------------------------------------------------------------------------- CPU run


@pytest.mark.parametrize("use_jsonschema", [True, False], ids=["jsonschema", "builtin"])
def test_report_validates_and_mutated_reports_fail(cpu_run, use_jsonschema):
    _, report, _ = cpu_run
    assert report_errors(report, use_jsonschema) == []
    mutations = [
        lambda r: r["variants"][0].pop("step_time_s"),
        lambda r: r["variants"][1].__setitem__("tokens_per_second", "fast"),
        lambda r: r["variants"][0]["memory"].__setitem__("peak_bytes", -1),
        lambda r: r["variants"][2].__setitem__("name", "half"),
        lambda r: r["precision"].__setitem__("used", 16),
        lambda r: r["variants"][0]["steps"].clear(),
        lambda r: r.__setitem__("unexpected", 1),
        lambda r: r["model"].__setitem__("num_layers", True),
        lambda r: r["variants"][1].pop("step_time_spread_s"),
        lambda r: r["variants"][1]["step_time_spread_s"].__setitem__("count", 0),
        lambda r: r["variants"][0]["steps"][0].pop("started_s"),
        lambda r: r["ratio_spreads"]["block"].pop("step_time"),
        lambda r: r["ratio_spreads"]["full"].__setitem__("forward", {"q1": 1.0}),
        lambda r: r["ratio_warnings"].append({"variant": "block", "metric": "peak_memory"}),
        lambda r: r["steps"].__setitem__("order", "shuffled"),
    ]
    for mutate in mutations:
        bad = copy.deepcopy(report)
        mutate(bad)
        assert report_errors(bad, use_jsonschema), bad
    with pytest.raises(ReportValidationError, match="step_time_s"):
        bad = copy.deepcopy(report)
        del bad["variants"][0]["step_time_s"]
        validate_report(bad, use_jsonschema)


def test_cpu_run_writes_markdown_and_plots(cpu_run):
    out, report, _ = cpu_run
    markdown = (out / "profile.md").read_text()
    assert "## Ratios to `none`" in markdown and "| block |" in markdown and "| full |" in markdown
    for name in ("step_breakdown.png", "memory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [v["name"] for v in report["variants"]] == ["none", "block", "full"]
    assert report["precision"]["requested"] == report["precision"]["used"] == "fp32"
    assert (out / "step_ratio.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["environment"]["device"] == "cpu"


def test_step_split_adds_up_and_tokens_per_second(cpu_run):
    """Every column of a row comes from the variant's median step, so the row adds up."""
    out, report, _ = cpu_run
    tokens = 4 * SEQ
    printed = step_table_rows((out / "profile.md").read_text())
    for variant in report["variants"]:
        steps = variant["steps"]
        assert len(steps) == TIMED
        for step in steps:
            parts = step["forward_s"] + step["backward_s"] + step["optimizer_s"]
            assert step["other_s"] == pytest.approx(step["step_s"] - parts, abs=1e-12)
            assert step["other_s"] >= 0  # the parts are disjoint intervals inside the step
            assert min(step["forward_s"], step["backward_s"], step["optimizer_s"]) > 0
        times = [step["step_s"] for step in steps]
        chosen = variant["representative_step"]
        assert chosen == representative_index(times) and times[chosen] == sorted(times)[(TIMED - 1) // 2]
        median_step = steps[chosen]
        assert variant["step_time_s"] == median_step["step_s"]
        for key in ("forward_s", "backward_s", "optimizer_s", "other_s", "tokens_per_second"):
            assert variant[key] == median_step[key]
        row = variant["forward_s"] + variant["backward_s"] + variant["optimizer_s"] + variant["other_s"]
        assert row == pytest.approx(variant["step_time_s"], abs=1e-12)  # the invariant of the row
        assert variant["step_time_spread_s"] == spread(times)
        assert variant["tokens_per_step"] == tokens
        assert variant["tokens_per_second"] == pytest.approx(tokens / variant["step_time_s"], rel=1e-12)
        (stage,) = variant["stages"]  # one stage: its figures are the median step's too
        assert stage["step_s"] == median_step["step_s"] and stage["forward_s"] == median_step["forward_s"]
        # The printed row adds up exactly, in hundredths of a millisecond.
        cells = printed[variant["name"]][2:7]
        assert cells == split_cells(variant)
        step_cell, *part_cells = (round(100 * float(cell)) for cell in cells)
        assert sum(part_cells) == step_cell


def test_variants_run_interleaved_round_robin(cpu_run):
    _, report, _ = cpu_run
    names = [variant["name"] for variant in report["variants"]]
    assert report["steps"]["order"] == "interleaved"
    started = sorted(
        (step["started_s"], variant["name"]) for variant in report["variants"] for step in variant["steps"]
    )
    expected = [variant for phase, _, variant in round_robin_order(names, WARMUP, TIMED) if phase == "timed"]
    assert [name for _, name in started] == expected
    assert started[0][0] == 0.0
    # round i of every variant starts before round i + 1 of any
    for index in range(TIMED - 1):
        assert max(v["steps"][index]["started_s"] for v in report["variants"]) < min(
            v["steps"][index + 1]["started_s"] for v in report["variants"]
        )


def test_ratios_are_ratios_of_reported_numbers(cpu_run):
    """Time ratios: medians of the per-round ratios of the reported steps, with their spread."""
    out, report, stdout = cpu_run
    variants = by_name(report)
    base = variants["none"]
    assert report["baseline"] == "none"
    for name, row in report["ratios"].items():
        variant = variants[name]
        for metric, key in PAIRED_METRICS.items():
            per_round = [v[key] / b[key] for v, b in zip(variant["steps"], base["steps"])]
            assert row[metric] == pytest.approx(
                sorted(per_round)[1] / 2 + sorted(per_round)[2] / 2, rel=1e-12
            )
            assert report["ratio_spreads"][name][metric] == pytest.approx(spread(per_round), rel=1e-12)
        assert row["peak_memory"] == pytest.approx(
            variant["memory"]["peak_bytes"] / base["memory"]["peak_bytes"], rel=1e-12
        )
        assert row["p2p_bytes"] is None  # no pipeline: nothing crosses a boundary
    assert all(value == 1.0 for key, value in report["ratios"]["none"].items() if key != "p2p_bytes")
    expected = [
        (name, metric)
        for name in ("block", "full")
        for metric in PAIRED_METRICS
        if ratio_warning(report["ratios"][name][metric], report["ratio_spreads"][name][metric])
    ]
    assert [(w["variant"], w["metric"]) for w in report["ratio_warnings"]] == expected
    markdown = (out / "profile.md").read_text()
    for warning in report["ratio_warnings"]:  # each one logged, and marked in the markdown
        logged = f"WARNING: attnres-profile: {warning['variant']} {warning['metric']} ratio"
        if warning["metric"] != "step_time":
            logged = f"{warning['variant']} {warning['metric']}"
        assert logged in stdout
        assert f"- {warning['variant']} {warning['metric']}: {warning['reason']}" in markdown
    assert markdown.count(" (!) |") == len(report["ratio_warnings"])  # one marked cell each


def test_interleaving_keeps_each_variants_own_rng_streams(tmp_path):
    # With dropout every step draws random numbers: interleaved steps must draw from each
    # variant's own streams, as when the variants run one after another.
    losses = {}
    for order, flags in (("interleaved", []), ("sequential", ["--sequential-variants"])):
        out = tmp_path / order
        result = profile(
            out,
            *TINY,
            *("--hidden-dropout", "0.1", "--global-batch-size", "2", "--variants", "none", "block"),
            *("--warmup-steps", "1", "--timed-steps", "2", "--no-plots", *flags),
        )
        report = load_report(out, result)
        assert report["steps"]["order"] == order
        losses[order] = {variant["name"]: variant["losses"] for variant in report["variants"]}
    assert losses["interleaved"] == losses["sequential"]
    assert losses["interleaved"]["none"] != losses["interleaved"]["block"]


def test_memory_accounting_on_cpu(cpu_run):
    _, report, _ = cpu_run
    variants = by_name(report)
    attn_res = (2 * LAYERS + 1) * 2 * HIDDEN  # one (query, gain) pair per sublayer plus the final mix
    assert variants["none"]["attn_res_parameters"] == 0
    for name in ("block", "full"):
        assert variants[name]["attn_res_parameters"] == attn_res
        assert variants[name]["parameters"] - variants["none"]["parameters"] == attn_res
    for variant in report["variants"]:
        memory, params = variant["memory"], variant["parameters"]
        assert memory["method"] == "static-plus-saved-activations"
        assert memory["peak_bytes"] >= memory["parameter_bytes"] >= FP32 * params
        assert memory["gradient_bytes"] >= FP32 * params  # fp32 main_grad buffers
        assert memory["optimizer_state_bytes"] >= 2 * FP32 * params  # Adam moments
        assert memory["peak_saved_activation_bytes"] > 0
        assert memory["peak_bytes"] == (
            memory["parameter_bytes"]
            + memory["gradient_bytes"]
            + memory["optimizer_state_bytes"]
            + memory["peak_saved_activation_bytes"]
        )


def test_aggregation_hooks_count_every_mix(cpu_run):
    _, report, _ = cpu_run
    micro_batches = report["model"]["num_micro_batches"]
    assert micro_batches == 4 // MICRO_BATCH
    variants = by_name(report)
    assert variants["none"]["aggregation"]["calls_per_step"] == 0
    for name in ("block", "full"):
        assert variants[name]["aggregation"]["calls_per_step"] == (2 * LAYERS + 1) * micro_batches
        assert 0 < variants[name]["aggregation"]["share_of_forward"] < 1


# ------------------------------------------------------------------------- pipeline run


def test_pipeline_bytes_equal_the_sources_the_next_stage_needs(pp_report):
    # 4 layers on 2 stages: stage 1 starts at sublayer 4. Block S=3: b0, block 1 (sublayers 0-2)
    # and the partial sum (sublayer 3) -> 3 tensors; Full: b0, o0, o1, o2 and the partial o3 -> 5;
    # standard residuals: 1 hidden state. Each tensor is [s, b, h] in fp32.
    tensor = SEQ * MICRO_BATCH * HIDDEN * FP32
    micro_batches = 8 // MICRO_BATCH
    variants = by_name(pp_report)
    for name, sources in (("none", 1), ("block", 3), ("full", 5)):
        (row,) = variants[name]["pipeline"]["boundaries"]
        assert row["boundary"] == "0->1" and row["sources"] == sources
        assert row["bytes_from"] == ("hidden-state-shape" if name == "none" else "ledger")
        per_micro_batch = sources * tensor
        per_step = per_micro_batch * micro_batches
        assert (
            row["forward_bytes_per_micro_batch"] == row["backward_bytes_per_micro_batch"] == per_micro_batch
        )
        assert row["forward_bytes_per_step"] == row["backward_bytes_per_step"] == per_step
        assert variants[name]["pipeline"]["p2p_bytes_per_step"] == 2 * per_step
        assert row["sender_p2p_s"] is not None and row["receiver_p2p_s"] is not None
    assert pp_report["ratios"]["block"]["p2p_bytes"] == 3.0
    assert pp_report["ratios"]["full"]["p2p_bytes"] == 5.0
    assert report_errors(pp_report, use_jsonschema=False) == []


def test_pipeline_stages_are_reported_per_rank(pp_report):
    assert pp_report["parallel"]["pipeline"] == 2 and pp_report["parallel"]["world_size"] == 2
    assert pp_report["parallel"]["launcher"] == "attnres-profile workers"
    micro_batches = 8 // MICRO_BATCH
    for variant in pp_report["variants"]:
        stages = variant["stages"]
        assert [stage["pp_rank"] for stage in stages] == [0, 1]
        compute = [stage["compute_s"] for stage in stages]
        assert variant["stage_imbalance"] == pytest.approx(max(compute) / (sum(compute) / 2), rel=1e-12)
        assert variant["bottleneck_stage"] == compute.index(max(compute))
        for stage in stages:
            assert stage["compute_s"] == pytest.approx(stage["forward_s"] + stage["backward_s"], rel=1e-12)
            assert stage["peak_memory_bytes"] > 0
        assert max(stage["peak_memory_bytes"] for stage in stages) == variant["memory"]["peak_bytes"]
        for step in variant["steps"]:
            parts = step["forward_s"] + step["backward_s"] + step["optimizer_s"]
            assert step["other_s"] == pytest.approx(step["step_s"] - parts, abs=1e-12)
            assert step["other_s"] >= 0
        # The row is the median step: the bottleneck stage's split in it, the slowest rank's time.
        median_step = variant["steps"][variant["representative_step"]]
        bottleneck = stages[variant["bottleneck_stage"]]
        assert variant["step_time_s"] == median_step["step_s"] == max(stage["step_s"] for stage in stages)
        assert variant["forward_s"] == bottleneck["forward_s"] == median_step["forward_s"]
        assert variant["backward_s"] == bottleneck["backward_s"]
        parts = variant["forward_s"] + variant["backward_s"] + variant["optimizer_s"] + variant["other_s"]
        assert parts == pytest.approx(variant["step_time_s"], abs=1e-12)
        if variant["name"] != "none":
            # 4 layers x 2 sublayers plus the final mix, split over the stages, per micro-batch
            calls = [stage["aggregation_calls_per_step"] for stage in stages]
            assert calls == [4 * micro_batches, 5 * micro_batches]


# ------------------------------------------------------------------------------- FP8


def fp8_args(**overrides) -> argparse.Namespace:
    fields = dict(
        bf16=False, fp8_format="hybrid", fp8_recipe="delayed", transformer_impl="auto", fallback_bf16=False
    )
    fields.update(overrides)
    return argparse.Namespace(**fields)


def test_fp8_without_transformer_engine_names_what_is_missing_and_the_fallback():
    with pytest.raises(SystemExit) as error:
        precision.resolve_precision(fp8_args(), "cpu")
    message = str(error.value)
    assert "Transformer Engine is not installed" in message
    assert "GPU" in message and "--fallback-bf16" in message


def test_fp8_with_transformer_engine_but_no_gpu_names_only_the_gpu(monkeypatch):
    monkeypatch.setattr(precision, "transformer_engine_available", lambda: True)
    with pytest.raises(SystemExit) as error:
        precision.resolve_precision(fp8_args(), "cpu")
    message = str(error.value)
    assert "not installed" not in message and "no CUDA GPU" in message and "--fallback-bf16" in message


def test_fp8_fallback_plan_records_requested_and_used():
    args = fp8_args(fallback_bf16=True, fp8_format="e4m3", fp8_recipe="tensorwise")
    plan = precision.resolve_precision(args, "cpu")
    assert args.bf16 is True
    assert (plan.requested, plan.used) == ("fp8-e4m3/tensorwise", "bf16")
    assert plan.config_fields() == {} and "Transformer Engine" in plan.fallback_reason
    assert plan.attn_res_statistics_dtype == "float32"


def test_fp8_cli_refuses_without_transformer_engine(tmp_path):
    result = profile(tmp_path, *TINY, "--fp8-format", "hybrid")
    assert result.returncode != 0
    assert "Transformer Engine" in result.stderr and "--fallback-bf16" in result.stderr
    assert not (tmp_path / "profile.json").exists()


def test_fp8_cli_falls_back_to_bf16(tmp_path):
    result = profile(
        tmp_path,
        *TINY,
        "--global-batch-size",
        "2",
        "--fp8-format",
        "hybrid",
        "--fallback-bf16",
        "--variants",
        "none",
        "block",
        "--warmup-steps",
        "0",
        "--timed-steps",
        "1",
        "--no-plots",
    )
    report = load_report(tmp_path, result)
    validate_report(report)
    assert report["precision"]["requested"] == "fp8-hybrid/delayed"
    assert report["precision"]["used"] == "bf16" and report["precision"]["fp8_format"] is None
    assert "Transformer Engine" in report["precision"]["fallback_reason"]
    for variant in report["variants"]:
        assert variant["memory"]["parameter_bytes"] >= 2 * variant["parameters"]  # bf16 weights
        assert variant["losses"] and all(loss == loss for loss in variant["losses"])


# ------------------------------------------------------------------------- building blocks


def test_saved_activation_tracker_counts_unique_storages_until_backward():
    class SaveThree(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b, a[:10])  # a view of a: the same storage
            return a * b

        @staticmethod
        def backward(ctx, grad):
            a, b, _ = ctx.saved_tensors
            return grad * b, grad * a

    weight = torch.nn.Parameter(torch.randn(100))
    x = torch.randn(100, requires_grad=True)
    tracker = SavedActivationTracker(exclude={storage_key(weight)})
    with tracker.track():
        y = SaveThree.apply(x, weight)  # weight is excluded; x counts once
        z = SaveThree.apply(y, y)  # y saved twice: counts once
    assert tracker.peak == tracker.current == 2 * 100 * FP32
    z.sum().backward()
    del y, z
    assert tracker.current == 0 and tracker.peak == 2 * 100 * FP32


def test_schedule_timers_sum_megatron_intervals():
    class FakeClock:
        def __init__(self):
            self.t = 0.0

        def now(self):
            self.t += 1.0
            return self.t

    timers = ScheduleTimers(FakeClock())
    for _ in range(3):
        timers("forward-compute", log_level=2).start()
        timers("forward-compute").stop()
    timers("forward-send", log_level=2).start(barrier=True)
    timers("forward-send").stop(barrier=True)
    timers("backward-recv").start()
    timers("backward-recv").stop()
    assert timers.seconds("forward-compute") == 3.0
    assert timers.seconds(*P2P_TIMERS) == 2.0
    assert timers.seconds("never-ran") == 0.0
    timers.reset()
    assert timers.totals() == {"backward-recv": 0.0, "forward-compute": 0.0, "forward-send": 0.0}
    with pytest.raises(RuntimeError):
        timers("forward-compute").stop()


def test_variant_args_choose_block_sizes():
    args = argparse.Namespace(
        model="gpt",
        num_layers=12,
        attention_residuals=None,
        attn_res_block_size=None,
        attn_res_layers_per_block=None,
        attn_res_num_blocks=None,
    )
    block = variant_args(args, "block")
    assert (block.attention_residuals, block.attn_res_num_blocks) == ("block", 8)
    given = argparse.Namespace(**{**vars(args), "attn_res_layers_per_block": 3})
    assert variant_args(given, "block").attn_res_layers_per_block == 3
    full = variant_args(given, "full")
    assert full.attention_residuals == "full" and full.attn_res_layers_per_block is None
    assert variant_args(given, "none").attn_res_layers_per_block is None
    kimi = argparse.Namespace(**{**vars(args), "model": "kimi-linear-tiny"})
    assert variant_args(kimi, "block").attention_residuals is None  # the preset's own S


def test_nvtx_helpers_do_nothing_without_cuda(monkeypatch):
    def refuse(*_):
        raise AssertionError("NVTX called on a machine without CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", refuse)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", refuse)
    with nvtx.nvtx_range("attnres-profile/step"):
        pass


def test_aggregation_probe_marks_each_call_and_detaches(monkeypatch):
    from attnres_megatron.config import AttnResTransformerConfig
    from attnres_megatron.layers.depth_attention import DepthAttention

    config = AttnResTransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        use_cpu_initialization=True,
        attention_residuals="full",
    )
    module = DepthAttention(config)
    events = []
    monkeypatch.setattr(nvtx, "nvtx_enabled", lambda: True)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: events.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: events.append(("pop",)))
    modules = nvtx.depth_attention_modules([torch.nn.ModuleDict({"mix": module})])
    probe = nvtx.AggregationProbe(modules, Stopwatch("cpu")).attach()
    probe.reset(timing=True)
    sources = [torch.randn(4, 1, 8) for _ in range(3)]
    out = module(sources)
    assert events == [("push", "attnres.aggregate:chunk0.mix"), ("pop",)]
    assert probe.calls == 1 and probe.seconds > 0
    torch.testing.assert_close(out, torch.stack(sources).mean(0))  # zero queries: the mean
    probe.detach()
    module(sources)
    assert probe.calls == 1 and len(events) == 2

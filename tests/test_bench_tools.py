"""The step-time, memory and op benchmarks run end to end on tiny shapes and report consistently."""

from __future__ import annotations

import json

import pytest
from test_pipeline_tools import load_tool

TINY = ["--layers", "4", "--hidden", "32", "--heads", "4", "--seq", "16", "--blocks", "2"]


@pytest.fixture
def tools_path(monkeypatch):
    from test_pipeline_tools import TOOLS

    monkeypatch.syspath_prepend(str(TOOLS))  # the tools import their shared proxy module


def test_bench_memory_reports_every_variant_and_the_target(single_rank, tools_path, tmp_path):
    bench = load_tool("bench_memory")
    result = bench.main([*TINY, "--output", str(tmp_path / "memory.json")])
    assert json.loads((tmp_path / "memory.json").read_text()) == json.loads(json.dumps(result))
    rows = {(row["variant"], row["recompute"]): row for row in result["rows"]}
    assert set(rows) == {(v, r) for v in ("baseline", "block", "full") for r in ("none", "selective", "full")}
    for row in rows.values():
        assert row["total_bytes"] == row["outside_layers_bytes"] + sum(row["per_layer_bytes"].values())
    assert rows["block", "selective"]["total_bytes"] < rows["block", "none"]["total_bytes"]
    target = result["target"]
    assert target["block_boundaries"] == 1  # 8 sublayers in 2 blocks
    assert target["met"] == (target["block_selective_bytes"] <= target["allowed_bytes"])


def test_bench_step_ratios_come_from_the_same_run(single_rank, tools_path):
    bench = load_tool("bench_step")
    result = bench.main(
        [*TINY, "--steps", "3", "--warmup", "1", "--impls", "torch", "auto", "--op-profile-steps", "1"]
    )
    rows = {(row["variant"], row["impl"]): row for row in result["rows"]}
    attn_res = {(v, i) for v in ("block", "full") for i in ("torch", "auto")}
    assert set(rows) == {("baseline", "torch")} | attn_res
    baseline = rows["baseline", "torch"]["samples_ms"]
    for row in rows.values():
        assert len(row["samples_ms"]) == 3
        ratios = sorted(t / b for t, b in zip(row["samples_ms"], baseline))  # the same rounds
        assert row["ratio_to_baseline"] == pytest.approx(ratios[1])
        assert row["ratio_range"] == pytest.approx([ratios[0], ratios[2]])
        assert 0 < row["fwd_bwd_ms"] <= row["step_ms"]
        fwd_bwd = sorted(
            f / b for f, b in zip(row["fwd_bwd_samples_ms"], rows["baseline", "torch"]["fwd_bwd_samples_ms"])
        )
        assert row["fwd_bwd_ratio_to_baseline"] == pytest.approx(fwd_bwd[1])
        assert row["fwd_bwd_ratio_range"] == pytest.approx([fwd_bwd[0], fwd_bwd[2]])
    assert rows["baseline", "torch"]["ratio_to_baseline"] == 1.0
    profile = result["op_profile"]["block (auto)"]
    assert profile[-1]["op"] == "total (all ops)"
    for row in profile:
        assert row["extra_ms"] == pytest.approx(row["variant_ms"] - row["baseline_ms"])
    assert [row["extra_ms"] for row in profile[:-1]] == sorted(
        (row["extra_ms"] for row in profile[:-1]), reverse=True
    )


def test_bench_step_mix_floors_replace_every_mix_of_their_steps_only(single_rank, tools_path, monkeypatch):
    from attnres_megatron.layers.depth_attention import DepthAttention

    bench = load_tool("bench_step")
    calls = []
    identity = bench.MIX_FLOORS["identity"]
    monkeypatch.setitem(
        bench.MIX_FLOORS, "identity", lambda module, sources: calls.append(1) or identity(module, sources)
    )
    original = DepthAttention.forward
    result = bench.main(
        [*TINY, "--steps", "2", "--warmup", "1", "--impls", "auto", "--variants", "block", "--mix-floors"]
    )
    assert DepthAttention.forward is original
    impls = {row["impl"] for row in result["rows"] if row["variant"] == "block"}
    assert impls == {"auto", "floor:identity", "floor:scaled-copy"}
    layers = int(TINY[TINY.index("--layers") + 1])
    assert len(calls) == 3 * (2 * layers + 1)  # every sublayer's mix and the output's, in 3 steps


def test_bench_fast_ops_times_the_cpu_fused_kernels(monkeypatch, tools_path):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    bench = load_tool("bench_fast_ops")
    result = bench.main(
        ["--seq", "16", "--hidden", "32", "--sources", "2", "3", "--sublayers", "2", "--quick"]
    )
    for row in result["rows"]:
        assert row["fused_ms"] is not None and row["fused_ms"] > 0
        assert row["two_phase_ms"] > 0 and row["two_phase_eager_ms"] > 0
        assert row["bytes_moved"] == (3 * row["n"] + 2) * 16 * 32 * 4
        # The copy reads the n sources and the gradient once and writes each once.
        copied = 2 * (row["n"] + 1) * 16 * 32 * 4
        assert row["copy_bandwidth_gbs"] == pytest.approx(copied / (row["copy_ms"] * 1e-3) / 1e9)
        assert row["bound_ms"] == pytest.approx(row["bytes_moved"] / (row["copy_bandwidth_gbs"] * 1e9) * 1e3)
    assert result["meta"]["malloc"] == "retain"


def test_bench_kernel_calls_times_every_mix_of_a_step(single_rank, tools_path, tmp_path):
    from collections import Counter

    bench = load_tool("bench_kernel_calls")
    result = bench.main([*TINY, "--steps", "2", "--warmup", "1", "--output", str(tmp_path / "calls.json")])
    assert json.loads((tmp_path / "calls.json").read_text()) == json.loads(json.dumps(result))
    # 8 sublayers in blocks of S = 4 and the output layer: sublayer j mixes the embedding, the
    # blocks sealed before it and (but at a block's first sublayer) the partial sum.
    per_block, sublayers = 4, 8
    sources = [1 + j // per_block + (j % per_block != 0) for j in range(sublayers)]
    sources.append(1 + -(-sublayers // per_block))
    expected = Counter(sources)
    for kernel in ("fused_forward", "fused_backward", "fused_forward (repeated)"):
        calls = {row["sources"]: row["calls_per_step"] for row in result["rows"] if row["kernel"] == kernel}
        assert calls == expected, kernel
    timed = [row for row in result["rows"] if row["kernel"] != "fused_forward (repeated)"]
    assert result["kernels_ms_per_step"] == pytest.approx(sum(row["ms_per_step"] for row in timed))
    for row in result["rows"]:
        assert row["median_us"] > 0
        assert ("outside_step_median_us" in row) == (row["kernel"] == "fused_forward")


def test_bench_kernel_variants_alternates_two_builds_on_cold_inputs(monkeypatch, tools_path, tmp_path):
    """An A / A run (both variants the package's sources: one cached library): every pass timed
    each round, bandwidths from the bytes each pass must move, ratios from the paired rounds."""
    from attnres_megatron.ops import cpu_extension

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    bench = load_tool("bench_kernel_variants")
    seq, hidden, n, rounds = 16, 32, 3, 3
    package = str(cpu_extension.CSRC)
    args = ["--a", package, "--b", package, "--seq", str(seq), "--hidden", str(hidden)]
    args += ["--sources", str(n), "--rounds", str(rounds), "--warmup", "1", "--cold-bytes", "4096"]
    result = bench.main([*args, "--output", str(tmp_path / "variants.json")])
    assert json.loads((tmp_path / "variants.json").read_text()) == json.loads(json.dumps(result))
    rows = {(row["variant"], row["pass"]): row for row in result["rows"]}
    assert set(rows) == {
        ("a", "forward"),
        ("a", "backward"),
        ("b", "forward"),
        ("b", "backward"),
        ("-", "copy"),
        ("-", "add"),
    }
    moved = {"forward": n + 1, "backward": 2 * n + 1, "copy": 2, "add": 3}  # [T, h] tensors read or written
    for (_, name), row in rows.items():
        assert len(row["samples_ms"]) == rounds
        assert row["gbs"] == pytest.approx(moved[name] * seq * hidden * 4 / (row["median_ms"] * 1e-3) / 1e9)
    for name in ("forward", "backward"):
        paired = [b / a for a, b in zip(rows["a", name]["samples_ms"], rows["b", name]["samples_ms"])]
        assert result["ratio_b_to_a"][name]["median"] == pytest.approx(sorted(paired)[rounds // 2])
    with pytest.raises(SystemExit):
        bench.main(["--a", package, "--b", str(tmp_path / "missing")])


def test_kernel_sources_take_a_variant_directorys_files(tmp_path):
    """A variant directory replaces the package's files it holds (and only those): another library."""
    from attnres_megatron.ops import cpu_extension

    (tmp_path / "rows.h").write_text("// a variant header\n")
    texts = cpu_extension.read_sources(tmp_path)
    assert texts[0] == "// a variant header\n"
    assert texts[1:] == cpu_extension.read_sources()[1:]
    assert cpu_extension.library_path(overrides=tmp_path) != cpu_extension.library_path()

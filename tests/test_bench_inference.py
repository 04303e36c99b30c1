"""tools/bench_inference.py on tiny shapes: prefill and decode rates of every variant with ratios from
the same rounds, and the prefill peak-memory probe in a fresh process."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from test_pipeline_tools import TOOLS, load_tool

TINY = [
    "--layers",
    "2",
    "--hidden",
    "32",
    "--heads",
    "4",
    "--seq",
    "12",
    "--blocks",
    "2",
    "--decode-tokens",
    "3",
]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))  # the tools import their shared proxy module
    return load_tool("bench_inference")


def test_rates_and_ratios_come_from_the_same_rounds(single_rank, bench, tmp_path):
    output = tmp_path / "inference.json"
    result = bench.main([*TINY, "--rounds", "3", "--warmup", "1", "--no-memory", "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(result))
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["baseline", "block", "full"] and result["memory"] == []
    base = rows["baseline"]
    for row in rows.values():
        for phase, samples in (("prefill", "prefill_samples_ms"), ("decode", "decode_samples_ms")):
            assert len(row[samples]) == 3
            ratios = sorted(t / b for t, b in zip(row[samples], base[samples]))  # the same rounds
            assert row[f"{phase}_time_ratio"]["median"] == pytest.approx(ratios[1])
            assert row[f"{phase}_time_ratio"]["range"] == pytest.approx([ratios[0], ratios[2]])
        assert row["prefill_tokens_per_s"] == pytest.approx(
            12e3 / statistics.median(row["prefill_samples_ms"])
        )
        assert row["decode_tokens_per_s"] == pytest.approx(1e3 / statistics.median(row["decode_samples_ms"]))
    assert base["prefill_time_ratio"]["median"] == base["decode_time_ratio"]["median"] == 1.0
    assert result["meta"]["settings"]["seq"] == 12 and result["meta"]["threads"] >= 1


def test_the_memory_probe_measures_one_prefill_in_a_fresh_process(bench):
    hidden, seq, decode, layers = 128, 128, 3, 2
    shape = [
        "--layers",
        str(layers),
        "--hidden",
        str(hidden),
        "--heads",
        "4",
        "--seq",
        str(seq),
        "--blocks",
        "2",
    ]
    args = bench.build_parser().parse_args(
        [*shape, "--decode-tokens", str(decode), "--prefill-chunk-size", "32"]
    )
    row = bench.run_memory_probe("full", args)
    assert row["variant"] == "full"
    # Megatron-Core's cache: keys and values of every layer for the prompt and the decode steps, fp32.
    assert row["kv_cache_mib"] == 2 * layers * (seq + decode) * hidden * 4 / 2**20
    for key in ("prefill_peak_mib", "chunked_prefill_peak_mib"):
        assert math.isfinite(row[key]) and row[key] > 0
        without = key.replace("_peak_mib", "_peak_without_cache_mib")
        assert row[without] == pytest.approx(row[key] - row["kv_cache_mib"])

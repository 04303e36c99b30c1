"""Pipeline parallelism under Megatron-Core's real schedules (1F1B and interleaved 1F1B,
several micro-batches in flight): exact loss and gradients, bytes per boundary equal to the
strict minimum (computed here by set arithmetic, not by the layout code), cross-stage cache
accounting, cached and uncached runs identical bit for bit (fp32), and a deliberately
dropped deposit being caught."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import forked_cli
import pytest
from conftest import free_port
from pipeline_minimum import hop_tensors
from pipeline_worker import HIDDEN, MICRO_BATCH, SCENARIOS, SEQ

FP64_BYTES, FP32_BYTES = 8, 4
PARITY = sorted(
    name for name, spec in SCENARIOS.items() if not spec.get("drop_deposit") and not spec.get("pretrain")
)
BITWISE = sorted(name for name, spec in SCENARIOS.items() if spec.get("bitwise"))


def launch(world: int, out: Path) -> None:
    names = [name for name, spec in SCENARIOS.items() if spec["pp"] == world]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={world}",
        f"--master-port={free_port()}",
        str(Path(__file__).with_name("pipeline_worker.py")),
        "--out",
        str(out),
        *names,
    ]
    done = forked_cli.run(command, timeout=900)  # ranks forked from the preloaded server
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("pipeline")
    for world in sorted({spec["pp"] for spec in SCENARIOS.values()}):
        launch(world, out)
    found: dict = {}
    for path in out.glob("*.rank*.json"):
        data = json.loads(path.read_text())
        found.setdefault(data["scenario"], {})[data["rank"]] = data
    for path in out.glob("*.summary.json"):  # attnres-pretrain runs: name -> {"summary": ...}
        found[path.name.removesuffix(".summary.json")] = {"summary": json.loads(path.read_text())}
    return found


def chunk_layer_ranges(spec: dict) -> list[tuple[int, int]]:
    """Global layer range of every chunk (chunk v * P + r), from the scenario alone."""
    layers, pp, vpp = spec["layers"], spec["pp"], spec.get("vpp") or 1
    if "split" in spec:
        counts = spec["split"]
    elif vpp > 1:
        per_chunk = layers // (pp * vpp)
        counts = [per_chunk] * (pp * vpp)
    else:
        first, last = spec.get("first"), spec.get("last")
        inner = pp - (first is not None) - (last is not None)
        rest = layers - (first or 0) - (last or 0)
        counts = ([first] if first is not None else []) + [rest // inner] * inner
        counts += [last] if last is not None else []
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [(start, start + count) for start, count in zip(starts, counts)]


def expected_sources(spec: dict, cached: bool = True) -> dict[int, int]:
    """Tensors crossing boundary c -> c+1: the strict minimum (cached), or every source the
    receiver reads; by set arithmetic over tensor identities (tests/pipeline_minimum.py)."""
    block = 1 if spec.get("mode") == "full" else spec["block"]
    ranges = [(2 * a, 2 * b) for a, b in chunk_layer_ranges(spec)]
    return dict(enumerate(hop_tensors(ranges, spec["pp"], block, cached)))


def traffic(ranks, boundary: int, direction: str) -> list[dict]:
    """Bytes per micro-batch over ``boundary`` as the ranks that saw it recorded them."""
    key = f"{direction}_bytes"
    return [d["ledger"][str(boundary)][key] for d in ranks if d["ledger"].get(str(boundary), {}).get(key)]


def assert_bytes(spec: dict, ranks, cached: bool, element_bytes: int) -> None:
    expected = expected_sources(spec, cached)
    assert len(expected) == spec["pp"] * (spec.get("vpp") or 1) - 1
    for boundary, sources in expected.items():
        per_micro_batch = sources * SEQ * MICRO_BATCH * spec.get("hidden", HIDDEN) * element_bytes
        want = {str(m): per_micro_batch for m in range(spec["micro_batches"])}
        assert traffic(ranks, boundary, "forward") == [want], (boundary, sources)
        assert traffic(ranks, boundary, "backward") == [want], (boundary, sources)


@pytest.mark.parametrize("scenario", PARITY)
def test_loss_and_every_gradient_match_single_rank(results, scenario):
    ranks = results[scenario]
    assert sorted(ranks) == list(range(SCENARIOS[scenario]["pp"]))
    for data in ranks.values():
        assert data["grad_mismatches"] == [], data["grad_mismatches"][:5]
        assert data["grads_checked"] > 0
        assert data["accounting_error"] is None
    last = ranks[max(ranks)]
    assert last["loss"] == pytest.approx(last["oracle_loss"], rel=1e-12)
    assert sum(d["grads_checked"] for d in ranks.values()) >= 9 * SCENARIOS[scenario]["layers"]


@pytest.mark.parametrize("scenario", PARITY)
def test_bytes_per_boundary_equal_the_strict_minimum(results, scenario):
    assert_bytes(SCENARIOS[scenario], results[scenario].values(), True, FP64_BYTES)


@pytest.mark.parametrize("scenario", [n for n in PARITY if SCENARIOS[n].get("vpp")])
def test_interleaving_keeps_blocks_and_drains_every_deposit(results, scenario):
    spec = SCENARIOS[scenario]
    cached, naive = expected_sources(spec), expected_sources(spec, cached=False)
    assert sum(cached.values()) < sum(naive.values())  # later hops carry only what the rank lacks
    for data in results[scenario].values():
        counts = data["cache"]
        assert counts["stored"] > 0 and counts["reads"] >= counts["stored"]
        assert counts["drains"] == counts["stored"] and counts["deposits"] == counts["reads"]


@pytest.mark.parametrize("scenario", BITWISE)
def test_cached_and_uncached_runs_agree_bit_for_bit(results, scenario):
    """fp32, every gradient and every micro-batch loss: the value cache changes the bytes
    sent, not one bit of the results (the gradient summation order is canonical)."""
    spec = SCENARIOS[scenario]
    ranks = [data["bitwise"] for data in results[scenario].values()]
    for data in ranks:
        assert data["mismatches"] == [], data["mismatches"][:5]
        assert data["compared"] > 0
        for run in ("cached", "uncached"):
            assert data[run]["accounting_error"] is None
            assert data[run]["cache"]["drains"] == data[run]["cache"]["stored"] > 0
    assert sum(len(data["cached"]["losses"]) for data in ranks) == spec["micro_batches"]
    assert_bytes(spec, [data["cached"] for data in ranks], True, FP32_BYTES)
    assert_bytes(spec, [data["uncached"] for data in ranks], False, FP32_BYTES)


def test_a_dropped_deposit_is_caught(results):
    errors = [d["accounting_error"] for d in results["pp2_vpp2_dropped_deposit"].values()]
    assert errors and all(e and "never reached the producer" in e for e in errors)


def test_attnres_pretrain_trains_an_uneven_interleaved_layout_from_its_flag(results):
    """--pipeline-model-parallel-layout end to end: attnres-pretrain's main() on the two ranks of
    this module's PP2 launch, layers [1, 2, 1, 1] over PP2 x V2 (V from the layout)."""
    name = "pretrain_pp2_layout_vpp2"
    spec = SCENARIOS[name]
    data = results[name]["summary"]
    assert data["losses"][-1] < data["losses"][0] - 0.3
    traffic = data["pipeline_traffic"]
    assert [row["boundary"] for row in traffic] == ["0->1", "1->2", "2->3"]
    expected = expected_sources(spec)  # from the split alone, by set arithmetic
    assert [row["sources_cached"] for row in traffic] == [expected[b] for b in range(3)]
    for row in traffic:
        assert row["forward_bytes_per_micro_batch"] == row["sources_cached"] * 32 * 2 * 64 * FP32_BYTES
        assert row["backward_bytes_per_micro_batch"] == row["forward_bytes_per_micro_batch"]

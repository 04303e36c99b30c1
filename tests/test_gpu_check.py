"""The GPU check kit on CPU: its dry run end to end, its isolation of checks, its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from test_pipeline_tools import TOOLS, load_tool

ROOT = TOOLS.parent
SCHEMA = json.loads((TOOLS / "gpu_check_schema.json").read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``scripts/gpu_check.sh --dry-run`` with no wheels at hand: (completed process, out dir)."""
    base = tmp_path_factory.mktemp("gpu_check")
    out, empty = base / "out", base / "no_wheels"
    empty.mkdir()
    command = ["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out), "--wheels", str(empty)]
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return done, out


@pytest.fixture
def kit(monkeypatch):
    """tools/gpu_check.py as a module (tools/ on the path for the modules it imports)."""
    monkeypatch.syspath_prepend(str(TOOLS))
    return load_tool("gpu_check")


def test_dry_run_writes_a_valid_report_and_markdown(dry_run, kit):
    jsonschema = pytest.importorskip("jsonschema")
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / kit.JSON_NAME).read_text())
    jsonschema.validate(report, SCHEMA)
    assert report["dry_run"] is True and report["summary"]["ok"]
    statuses = {check["name"]: check["status"] for check in report["checks"]}
    assert list(statuses) == [check.name for check in kit.CHECKS]
    assert statuses == dict.fromkeys(statuses, "passed") | {"te_fp8": "skipped"}  # no CUDA: no FP8
    assert {t["check"] for t in report["targets"]} == {"bandwidth", "step"}
    assert report["environment"]["device"].startswith("cpu")
    markdown = (out / kit.MARKDOWN_NAME).read_text()
    assert markdown.startswith("## GPU check (dry run")
    for check in kit.CHECKS:
        assert check.title in done.stdout and check.command() in done.stdout  # the printed plan
    for title in ("### Targets", "(a) Triton kernels", "(b) fused kernel", "(c) step time", "(d) FLA"):
        assert title in markdown
    assert "missing" in done.stderr and "--fetch-wheels" in done.stdout  # no wheels here: said so
    assert "=== kernels" in (out / kit.LOG_NAME).read_text()


def test_dry_run_compares_every_dtype_and_gradient(dry_run):
    report = json.loads((dry_run[1] / "gpu_check.json").read_text())
    checks = {check["name"]: check for check in report["checks"]}
    cases = checks["kernels"]["figures"]["cases"]
    assert {c["dtype"] for c in cases} == {"fp32", "bf16"} and any(
        c["path"].startswith("tiled") for c in cases
    )
    for case in cases:
        assert set(case["errors"]) == {"output", "grad_query", "grad_gain", "grad_sources"}
        assert case["deterministic"] and case["ok"]
    row = checks["bandwidth"]["figures"]["rows"][0]
    assert row["bytes_moved"] == (3 * row["n"] + 2) * 32 * 64 * 2
    assert row["bound_ms"] == pytest.approx(row["bytes_moved"] / row["copy_best_gbs"] / 1e6)
    variants = {(r["variant"], r["impl"]) for r in checks["step"]["figures"]["rows"]}
    assert variants == {("baseline", "torch"), ("block", "torch"), ("full", "torch")}
    assert {r["backend"] for r in checks["kda"]["figures"]["rows"]} == {"torch"}
    assert checks["pytest_gpu"]["figures"]["tests"] > 0  # collected, and skipped without CUDA


def test_a_check_that_raises_leaves_the_others_running(kit, monkeypatch, tmp_path):
    import gpu_check_cases as cases

    def boom(scale):
        raise RuntimeError("planted")

    monkeypatch.setattr(cases, "CHECK_FUNCTIONS", {"kernels": boom, "kda": lambda scale: cases.skipped("x")})
    monkeypatch.setattr(cases, "environment", dict)  # no Megatron import: this test stays quick
    kit.run_child(["kernels", "kda"], tmp_path / "result.json", dry_run=False)
    found = json.loads((tmp_path / "result.json").read_text())["checks"]
    assert found["kernels"]["status"] == "error" and "planted" in found["kernels"]["reason"]
    assert found["kda"]["status"] == "skipped"


@pytest.mark.parametrize(
    ("command", "status", "words"),
    [
        (["sleep", "30"], "timeout", "budget of 1 s"),
        (["sh", "-c", "echo crashed; exit 3"], "error", "exit 3: crashed"),
    ],
)
def test_a_child_that_hangs_or_dies_is_reported(kit, tmp_path, command, status, words):
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True)
    log_path = tmp_path / "child.log"
    log_path.write_text("crashed\n")
    running = kit.Running(["kernels"], process, tmp_path / "none.json", log_path, 1.0, time.monotonic())
    with open(tmp_path / "all.log", "w") as log:
        _, checks = kit.finish_group(running, log)
    assert checks["kernels"]["status"] == status and words in checks["kernels"]["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the GPU run would start")
def test_a_gpu_run_without_cuda_stops_before_any_work(kit, tmp_path, capsys):
    assert kit.main(["--out", str(tmp_path / "out")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_groups_run_one_check_per_process_on_gpu(kit):
    names = [check.name for check in kit.CHECKS]
    assert kit.groups_for(names, dry_run=False) == [[name] for name in names]
    assert kit.groups_for(names, dry_run=True) == [[n for n in names if n != "pytest_gpu"], ["pytest_gpu"]]
    assert sum(check.expected_s for check in kit.CHECKS) < kit.DEADLINE_S < 8 * 60


def test_unmet_targets_and_failures_show_in_the_markdown(kit):
    results = {check.name: {"status": "skipped", "reason": "r"} for check in kit.CHECKS}
    target = {
        "name": "Block N=8 step / baseline (auto)",
        "value": 1.05,
        "op": "<=",
        "goal": 1.02,
        "met": False,
    }
    results["step"] = {"status": "passed", "seconds": 3.0, "targets": [target], "markdown": ["| table |"]}
    results["kernels"] = {"status": "failed", "reason": "outside tolerance: bf16 n=9"}
    args = kit.parse_args(["--dry-run"])
    report = kit.build_report([c.name for c in kit.CHECKS], {"device": "X"}, results, args, time.monotonic())
    assert report["summary"]["ok"] is False and report["summary"]["failed"] == 1
    text = kit.markdown(report)
    assert "| step | Block N=8 step / baseline (auto) | 1.050 | <= 1.02 | **no** |" in text
    assert "| kernels | failed | - | 150 | outside tolerance: bf16 n=9 |" in text
    unreported = kit.build_report([c.name for c in kit.CHECKS], {}, results, args, time.monotonic())
    assert unreported["environment"]["device"].startswith("unknown")  # every child died: still a report
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(unreported, SCHEMA)

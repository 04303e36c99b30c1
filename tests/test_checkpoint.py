"""Checkpoints and robustness of ``attnres-pretrain``: exact resume, cross-layout loads,
warm starts from baseline checkpoints, clear errors, SIGTERM, non-finite steps."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path

import forked_cli
import pytest
from attnres_defaults import PRE_MEGATRON_DEFAULTS, old_ffn
from test_distributed_cli import clean_env, pretrain, torchrun

BASE = [
    *PRE_MEGATRON_DEFAULTS,
    *old_ffn(64),
    "--device",
    "cpu",
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "32",
    "--micro-batch-size",
    "2",
    "--lr-warmup-iters",
    "2",
    "--log-interval",
    "100",
    "--corpus-bytes",
    "300000",
]
BLOCK = ["--attention-residuals", "block", "--attn-res-block-size", "3"]
SINGLE = [sys.executable]


def run(launcher, tmp_path: Path, name: str, *args: str) -> dict:
    summary = tmp_path / f"{name}.json"
    result = pretrain(launcher, *BASE, *args, "--summary-json", str(summary))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(summary.read_text())
    data["stdout"] = result.stdout
    return data


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> tuple[dict, Path]:
    """A 10-iteration run stopped by --exit-interval after iteration 6, and its checkpoint
    (read, never written, by the tests: the ones that damage it work on a copy)."""
    tmp_path = tmp_path_factory.mktemp("interrupted")
    ck = tmp_path / "ck"
    first = run(
        SINGLE, tmp_path, "first", *BLOCK, "--train-iters", "10", "--exit-interval", "6", "--save", str(ck)
    )
    return first, ck


def test_resume_reproduces_the_uninterrupted_losses_exactly(tmp_path, interrupted):
    full = run(SINGLE, tmp_path, "full", *BLOCK, "--train-iters", "10")
    first, ck = interrupted
    assert f"> checkpoint: {ck} (resume with --load {ck})" in first["stdout"].splitlines()
    resumed = run(SINGLE, tmp_path, "resumed", *BLOCK, "--train-iters", "10", "--load", str(ck))
    assert resumed["start_iteration"] == 6
    assert resumed["losses"] == full["losses"][6:]  # bitwise


@pytest.mark.parametrize(
    "layout",
    [["--tensor-model-parallel-size", "2", "--sequence-parallel"], ["--pipeline-model-parallel-size", "2"]],
    ids=["tp2", "pp2"],
)
def test_checkpoint_from_another_layout_gives_the_same_loss(tmp_path, layout):
    ck = str(tmp_path / "ck")
    parallel = run(
        torchrun(2),
        tmp_path,
        "parallel",
        *BLOCK,
        *layout,
        "--train-iters",
        "5",
        "--save",
        ck,
        "--save-interval",
        "4",
    )
    (tmp_path / "ck" / "latest_checkpointed_iteration.txt").write_text("4")
    single = run(SINGLE, tmp_path, "single", *BLOCK, "--train-iters", "5", "--load", ck, "--no-load-optim")
    # Iteration 5's loss is computed before its update: same weights, same batch.
    assert single["losses"] == pytest.approx(parallel["losses"][4:], rel=1e-5)


def test_attn_res_warm_starts_from_a_baseline_checkpoint(tmp_path):
    ck = str(tmp_path / "baseline")
    run(SINGLE, tmp_path, "baseline", "--attention-residuals", "none", "--train-iters", "3", "--save", ck)
    warm = run(SINGLE, tmp_path, "warm", *BLOCK, "--train-iters", "3", "--load", ck)
    line = next(ln for ln in warm["stdout"].splitlines() if ln.startswith("> warm start"))
    reported = set(line.split("initial values: ", 1)[1].split(", "))
    expected = {
        f"decoder.layers.{layer}.attn_res_{kind}.{param}"
        for layer in range(2)
        for kind in ("attention", "mlp")
        for param in ("pseudo_query", "key_gain")
    }
    expected |= {"decoder.attn_res_final.pseudo_query", "decoder.attn_res_final.key_gain"}
    assert reported == expected
    assert warm["start_iteration"] == 0


def test_a_load_directory_without_a_checkpoint_is_refused_before_any_work(tmp_path, pretrain_refusal):
    message = pretrain_refusal([*BASE, *BLOCK, "--train-iters", "4", "--load", str(tmp_path)])
    assert "latest_checkpointed_iteration.txt" in message


def test_bad_checkpoints_fail_before_training(tmp_path, interrupted):
    ck = tmp_path / "ck"
    shutil.copytree(interrupted[1], ck)
    wider = pretrain(SINGLE, *BASE, *BLOCK, "--hidden-size", "128", "--train-iters", "10", "--load", str(ck))
    assert wider.returncode != 0 and "iteration " not in wider.stdout
    for shard in (ck / "iter_0000006").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])  # truncate
    broken = pretrain(SINGLE, *BASE, *BLOCK, "--train-iters", "10", "--load", str(ck))
    assert broken.returncode != 0 and "incomplete or corrupted" in broken.stderr
    assert " iteration " not in broken.stdout


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    ck = tmp_path / "ck"
    command = [
        sys.executable,
        "-m",
        "attnres_megatron.training.pretrain",
        *BASE,
        *BLOCK,
        "--train-iters",
        "100000",
        "--log-interval",
        "1",
        "--save",
        str(ck),
    ]
    process = forked_cli.Popen(command, stdout=forked_cli.PIPE, stderr=forked_cli.PIPE, env=clean_env())
    for line in process.stdout:
        if " iteration " in line:
            break
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert "SIGTERM received" in out
    saved = int((ck / "latest_checkpointed_iteration.txt").read_text())
    assert saved >= 1 and (ck / f"iter_{saved:07d}" / "metadata.json").is_file()


def test_non_finite_steps_stop_with_the_iteration_or_are_skipped(tmp_path):
    explode = ["--lr", "1e30", "--min-lr", "0", "--clip-grad", "0", "--train-iters", "6"]
    stopped = pretrain(SINGLE, *BASE, *BLOCK, *explode)
    assert stopped.returncode != 0 and "non-finite loss or gradients at iteration" in stopped.stderr
    skipping = run(SINGLE, tmp_path, "skip", *BLOCK, *explode, "--skip-nonfinite-steps")
    assert 1 <= len(skipping["skipped_iterations"]) <= 10  # within --max-skipped-nonfinite-steps' default
    limit = ["--skip-nonfinite-steps", "--max-skipped-nonfinite-steps", "2"]
    diverging = pretrain(SINGLE, *BASE, *BLOCK, *explode, *limit)
    assert diverging.returncode != 0, diverging.stdout[-2000:]
    assert "more than --max-skipped-nonfinite-steps 2: the run is diverging" in diverging.stderr

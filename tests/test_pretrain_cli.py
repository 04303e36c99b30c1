"""The main job: ``attnres-pretrain`` trains a tiny AttnRes GPT on CPU end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TINY = [
    "--device",
    "cpu",
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "64",
    "--micro-batch-size",
    "4",
    "--lr",
    "3e-3",
    "--lr-warmup-iters",
    "3",
    "--log-interval",
    "5",
    "--corpus-bytes",
    "1000000",
]


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "attnres_megatron.training.pretrain", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=check,
    )


@pytest.mark.parametrize("mode", ["block", "full"])
def test_pretrain_20_steps_loss_decreases(tmp_path, mode):
    summary_path = tmp_path / "summary.json"
    block = ["--attn-res-block-size", "2"] if mode == "block" else []
    result = run_cli(
        *TINY,
        "--train-iters",
        "20",
        "--attention-residuals",
        mode,
        *block,
        "--summary-json",
        str(summary_path),
    )
    assert "iteration       20/      20" in result.stdout
    assert "tokens/s" in result.stdout and f"attention residuals: {mode}" in result.stdout
    summary = json.loads(summary_path.read_text())
    losses = summary["losses"]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert summary["final_loss"] < summary["initial_loss"]
    assert summary["tokens_per_second"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attention-residuals", "block"], "--attn-res-num-blocks"),
        (["--attention-residuals", "block", "--attn-res-block-size", "99"], "--attn-res-block-size"),
        (["--hidden-size", "30"], "--num-attention-heads"),
        (["--train-iters", "0"], "--train-iters"),
    ],
)
def test_bad_flags_fail_before_training(args, message):
    result = run_cli(*TINY, "--train-iters", "5", *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "iteration" not in result.stdout


def test_tensorboard_diagnostics_and_wsd_schedule(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "tb"
    result = run_cli(
        *TINY,
        "--train-iters",
        "10",
        "--log-interval",
        "1",
        "--attention-residuals",
        "block",
        "--attn-res-block-size",
        "2",
        "--lr-decay-style",
        "WSD",
        "--lr-wsd-decay-iters",
        "3",
        "--tensorboard-dir",
        str(board),
    )
    assert result.stdout.splitlines()[-1] == f"> TensorBoard logs: {board} (tensorboard --logdir {board})"
    events = EventAccumulator(str(board))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second"} <= scalars
    assert {"depth/output_rms/L1.attn", "depth/output_rms/final", "depth/grad_norm/L1"} <= scalars
    assert "depth/attention_weights" in events.Tags()["images"]
    lrs = [event.value for event in events.Scalars("train/lr")]
    assert lrs[3:7] == pytest.approx([3e-3] * 4)  # stable phase at the peak
    assert lrs[-1] < lrs[6]  # final decay

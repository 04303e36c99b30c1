"""The main job: ``attnres-pretrain`` trains a tiny AttnRes GPT on CPU end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import forked_cli
import pytest
from attnres_defaults import PRE_MEGATRON_DEFAULTS, old_ffn

TINY = [
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


def run_cli(*args: str, check: bool = True, fresh: bool = False) -> subprocess.CompletedProcess:
    """``attnres-pretrain args``, forked from the preloaded server (forked_cli.py) unless ``fresh``."""
    command = [sys.executable, "-m", "attnres_megatron.training.pretrain", *args]
    result = forked_cli.run(command, timeout=600, fresh=fresh)
    if check:
        result.check_returncode()
    return result


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
    # The default --attn-res-impl auto names its choice (the C++ kernels build in CI too); tensors
    # this small stay in cache, where one pass beats two-phase.
    choice = (
        "> AttnRes aggregation: --attn-res-impl auto -> one-pass with the C++ kernels "
        "(cpu, float32, block gradients summed in place)"
    )
    assert choice in result.stdout
    summary = json.loads(summary_path.read_text())
    losses = summary["losses"]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert summary["final_loss"] < summary["initial_loss"]
    assert summary["tokens_per_second"] > 0


BAD_FLAGS = [
    (["--attention-residuals", "block"], "--attn-res-num-blocks"),
    (["--attention-residuals", "block", "--attn-res-block-size", "99"], "--attn-res-block-size"),
    (["--hidden-size", "30"], "--num-attention-heads"),
    (["--train-iters", "0"], "--train-iters"),
]


@pytest.mark.parametrize("args, message", BAD_FLAGS)
def test_bad_flags_fail_before_training(pretrain_refusal, args, message):
    """attnres-pretrain's main() in-process: parsing, validation and the model config (conftest.py)."""
    assert message in pretrain_refusal([*TINY, "--train-iters", "5", *args])


def test_the_cli_refuses_bad_flags_before_training():
    """End to end, once: the real command exits non-zero with the message and trains nothing."""
    args, message = BAD_FLAGS[1]  # refused by the model config, after the argument checks
    result = run_cli(*TINY, "--train-iters", "5", *args, check=False, fresh=True)
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
    assert {"lm loss", "learning-rate", "grad-norm", "iteration-time", "tokens-per-second"} <= scalars
    assert {"attn_res/output_rms/L1.attn", "attn_res/output_rms/final", "attn_res/grad_norm/L1"} <= scalars
    assert "attn_res/depth_attention_weights" in events.Tags()["images"]
    lrs = [event.value for event in events.Scalars("learning-rate")]
    assert lrs[3:7] == pytest.approx([3e-3] * 4)  # stable phase at the peak
    assert lrs[-1] < lrs[6]  # final decay

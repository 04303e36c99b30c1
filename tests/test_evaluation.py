"""Evaluation on the validation and test splits, and Megatron-LM's log lines and TensorBoard tags.

The single-process run of the ``trained`` fixture evaluates after iterations 3 and 6 and at the
end (validation and test), saving a checkpoint at 3 and 6. Its validation and test losses are
checked against a plain forward pass of the checkpointed weights (read without Megatron) over
the samples Megatron-LM's sample counts assign to each evaluation, and against the same
evaluation under torchrun in other parallel layouts.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import forked_cli
import pytest
import torch
from attnres_defaults import PRE_MEGATRON_MODEL
from conftest import free_port

from attnres_megatron.training.evaluation import evaluation_mode, evaluation_samples
from attnres_megatron.training.training_log import (
    IntervalStats,
    evaluation_lines,
    iteration_line,
    perplexity,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "--device",
    "cpu",
    "--num-layers",
    "4",  # PP 2 x VPP 2 needs four chunks of one layer
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "2",
    "--seq-length",
    "32",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--lr-warmup-iters",
    "0",
    "--corpus-bytes",
    "1000000",
    "--split",
    "90,5,5",  # 45 documents: 3 for validation, 2 for test
    "--attention-residuals",
    "block",
    "--attn-res-block-size",
    "3",
    *PRE_MEGATRON_MODEL,  # RMSNorm, no biases, no dropout: weights test_diagnostics.py reads plainly
]
EVAL = ["--train-iters", "6", "--log-interval", "2", "--eval-interval", "3", "--eval-iters", "2"]
# Dropout on while training, so a disturbed RNG would show in the training losses.
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
MEGATRON_TAGS = ["learning-rate", "batch-size", "lm loss", "loss-scale", "grad-norm"]
MEGATRON_TAGS += ["lm loss validation", "lm loss validation ppl"]
LOG_FIELDS = [
    "consumed samples",
    "elapsed time per iteration (ms)",
    "learning rate",
    "global batch size",
    "lm loss",
    "loss scale",
    "grad norm",
    "number of skipped iterations",
    "number of nan iterations",
]


def pretrain(launcher: list[str], *args: str) -> subprocess.CompletedProcess:
    """``attnres-pretrain`` with ``args`` (forked from the preloaded server, forked_cli.py); fails
    the test when it fails."""
    command = [*launcher, "-m", "attnres_megatron.training.pretrain", *args]
    result = forked_cli.run(command, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def torchrun(nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
    ]


@dataclass
class Run:
    """A finished run: what it printed, its summary JSON and its output directories."""

    stdout: str
    summary: dict
    checkpoints: Path
    board: Path


def run(tmp_path: Path, launcher: list[str], *args: str) -> Run:
    """``attnres-pretrain`` writing its summary, checkpoints and TensorBoard logs under ``tmp_path``."""
    summary = tmp_path / "summary.json"
    result = pretrain(launcher, *args, "--summary-json", str(summary))
    return Run(result.stdout, json.loads(summary.read_text()), tmp_path / "ck", tmp_path / "tb")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Run:
    """Six iterations, evaluating after 3 and 6 and at the end, checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("trained")
    outputs = ["--save", str(out / "ck"), "--save-interval", "3", "--tensorboard-dir", str(out / "tb")]
    return run(out, [sys.executable], *BASE, *EVAL, *DROPOUT, *outputs)


# --------------------------------------------------------------------------- the oracle


def plain_model(args: Namespace, checkpoint: Path, scratch: Path) -> torch.nn.Module:
    """The checkpointed model, read with torch.distributed.checkpoint alone, in eval mode."""
    from test_diagnostics import plain_model_state

    from attnres_megatron.models.builder import build_gpt_model
    from attnres_megatron.training.model_setup import config_from_args, gpt_model_kwargs

    state = plain_model_state(checkpoint, scratch)
    vocab_size = state["embedding.word_embeddings.weight"].shape[0]
    config = config_from_args(args, "cpu")
    model = build_gpt_model(config, vocab_size, transformer_impl="local", **gpt_model_kwargs(args))
    loaded = model.load_state_dict(state, strict=False)
    assert not loaded.unexpected_keys
    assert all(key.endswith("_extra_state") for key in loaded.missing_keys)
    return model.eval()


def plain_loss(model: torch.nn.Module, dataset, indices: range) -> float:
    """Mean next-token loss of the samples ``indices`` in one plain forward pass."""
    tokens = torch.stack([torch.as_tensor(dataset[i]["tokens"]) for i in indices]).long()
    labels = torch.stack([torch.as_tensor(dataset[i]["labels"]) for i in indices]).long()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None, labels=labels).float().mean().item()


def test_losses_equal_a_plain_forward_over_megatrons_evaluation_samples(trained, tmp_path, reseed):
    from attnres_megatron.training.arguments import build_parser
    from attnres_megatron.training.data import build_split_datasets, default_corpus_prefix

    args = build_parser().parse_args([*BASE, *EVAL])
    per_evaluation = 2 * 4  # eval iters x global batch
    prefix = default_corpus_prefix(max_bytes=1000000)
    common = dict(data_path=[prefix], split="90,5,5", seq_length=32, seed=1234, train_samples=0)
    # Megatron-LM sizes the validation set for every evaluation: (6 // 3 + 1) x eval iters x batch.
    _, valid, _ = build_split_datasets(**common, valid_samples=3 * per_evaluation)
    _, _, test = build_split_datasets(**common, valid_samples=0, test_samples=per_evaluation)
    expected = [  # (split, iteration, dataset, samples): each evaluation reads the next slice
        ("validation", 3, valid, range(0, 8)),
        ("validation", 6, valid, range(8, 16)),
        ("validation", 6, valid, range(16, 24)),  # the final one
        ("test", 6, test, range(0, 8)),
    ]
    reported = trained.summary["evaluations"]
    assert [(e["split"], e["iteration"]) for e in reported] == [(s, i) for s, i, _, _ in expected]
    models = {}
    for (_, iteration, dataset, samples), result in zip(expected, reported):
        if iteration not in models:
            reseed()
            checkpoint = trained.checkpoints / f"iter_{iteration:07d}"
            models[iteration] = plain_model(args, checkpoint, tmp_path / f"plain{iteration}.pt")
        assert result["loss"] == pytest.approx(plain_loss(models[iteration], dataset, samples), rel=1e-5)
        assert result["ppl"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert len({e["loss"] for e in reported}) == len(reported)  # different weights or samples
    assert trained.summary["validation_loss"] == reported[2]["loss"]
    assert trained.summary["test_loss"] == reported[3]["loss"]


@pytest.mark.parametrize(
    "layout",
    [
        ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"],
        [],  # data parallel 2
    ],
    ids=["tp2_sp", "pp2_vpp2", "dp2"],
)
def test_evaluation_in_parallel_layouts_matches_the_single_process(trained, tmp_path, layout):
    """The saved weights at iteration 6 loaded under another layout: no training is left, so
    the run is the final validation (the same slice) and test evaluation."""
    load = ["--load", str(trained.checkpoints), "--no-load-optim"]
    parallel = run(tmp_path, torchrun(2), *BASE, *EVAL, *layout, *load)
    assert parallel.summary["losses"] == [] and parallel.summary["start_iteration"] == 6
    single = trained.summary["evaluations"][-2:]
    evaluations = parallel.summary["evaluations"]
    assert [(e["split"], e["iteration"]) for e in evaluations] == [("validation", 6), ("test", 6)]
    for mine, reference in zip(evaluations, single):
        assert mine["loss"] == pytest.approx(reference["loss"], rel=2e-5)
    assert "validation loss at iteration 6 on test set" in parallel.stdout


def test_evaluation_leaves_the_training_losses_unchanged(trained, tmp_path):
    plain = run(tmp_path, [sys.executable], *BASE, *EVAL, *DROPOUT, "--eval-iters", "0")
    assert plain.summary["evaluations"] == [] and "validation loss" not in plain.stdout
    assert plain.summary["losses"] == trained.summary["losses"]  # bitwise, dropout on


# --------------------------------------------------------------------------- TensorBoard


def test_tensorboard_holds_megatron_lms_tags(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained.board), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {*MEGATRON_TAGS, *(f"{tag} vs samples" for tag in MEGATRON_TAGS), "iteration-time"} <= scalars
    assert {"lm loss test", "lm loss test ppl"} <= scalars
    assert {"attn_res/output_rms/L1.attn", "attn_res/grad_norm/L4"} <= scalars
    assert "attn_res/depth_attention_weights" in events.Tags()["images"]
    own = {tag for tag in scalars if tag.startswith("attn_res/")}
    megatron_style = {tag.removesuffix(" vs samples") for tag in scalars - own}
    assert megatron_style <= {
        *MEGATRON_TAGS,
        "lm loss test",
        "lm loss test ppl",
        "iteration-time",
        "tokens-per-second",
    }

    losses = events.Scalars("lm loss")  # every iteration, as Megatron-LM writes it
    assert [e.step for e in losses] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in losses] == pytest.approx(trained.summary["losses"], rel=1e-7)
    assert [e.step for e in events.Scalars("lm loss vs samples")] == [4, 8, 12, 16, 20, 24]
    validation = [e for e in trained.summary["evaluations"] if e["split"] == "validation"]
    logged = events.Scalars("lm loss validation")
    assert [e.step for e in logged] == [3, 6, 6]
    assert [e.value for e in logged] == pytest.approx([e["loss"] for e in validation], rel=1e-7)
    assert [e.step for e in events.Scalars("lm loss validation vs samples")] == [12, 24, 24]
    ppl = [e.value for e in events.Scalars("lm loss validation ppl")]
    assert ppl == pytest.approx([math.exp(e["loss"]) for e in validation], rel=1e-6)
    assert [e.value for e in events.Scalars("batch-size")] == [4.0] * 6
    assert [e.step for e in events.Scalars("iteration-time")] == [2, 4, 6]


# --------------------------------------------------------------------------- log lines

ITERATION = re.compile(
    r"^ \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\] iteration +(\d+)/ +6 \|"
    r" consumed samples: +(\d+) \| elapsed time per iteration \(ms\): \d+\.\d \|"
    r" learning rate: \d\.\d{6}E[-+]\d\d \| global batch size: +4 \| lm loss: \d\.\d{6}E[-+]\d\d \|"
    r" loss scale: 1\.0 \| grad norm: \d+\.\d{3} \| number of skipped iterations: +0 \|"
    r" number of nan iterations: +0 \|$"
)


def test_log_lines_carry_megatron_lms_fields(trained):
    lines = trained.stdout.splitlines()
    iterations = [ITERATION.match(line) for line in lines if "| consumed samples:" in line]
    assert all(iterations), lines
    # the first iteration of the run, then every --log-interval (as Megatron-LM)
    assert [(int(m[1]), int(m[2])) for m in iterations] == [(1, 4), (2, 8), (4, 16), (6, 24)]
    boxes = [i for i, line in enumerate(lines) if line.startswith(" validation loss at ")]
    prefixes = [
        "iteration 3 |",
        "iteration 6 |",
        "iteration 6 on validation set |",
        "iteration 6 on test set |",
    ]
    assert [lines[i].removeprefix(" validation loss at ").split(" lm loss")[0] for i in boxes] == prefixes
    for index, result in zip(boxes, trained.summary["evaluations"]):
        rule = "-" * (len(lines[index]) + 1)
        assert lines[index - 1] == lines[index + 1] == rule
        assert f"lm loss value: {result['loss']:.6E} | lm loss PPL: {result['ppl']:.6E} | " in lines[index]
    done = next(line for line in lines if line.startswith("> done:"))
    summary = trained.summary
    assert f"lm loss {summary['initial_loss']:.4f} -> {summary['final_loss']:.4f}" in done
    assert f"validation lm loss {summary['validation_loss']:.4f}" in done
    assert re.search(r"tokens/s: \d+ \|", done) and "e-0" not in done


def test_iteration_line_follows_megatron_lms_training_log():
    stats = IntervalStats()
    stats.add(2.0, skipped=False)
    stats.add(3.0, skipped=False)
    stats.add(float("nan"), skipped=True)
    line = iteration_line(40, 100, 320, 12.345, 2.5e-4, 8, stats, 1.0, 0.56789)
    fields = [part.split(":")[0].strip() for part in line.split("|")[1:-1]]
    assert fields == LOG_FIELDS
    assert re.match(r"^ \[[^]]+\] iteration       40/     100 \| consumed samples:          320 \|", line)
    assert "elapsed time per iteration (ms): 12.3 | learning rate: 2.500000E-04 |" in line
    assert "global batch size:     8 | lm loss: 2.500000E+00 | loss scale: 1.0 | grad norm: 0.568 |" in line
    assert line.endswith("| number of skipped iterations:   1 | number of nan iterations:   1 |")
    skipped_only = IntervalStats(skipped=1)
    line = iteration_line(1, 1, 8, 1.0, 1e-3, 8, skipped_only, 1.0, None)
    assert "lm loss" not in line and "grad norm" not in line  # as Megatron-LM leaves them out


def test_evaluation_box_and_perplexity():
    rule, text, closing = evaluation_lines("iteration 5", 2.0)
    assert (
        text == " validation loss at iteration 5 | lm loss value: 2.000000E+00 | lm loss PPL: 7.389056E+00 | "
    )
    assert rule == closing == "-" * (len(text) + 1)
    assert perplexity(30.0) == math.exp(20.0)  # capped as Megatron-LM caps it


def test_evaluation_sample_counts_follow_megatron_lm():
    args = Namespace(train_iters=10, eval_interval=3, eval_iters=2, global_batch_size=4)
    assert evaluation_samples(args) == ((10 // 3 + 1) * 2 * 4, 2 * 4)
    assert evaluation_samples(Namespace(**{**vars(args), "eval_iters": 0})) == (0, 0)
    assert evaluation_samples(Namespace(**{**vars(args), "eval_interval": 0})) == (8, 8)  # final only


def test_evaluation_mode_restores_training_mode_and_every_rng(single_rank):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    before = torch.get_rng_state(), {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
    with evaluation_mode([model]):
        assert not model.training and not torch.is_grad_enabled()
        torch.rand(3)
        with get_cuda_rng_tracker().fork():
            torch.rand(3)
    assert model.training and torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), before[0])
    after = get_cuda_rng_tracker().get_states()
    assert after.keys() == before[1].keys()
    assert all(torch.equal(after[name], state) for name, state in before[1].items())

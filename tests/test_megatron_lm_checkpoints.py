"""Checkpoint interchange: a checkpoint saved by ``attnres-pretrain`` resumes in Megatron-LM's
training loop and the reverse, in the same layout (``SAVE/iter_*/``, torch_dist), with the
loss of an uninterrupted run; a Megatron-LM checkpoint attnres-pretrain cannot resume is
refused naming the field.

The launches need a Megatron-LM checkout in ``MEGATRON_LM_DIR`` (skipped without, see
``megatron_lm_runs.py``); the mapping functions are tested in-process without one.
"""

from __future__ import annotations

import argparse
import io
import math
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron_lm_runs import SKIP_REASON, Run, checkout_available, launch

from attnres_megatron.training import checkpoint_format as fmt
from attnres_megatron.training import safe_unpickle
from attnres_megatron.training.resume import schedule_changes

needs_checkout = pytest.mark.skipif(not checkout_available(), reason=SKIP_REASON)

ITERATIONS = 3
STOP = 2  # the first route saves here and exits; the other resumes for iteration 3
TINY_GPT = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --attention-residuals block "
    "--attn-res-num-blocks 2"
).split()
# Megatron-LM's dropout (0.1) stays on: the RNG states must map for the losses to agree.
RUN = (
    f"--seq-length 32 --max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8 "
    f"--train-iters {ITERATIONS} --lr 1e-3 --min-lr 1e-4 --lr-decay-iters {ITERATIONS} --mock-data "
    "--tokenizer-type NullTokenizer --vocab-size 255 --eval-interval 3 --eval-iters 1 --log-interval 1 "
    "--seed 1234"
).split()
LOSS_RTOL = 1e-5


# ---------------------------------------------------------------------------- launches


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[Run, Path]]:
    """Launches of this module by name: the run and its working directory."""
    return {}


def run_once(runs: dict, tmp_path_factory, name: str, route: str, *extra: str) -> Run:
    """``route`` with the tiny flags and ``extra`` (``{dir}``: its working directory), launched
    once per module."""
    if name not in runs:
        workdir = tmp_path_factory.mktemp(name)
        extra = tuple(value.replace("{dir}", str(workdir)) for value in extra)
        runs[name] = launch(route, [*TINY_GPT, *RUN, *extra], workdir), workdir
    return runs[name][0]


def reference(runs, tmp_path_factory) -> dict[int, float]:
    run = run_once(runs, tmp_path_factory, "reference", "attnres-pretrain")
    assert run.returncode == 0, run.output[-6000:]
    losses = run.scalars("lm loss")
    assert sorted(losses) == list(range(1, ITERATIONS + 1))
    return losses


def saved_by(runs, tmp_path_factory, route: str, *extra: str) -> Path:
    """A checkpoint of ``route`` stopped after iteration ``STOP`` (--exit-interval)."""
    flags = ["--exit-interval", str(STOP), "--save-interval", str(STOP), "--save", "{dir}/ck", *extra]
    name = "-".join(["save", route, *extra]).replace("--", "")
    run = run_once(runs, tmp_path_factory, name, route, *flags)
    assert run.returncode == 0, run.output[-6000:]
    ck = runs[name][1] / "ck"
    assert (ck / "latest_checkpointed_iteration.txt").read_text().strip() == str(STOP)
    assert (ck / f"iter_{STOP:07d}" / "metadata.json").is_file()  # Megatron-Core torch_dist
    return ck


def assert_resumed_at_the_reference_loss(run: Run, wanted: dict[int, float]) -> float:
    assert run.returncode == 0, run.output[-6000:]
    losses = run.scalars("lm loss")
    assert sorted(losses) == [ITERATIONS], losses  # only the iteration after the checkpoint
    got, expected = losses[ITERATIONS], wanted[ITERATIONS]
    assert math.isclose(got, expected, rel_tol=LOSS_RTOL), (got, expected)
    # Megatron-LM's log line: iteration 3 after the 16 samples of the checkpoint.
    assert f"iteration        {ITERATIONS}/       {ITERATIONS} |" in run.output
    assert f"consumed samples:           {ITERATIONS * 8} |" in run.output
    return abs(got - expected) / abs(expected)


@needs_checkout
def test_attnres_pretrain_checkpoint_resumes_in_megatron_lms_loop(runs, tmp_path_factory):
    wanted = reference(runs, tmp_path_factory)
    ck = saved_by(runs, tmp_path_factory, "attnres-pretrain")
    resumed = run_once(runs, tmp_path_factory, "driver-resumes", "driver", "--load", str(ck))
    difference = assert_resumed_at_the_reference_loss(resumed, wanted)
    assert f"loading distributed checkpoint from {ck} at iteration {STOP}" in resumed.output
    assert "successfully loaded checkpoint" in resumed.output
    assert "RNG state will be ignored" not in resumed.output
    print(f"attnres-pretrain -> Megatron-LM: relative loss difference at iteration 3 {difference:.2e}")


@needs_checkout
def test_megatron_lm_checkpoint_resumes_in_attnres_pretrain(runs, tmp_path_factory):
    wanted = reference(runs, tmp_path_factory)
    ck = saved_by(runs, tmp_path_factory, "driver")
    resumed = run_once(runs, tmp_path_factory, "attnres-resumes", "attnres-pretrain", "--load", str(ck))
    difference = assert_resumed_at_the_reference_loss(resumed, wanted)
    assert "has no checksum manifest (saved by Megatron-LM" in resumed.output  # accepted with a note
    assert f"> resumed from {ck} at iteration {STOP}" in resumed.output
    print(f"Megatron-LM -> attnres-pretrain: relative loss difference at iteration 3 {difference:.2e}")


@needs_checkout
def test_a_megatron_lm_setting_attnres_pretrain_cannot_resume_is_refused(runs, tmp_path_factory):
    ck = saved_by(runs, tmp_path_factory, "driver", "--optimizer", "sgd")
    refused = run_once(runs, tmp_path_factory, "attnres-refuses", "attnres-pretrain", "--load", str(ck))
    assert refused.returncode != 0
    assert (
        "saved by Megatron-LM) holds what attnres-pretrain cannot resume: optimizer: the checkpoint "
        "holds the state of --optimizer sgd; attnres-pretrain trains with adam only" in refused.output
    )
    assert "--no-load-optim" in refused.output and "iteration        3/" not in refused.output
    weights = run_once(
        runs,
        tmp_path_factory,
        "attnres-weights-only",
        "attnres-pretrain",
        "--load",
        str(ck),
        "--no-load-optim",
    )
    assert weights.returncode == 0, weights.output[-6000:]
    assert sorted(weights.scalars("lm loss")) == [ITERATIONS]


# ---------------------------------------------------------------------------- mapping, in-process


def restricted_round_trip(value, source: str = "common.pt"):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return safe_unpickle.restricted_torch_load(buffer, source)


def saved_namespace() -> argparse.Namespace:
    values = {
        "num_layers": None,  # a preset's default: filled from the model config
        "hidden_size": 64,
        "num_attention_heads": 4,
        "ffn_hidden_size": None,
        "seq_length": 32,
        "max_position_embeddings": None,
        "global_batch_size": 8,
        "tokenizer_type": "NullTokenizer",
        "data_path": ["a", "b"],  # not a plain value: not saved
        "attention_residuals": "block",
    }
    shape = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 256}
    return fmt.megatron_args(
        values, shape, consumed_train=16, consumed_valid=8, world_size=2, data_parallel_size=2
    )


def test_the_saved_args_namespace_holds_what_megatron_lms_load_reads():
    saved = saved_namespace()
    assert isinstance(saved, argparse.Namespace)
    # megatron.training.checkpointing.check_checkpoint_args / load_checkpoint read these.
    assert (saved.num_layers, saved.hidden_size, saved.num_attention_heads) == (4, 64, 4)
    assert saved.ffn_hidden_size == 256 and saved.max_position_embeddings == 32
    assert saved.add_position_embedding is True and saved.ckpt_format == "torch_dist"
    assert (saved.consumed_train_samples, saved.consumed_valid_samples, saved.skipped_train_samples) == (
        16,
        8,
        0,
    )
    assert (saved.world_size, saved.data_parallel_size) == (2, 2)
    assert not hasattr(saved, "data_path")
    assert all(isinstance(value, (int, float, str, bool, type(None))) for value in vars(saved).values())


def test_the_saved_args_namespace_round_trips_through_the_allowlist():
    saved = saved_namespace()
    loaded = restricted_round_trip({"args": saved, "checkpoint_version": 3.0})["args"]
    assert isinstance(loaded, safe_unpickle.SavedArgs) and isinstance(loaded, dict)
    assert dict(loaded) == vars(saved)
    assert loaded["num_layers"] == loaded.num_layers == 4  # both ways of reading it
    assert getattr(loaded, "no_save_rng", None) is None and not hasattr(loaded, "no_save_rng")
    assert fmt.saved_arguments(loaded) == vars(saved) == fmt.saved_arguments(saved)
    assert fmt.saved_arguments({"a": 1}) == {"a": 1} and fmt.saved_arguments(None) == {}


def test_megatron_lms_common_state_loads_through_the_allowlist():
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    megatron_args = argparse.Namespace(
        attention_backend=AttnBackend.auto,
        model_type=ModelType.encoder_or_decoder,
        exit_signal=signal.SIGTERM,
        params_dtype=torch.float32,
        cp_comm_type=["p2p"],
        num_layers=4,
    )
    common = {
        "args": megatron_args,
        "checkpoint_version": 3.0,
        "iteration": 2,
        "opt_param_scheduler": {"num_steps": 16},
        "content_metadata": {"singleton_local_shards": False, "chained_optim_avoid_prefix": True},
    }
    loaded = restricted_round_trip(common)
    assert loaded["args"].attention_backend is AttnBackend.auto
    assert loaded["args"].exit_signal is signal.SIGTERM and loaded["args"].params_dtype is torch.float32
    assert loaded["content_metadata"] == common["content_metadata"]


def test_anything_else_in_the_args_is_refused_naming_the_type():
    import datetime

    with pytest.raises(
        safe_unpickle.RefusedPickleError, match="common.pt: refused to unpickle datetime.date"
    ):
        restricted_round_trip({"args": argparse.Namespace(when=datetime.date(2025, 1, 1))})


def test_rng_states_map_both_ways_and_through_the_allowlist():
    states = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": None,  # no CUDA generator: Megatron-LM's CPU route saves torch's state there
        "tracker": {"model-parallel-rng": torch.Generator().manual_seed(3).get_state()},
    }
    saved = fmt.rng_to_megatron(states)
    assert [sorted(entry) for entry in saved] == [sorted(fmt.MEGATRON_RNG_KEYS)]
    assert torch.equal(saved[0]["cuda_rng_state"], states["torch"])
    read = fmt.rng_from_checkpoint(restricted_round_trip(saved, "item rng_state"))  # numpy arrays inside
    assert read["random"] == states["random"] and torch.equal(read["torch"], states["torch"])
    assert read["numpy"][0] == "MT19937" and np.array_equal(read["numpy"][1], states["numpy"][1])
    assert torch.equal(read["tracker"]["model-parallel-rng"], states["tracker"]["model-parallel-rng"])
    older = fmt.rng_from_checkpoint({"torch": states["torch"], "tracker": states["tracker"]})
    assert sorted(older) == ["torch", "tracker"]
    with pytest.raises(fmt.FormatError, match="rng_state holds 2 RNG states.*--data-parallel-random-init"):
        fmt.rng_from_checkpoint(saved * 2)
    with pytest.raises(fmt.FormatError, match="rng_state lacks rng_tracker_states"):
        fmt.rng_from_checkpoint([{"torch_rng_state": states["torch"]}])
    with pytest.raises(fmt.FormatError, match="rng_state holds a str"):
        fmt.rng_from_checkpoint("state")


def test_rng_sharding_is_megatron_lms():
    assert fmt.megatron_rng_sharding((1, 2), (0, 2), (3, 4), 1) == ((2, 2), (1, 0), 3)
    assert fmt.megatron_rng_sharding((1, 2), (0, 2), (3, 4), 2) == ((2, 2, 4), (1, 0, 3), 0)


ATTNRES_SCHEDULE = {
    "max_lr": 1e-3,
    "lr_warmup_steps": 0,
    "num_steps": 2,
    "lr_decay_style": "linear",
    "lr_decay_steps": 3,
    "min_lr": 1e-4,
    "start_wd": 0.01,
    "end_wd": 0.01,
    "wd_incr_style": "constant",
    "wd_incr_steps": 3,
}


def test_the_scheduler_counts_iterations_here_and_samples_in_megatron_lm():
    megatron = fmt.scheduler_to_megatron(ATTNRES_SCHEDULE, 8)
    # What Megatron-LM's loop saved at iteration 2 with the same flags (tests/ RUN, batch 8).
    assert megatron == {**ATTNRES_SCHEDULE, "num_steps": 16, "lr_decay_steps": 24, "wd_incr_steps": 24}
    assert fmt.scheduler_from_megatron(megatron, 8) == ATTNRES_SCHEDULE
    common = {"opt_param_scheduler": megatron, "scheduler": {"num_steps": 99}}
    assert fmt.saved_scheduler(common, {"global_batch_size": 8}) == ATTNRES_SCHEDULE
    assert fmt.saved_scheduler({"scheduler": ATTNRES_SCHEDULE}, {}) == ATTNRES_SCHEDULE  # older checkpoints
    assert fmt.saved_scheduler({"opt_param_scheduler": ATTNRES_SCHEDULE}, {}) == ATTNRES_SCHEDULE  # API
    assert fmt.saved_scheduler({}, {}) == {}


def test_a_warmup_fraction_maps_exactly():
    # Megatron-LM: fraction x (decay iterations x batch); attnres-pretrain: fraction x decay iterations.
    ours = {**ATTNRES_SCHEDULE, "lr_warmup_steps": 0.1 * 3}
    megatron_value = 0.1 * (3 * 8)
    saved = fmt.scheduler_to_megatron(ours, 8, {"lr_warmup_steps": megatron_value})
    assert saved["lr_warmup_steps"] == megatron_value
    back = fmt.scheduler_from_megatron(saved, 8)
    assert schedule_changes(back, ours) == []  # equal up to rounding
    assert fmt.settle(back, ours)["lr_warmup_steps"] == ours["lr_warmup_steps"]
    assert schedule_changes({**back, "max_lr": 3e-3}, ours) == ["--lr: checkpoint 0.003, this run 0.001"]


def test_consumed_samples_come_from_either_format():
    assert fmt.consumed_train_samples({"data_state": {"consumed_samples": 12}}, {}, 2) == 12
    assert fmt.consumed_train_samples({}, {"consumed_train_samples": 16, "global_batch_size": 4}, 2) == 16
    assert fmt.consumed_train_samples({}, {"consumed_train_samples": 0, "global_batch_size": 4}, 2) == 8
    assert fmt.consumed_valid_samples(7, 3, 2, 8) == 32 and fmt.consumed_valid_samples(7, None, 2, 8) == 0


def test_the_sharding_metadata_is_megatron_lms():
    assert fmt.sharding_metadata(False) == {
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
    }
    metadata = {**fmt.sharding_metadata(True), "dp_cp_group": object()}
    assert metadata["distrib_optim_sharding_type"] == "dp_reshardable"
    assert "dp_cp_group" not in fmt.serializable_metadata(metadata)


@pytest.mark.parametrize(
    "saved, field",
    [
        ({"optimizer": "sgd"}, "optimizer: the checkpoint holds the state of --optimizer sgd"),
        ({"fp16": True}, "fp16: the checkpoint was saved with --fp16"),
        ({"no_save_optim": True}, "optimizer: the checkpoint was saved with --no-save-optim"),
        ({"no_save_rng": True}, "rng_state: the checkpoint was saved with --no-save-rng"),
        ({"rampup_batch_size": ["4", "4", "100"]}, "rampup_batch_size: the checkpoint was saved with"),
        ({"data_parallel_random_init": True, "data_parallel_size": 2}, "data_parallel_random_init: "),
    ],
)
def test_fields_that_cannot_map_are_named(saved, field):
    common = {"checkpoint_version": 3.0, "args": argparse.Namespace(**saved)}
    (problem,) = fmt.refusals(common, fmt.saved_arguments(common["args"]), resume_state=True)
    assert problem.startswith(field), problem
    assert fmt.refusals(common, fmt.saved_arguments(common["args"]), resume_state=False) == []
    message = fmt.refusal_message("ck", "ck/iter_0000002", common, [problem])
    assert "(saved by Megatron-LM)" in message and "--no-load-optim" in message


def test_a_clean_checkpoint_has_no_refusals_and_an_old_version_has_one():
    clean = {"optimizer": "adam", "fp16": False, "no_save_optim": None, "no_save_rng": None}
    common = {"checkpoint_version": 3.0}
    assert fmt.refusals(common, clean, resume_state=True) == []
    assert fmt.refusals({"data_state": None}, {}, resume_state=True) == []  # older attnres-pretrain
    (problem,) = fmt.refusals({"checkpoint_version": 2.0}, clean, resume_state=False)
    assert problem.startswith("checkpoint_version 2.0")
    assert fmt.saved_by({"checkpoint_version": 3.0, "model_signature": {}}) == "attnres-pretrain"

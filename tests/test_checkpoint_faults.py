"""Hostile checkpoints and faults while saving: planted pickles never run, a save killed at any
stage leaves the previous checkpoint loadable and unmixed, a flipped bit names its file, a resume
checks what it resumes, and a finished job run again exits 0."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import shutil
import signal
import sys
from pathlib import Path

import forked_cli
import pytest
import torch
from test_diagnostics import plot_tool_module
from test_distributed_cli import clean_env, pretrain

from attnres_megatron.training import safe_unpickle
from attnres_megatron.training.checkpoint_files import (
    KILL_AT_ENV,
    SAVE_STAGES,
    TRACKER_FILE,
    fault_point,
    prepare_staging,
    publish,
    replaced_dir,
    staging_dir,
)
from attnres_megatron.training.checkpoint_manifest import (
    MANIFEST_FILE,
    checkpoint_files,
    hash_files,
    read_manifest,
    write_manifest,
)
from attnres_megatron.training.checkpointing import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    verify_checkpoint,
)

TINY = [
    "--device",
    "cpu",
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "2",
    "--seq-length",
    "32",
    "--micro-batch-size",
    "2",
    "--lr-warmup-iters",
    "0",
    "--eval-iters",
    "0",
    "--mock-data",
]
BLOCK_S4 = ["--attention-residuals", "block", "--attn-res-block-size", "4"]
RUN = [*TINY, *BLOCK_S4, "--train-iters", "4", "--save-interval", "2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """One run's checkpoints at iterations 2 and 4 (read only: tests work on copies)."""
    ck = tmp_path_factory.mktemp("saved") / "ck"
    result = pretrain([sys.executable], *RUN, "--save", str(ck))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return ck


def copy_of(saved: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ck"
    shutil.copytree(saved, target)
    return target


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, data: bytes) -> None:
    """Replace a checkpoint file and, as an attacker would, the manifest's digest of it."""
    path.write_bytes(data)
    manifest = read_manifest(str(path.parent))
    write_manifest(
        str(path.parent), hash_files(str(path.parent), manifest["files"]), run_id=manifest["run_id"]
    )


class NoModel:
    """A setup without model chunks: load_checkpoint reads the metadata and stops there."""

    def unwrapped(self) -> list:
        return []


# ---------------------------------------------------------------------------- planted pickles


def test_a_planted_metadata_pickle_is_refused_and_never_runs(saved, tmp_path):
    ck, marker = copy_of(saved, tmp_path), tmp_path / "pwned"
    metadata = ck / "iter_0000004" / ".metadata"
    metadata.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata does not match its sha256"):
        load_checkpoint(NoModel(), str(ck), load_optimizer=False)
    plant(metadata, pickle.dumps(Payload(marker)))  # the manifest rewritten to match
    with pytest.raises(CheckpointError, match=r"\.metadata: refused to unpickle posix\.system"):
        load_checkpoint(NoModel(), str(ck), load_optimizer=False)
    assert not marker.exists()
    with open(saved / "iter_0000004" / ".metadata", "rb") as handle:  # only admitted classes
        real = safe_unpickle.restricted_pickle_load(handle, ".metadata")
    index = next(iter(real.storage_data))
    real.storage_data[index] = dataclasses.replace(real.storage_data[index], relative_path="../../secret")
    plant(metadata, pickle.dumps(real))
    with pytest.raises(CheckpointError, match="names the data file '../../secret', outside the checkpoint"):
        load_checkpoint(NoModel(), str(ck), load_optimizer=False)


def test_a_planted_common_pickle_is_refused_by_pretrain_and_the_plot_tool(saved, tmp_path, pretrain_refusal):
    ck, marker = copy_of(saved, tmp_path), tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"iteration": 4, "args": Payload(marker)}, buffer)
    plant(ck / "iter_0000004" / "common.pt", buffer.getvalue())
    message = pretrain_refusal([*TINY, *BLOCK_S4, "--train-iters", "6", "--load", str(ck)])
    assert "common.pt: refused to unpickle posix.system" in message
    with pytest.raises(SystemExit, match="common.pt: refused to unpickle posix.system"):
        plot_tool_module().checkpoint_args(ck)
    assert not marker.exists()


def test_byte_items_and_plain_exports_are_read_with_the_allowlist(tmp_path):
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    assert DefaultLoadPlanner.load_bytes is safe_unpickle._load_bytes  # RNG states in .distcp files
    assert FileSystemReader.read_metadata is safe_unpickle._read_metadata
    marker, buffer = tmp_path / "pwned", io.BytesIO()
    torch.save([Payload(marker)], buffer)
    buffer.seek(0)
    with pytest.raises(safe_unpickle.RefusedPickleError, match="item rng_state: refused"):
        safe_unpickle.restricted_torch_load(buffer, "item rng_state")
    export = tmp_path / "export"
    export.mkdir()
    torch.save({"w": Payload(marker)}, export / "model_state.pt")
    with pytest.raises(SystemExit, match="model_state.pt: refused to unpickle posix.system"):
        plot_tool_module().load_plain_export(torch.nn.Linear(1, 1), export)
    assert not marker.exists()


# ---------------------------------------------------------------------------- integrity


def test_a_flipped_bit_names_the_file(saved, tmp_path):
    ck = copy_of(saved, tmp_path)
    shard = ck / "iter_0000004" / "__0_1.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=r"iter_0000004 is incomplete or corrupted: __0_1\.distcp does not"
    ):
        load_checkpoint(NoModel(), str(ck), load_optimizer=False)
    (ck / "iter_0000004" / MANIFEST_FILE).unlink()  # no manifest: an older checkpoint, loads with a note
    assert "no checksum manifest" in verify_checkpoint(str(ck / "iter_0000004"), str(ck))


# ---------------------------------------------------------------------------- killed saves


def save_in_child(root: Path, iteration: int, source: Path, stage: str) -> bool:
    """Save a copy of checkpoint ``source`` as ``iteration`` under ``root`` (the steps of
    save_checkpoint after Megatron's shard writing) in a forked child killed at ``stage``;
    whether it was killed."""
    pid = os.fork()
    if pid == 0:  # the child only moves files
        code = 0
        try:
            os.environ[KILL_AT_ENV] = stage
            staging = prepare_staging(str(root), iteration)
            fault_point("staging")
            for name in checkpoint_files(str(source)):  # what Megatron's shard writing leaves
                shutil.copyfile(source / name, Path(staging) / name)
            fault_point("shards")
            publish(str(root), iteration, hash_files(staging, checkpoint_files(staging)), "child-run")
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0, status
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def assert_loads(ck: Path) -> tuple[int, str]:
    """The latest checkpoint verifies and loads into the model its arguments describe."""
    iteration, path = latest_checkpoint(str(ck))
    assert verify_checkpoint(path, str(ck)) is None  # every file matches one manifest: not mixed
    plot = plot_tool_module()
    args, _ = plot.checkpoint_args(ck)
    plot.load_distributed_checkpoint(plot.build_model(args), ck)
    return iteration, read_manifest(path)["run_id"]


@pytest.mark.parametrize(
    "stage, iteration",
    [(stage, 4) for stage in SAVE_STAGES] + [("shards", 6), ("renamed", 6), ("tracker-temp", 6)],
    ids=lambda value: str(value),
)
def test_a_save_killed_at_any_stage_leaves_a_loadable_checkpoint(
    saved, tmp_path, single_rank, stage, iteration
):
    """Iteration 4 replaces the checkpoint the tracker names (the worst case); 6 is a new one."""
    ck = copy_of(saved, tmp_path)
    before = read_manifest(str(ck / "iter_0000004"))["run_id"]
    assert save_in_child(ck, iteration, saved / "iter_0000002", stage) == (
        iteration == 4 or stage != "set-aside"
    )
    loaded, owner = assert_loads(ck)
    committed = SAVE_STAGES.index(stage) >= SAVE_STAGES.index("renamed")
    if iteration == 4:  # the tracker's checkpoint is the old one until the new one is in place
        assert (loaded, owner) == (4, "child-run" if committed else before)
    else:
        assert (loaded, owner) == ((6, "child-run") if stage == "tracker" else (4, before))
    assert save_in_child(ck, iteration, saved / "iter_0000002", "none") is False  # the next save
    assert assert_loads(ck) == (iteration, "child-run")
    assert not os.path.exists(staging_dir(str(ck), iteration))
    assert not os.path.exists(replaced_dir(str(ck), iteration))


def killed_pretrain(tmp_path: Path, stage: str, *argv: str) -> tuple[int, str]:
    """attnres-pretrain killed at save stage ``stage``: its exit status and output. It runs in a
    session of its own, ended afterwards (forked_cli.run does both): Megatron's writer leaves a
    multiprocessing manager behind when its parent is killed."""
    command = [sys.executable, "-m", "attnres_megatron.training.pretrain", *argv]
    done = forked_cli.run(command, env=clean_env(**{KILL_AT_ENV: stage}), timeout=600)
    return done.returncode, done.stdout + done.stderr


def test_a_real_overwrite_killed_midway_keeps_the_previous_checkpoint(saved, tmp_path, single_rank):
    """attnres-pretrain --overwrite-checkpoints into another run's directory, killed between
    moving that run's iteration-2 checkpoint aside and putting its own in place."""
    ck = copy_of(saved, tmp_path)
    status, output = killed_pretrain(
        tmp_path, "set-aside", *RUN, "--save", str(ck), "--overwrite-checkpoints"
    )
    assert status == -signal.SIGKILL, output[-3000:]
    assert "> --overwrite-checkpoints: --save" in output
    assert not (ck / "iter_0000002").exists() and Path(replaced_dir(str(ck), 2)).is_dir()
    assert (ck / TRACKER_FILE).read_text() == "4"
    assert assert_loads(ck)[0] == 4


# ---------------------------------------------------------------------------- resume checks


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--attention-residuals", "block", "--attn-res-block-size", "2"], "sublayers per block"),
        (["--attention-residuals", "full"], "--attention-residuals: checkpoint block, this run full"),
        ([], "--attention-residuals: checkpoint block, this run none"),
        ([*BLOCK_S4, "--hidden-size", "64"], "--hidden-size: checkpoint 32, this run 64"),
        (
            [*BLOCK_S4, "--num-experts", "2", "--disable-bias-linear"],
            "--num-experts: checkpoint None, this run 2",
        ),
        (["--model", "kimi-linear-tiny"], "--model: checkpoint gpt, this run kimi-linear-tiny"),
        ([*BLOCK_S4, "--vocab-size", "512"], "holds a model with a vocabulary of 256 ids"),
        ([*BLOCK_S4, "--lr", "0.001"], "--lr: checkpoint 0.003, this run 0.001"),
        ([*BLOCK_S4, "--train-iters", "8"], "--train-iters (the weight-decay schedule's length)"),
        ([*BLOCK_S4, "--use-distributed-optimizer"], "checkpoint False, this run True); its optimizer"),
    ],
    ids=["block_size", "full", "none", "shape", "moe", "family", "vocabulary", "lr", "train_iters", "layout"],
)
def test_a_resume_refuses_what_does_not_match_before_any_work(saved, pretrain_refusal, flags, expected):
    message = pretrain_refusal([*TINY, "--train-iters", "6", "--load", str(saved), *flags])
    assert expected in message, message
    if "--lr" in flags or "--train-iters" in flags:
        assert (
            "--override-opt_param-scheduler" in message and "--use-checkpoint-opt_param-scheduler" in message
        )
    if "--use-distributed-optimizer" in flags:
        assert "Pass --no-load-optim" in message


def test_a_fresh_run_into_a_finished_runs_directory_is_refused(saved, pretrain_refusal):
    message = pretrain_refusal([*RUN, "--save", str(saved)])
    assert "holds checkpoints of another run (iteration 2, 4)" in message
    assert "a tracker naming iteration 4" in message and "--overwrite-checkpoints" in message


def preflight(*argv: str):
    """checkpoint_preflight of attnres-pretrain ``argv`` (run by the CLI before any work)."""
    from attnres_megatron.training.arguments import parse_args, validate_args
    from attnres_megatron.training.checkpointing import checkpoint_preflight
    from attnres_megatron.training.model_setup import config_from_args
    from attnres_megatron.training.vocabulary import prepare_vocabulary

    args = parse_args(list(argv))
    validate_args(args, world_size=1)
    config = config_from_args(args, "cpu")
    prepare_vocabulary(args)
    return checkpoint_preflight(args, config)


def test_schedule_flags_and_batch_changes_are_reported(saved):
    resumed = [*TINY, *BLOCK_S4, "--load", str(saved), "--train-iters", "6", "--lr", "0.001"]
    (line,) = preflight(*resumed, "--override-opt_param-scheduler").lines
    assert line.startswith("> --override-opt_param-scheduler: the schedule takes this run's values (")
    assert "--lr: checkpoint 0.003, this run 0.001" in line
    (line,) = preflight(*resumed, "--use-checkpoint-opt_param-scheduler").lines
    assert line.startswith(
        "> --use-checkpoint-opt_param-scheduler: the schedule keeps the checkpoint's values"
    )
    lines = preflight(*resumed, "--use-checkpoint-opt_param-scheduler", "--global-batch-size", "4").lines
    assert lines[-1] == (
        "> --global-batch-size 4 (checkpoint: 2): training continues after the 8 samples the "
        "checkpoint consumed."
    )


def test_a_changed_global_batch_resumes_at_the_consumed_samples():
    from attnres_megatron.training.data import DataParallelBatches
    from attnres_megatron.training.resume import SampleOffset, consumed_samples

    class Indices:
        def __len__(self) -> int:
            return 64

        def __getitem__(self, index: int) -> dict:
            return {"tokens": torch.tensor([index]), "labels": torch.tensor([index])}

    consumed = consumed_samples({"consumed_samples": 8}, 4, 2)  # 4 iterations of 2 samples
    batches = DataParallelBatches(SampleOffset(Indices(), consumed), 6, 2)  # now 6 per iteration
    assert [int(t) for tokens, _ in batches.batches(0) for t in tokens.flatten()] == list(range(8, 14))
    assert consumed_samples(None, 4, 2) == 8  # a checkpoint without the count


def test_whose_checkpoints_a_save_may_replace():
    from attnres_megatron.training.resume import save_conflicts

    assert save_conflicts({2: "a", 4: "a", 6: "a"}, 4, "a", 4) == []  # a killed save's orphan, same run
    assert save_conflicts({2: None, 4: None}, 4, None, 4) == []  # an older checkpoint resumed in place
    assert save_conflicts({2: "a"}, 2, "b", 2) == ["checkpoints of another run (iteration 2)"]
    assert save_conflicts({6: None}, None, "b", 4) == ["checkpoints of another run (iteration 6)"]
    (reason,) = save_conflicts({}, 8, "a", 4)
    assert reason.startswith("a tracker naming iteration 8, later than this run's start (4)")


def test_a_baseline_checkpoint_warm_starts_and_nothing_else_does():
    from attnres_megatron.training.resume import is_warm_start, model_changes

    baseline = {
        "model": "gpt",
        "attention_residuals": "none",
        "attn_res_sublayers_per_block": None,
        "hidden_size": 32,
    }
    attn_res = {**baseline, "attention_residuals": "block", "attn_res_sublayers_per_block": 4}
    assert is_warm_start(baseline, attn_res) and model_changes(baseline, attn_res) == []
    assert model_changes(baseline, {**attn_res, "hidden_size": 64}) == [
        "--hidden-size: checkpoint 32, this run 64"
    ]
    assert not is_warm_start(attn_res, baseline) and len(model_changes(attn_res, baseline)) == 2


def test_the_expected_schedule_is_the_one_megatron_builds(single_rank):
    from attnres_megatron.training.arguments import parse_args
    from attnres_megatron.training.model_setup import config_from_args, setup_training
    from attnres_megatron.training.resume import expected_schedule
    from attnres_megatron.training.vocabulary import prepare_vocabulary

    args = parse_args([*TINY, "--train-iters", "6", "--lr-decay-iters", "8", "--lr-warmup-fraction", "0.25"])
    prepare_vocabulary(args)
    setup = setup_training(args, config_from_args(args, "cpu"), args.padded_vocab_size, "cpu")
    state, expected = setup.scheduler.state_dict(), expected_schedule(args)
    assert {key: state[key] for key in expected} == expected


def test_a_finished_job_run_again_exits_0_before_any_work(saved, monkeypatch, capsys):
    """A Slurm requeue of a job whose checkpoint already reached --train-iters."""
    from attnres_megatron.training import pretrain as cli

    def no_work(*args, **kwargs):
        raise AssertionError("a finished run started its process groups")

    monkeypatch.setattr(cli, "initialize_parallel_from_args", no_work)
    for name in [
        n for n in os.environ if n.startswith("SLURM_") or n in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    ]:
        monkeypatch.delenv(name)
    assert cli.main([*RUN, "--load", str(saved), "--save", str(saved)]) == 0
    assert "holds iteration 4 and --train-iters is 4: training is already done" in capsys.readouterr().out

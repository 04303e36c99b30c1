"""Hostile input and faults: bad flags, broken data files and unusable output paths are refused
before any work with a message naming the flag or file and the fix; a stale dataset-index cache is
never reused; a full disk while saving and a diverging run under ``--skip-nonfinite-steps`` stop
with a clear error and a non-zero exit."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import forked_cli
import numpy as np
import pytest
from test_data import load_tool
from test_distributed_cli import clean_env

from attnres_megatron.models import specs
from attnres_megatron.training import data, early_checks, faults

preprocess_data = load_tool("preprocess_data")

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
    "32",
    "--micro-batch-size",
    "2",
    "--train-iters",
    "5",
]

# (flags, what the message must say): the audit's tracebacks and silently accepted values.
BAD_FLAGS = {
    "layout-character": (["--pipeline-model-parallel-layout", "Etx|tL"], "--pipeline-model-parallel-layout"),
    "layout-stages": (["--pipeline-model-parallel-layout", "Et|tL"], "--pipeline-model-parallel-size 1"),
    "layout-layers": (["--pipeline-model-parallel-layout", "EtttL"], "the model has 2 transformer layers"),
    "recompute-module": (
        ["--recompute-granularity", "selective", "--recompute-modules", "foo"],
        "--recompute-modules foo: unknown; choose from core_attn",
    ),
    "recompute-modules-alone": (["--recompute-modules", "core_attn"], "--recompute-granularity selective"),
    "recompute-layers": (
        ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "9"],
        "--recompute-num-layers 9 exceeds the 2 layers",
    ),
    "recompute-full-alone": (["--recompute-granularity", "full"], "--recompute-method {uniform,block}"),
    "hidden-dropout": (["--hidden-dropout", "2"], "--hidden-dropout must be in [0, 1]"),
    "attention-dropout": (["--attention-dropout", "-0.5"], "--attention-dropout must be in [0, 1]"),
    "adam-beta1": (["--adam-beta1", "2"], "--adam-beta1 must be in [0, 1)"),
    "adam-eps": (["--adam-eps", "0"], "--adam-eps must be in (0, inf)"),
    "query-groups": (
        ["--group-query-attention", "--num-query-groups", "3"],
        "--num-query-groups 3 must divide --num-attention-heads 4",
    ),
    "exit-interval": (["--exit-interval", "-1"], "--exit-interval must be >= 1"),
    "eval-interval": (["--eval-interval", "0"], "--eval-interval must be >= 1"),
    "clip-grad": (["--clip-grad", "-1"], "--clip-grad must be in [0, inf)"),
    "moe-biases": (["--num-experts", "2"], "--num-experts with linear biases"),
    "ffn-hidden-size": (["--ffn-hidden-size", "0"], "--ffn-hidden-size must be >= 1"),
    "lr-inf": (["--lr", "inf"], "--lr must be a finite number"),
    "min-lr-nan": (["--min-lr", "nan"], "--min-lr must be a finite number"),
    "skip-limit": (["--max-skipped-nonfinite-steps", "-1"], "--max-skipped-nonfinite-steps must be >= 0"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_are_refused_before_any_work(pretrain_refusal, case):
    flags, message = BAD_FLAGS[case]
    refusal = pretrain_refusal([*TINY, *flags])
    assert refusal.startswith("error: ") and message in refusal, refusal


def test_a_pipeline_layout_sets_the_virtual_stages_as_megatron_lm_does():
    args = argparse.Namespace(
        pipeline_model_parallel_layout="Et|t|t|tL",
        pipeline_model_parallel_size=2,
        num_virtual_stages_per_pipeline_rank=None,
        decoder_first_pipeline_num_layers=None,
        decoder_last_pipeline_num_layers=None,
    )
    early_checks.validate_pipeline_layout(args, num_layers=4)
    assert args.num_virtual_stages_per_pipeline_rank == 2
    args.num_virtual_stages_per_pipeline_rank = 3
    with pytest.raises(SystemExit, match="--num-virtual-stages-per-pipeline-rank is 3"):
        early_checks.validate_pipeline_layout(args, num_layers=4)


def test_missing_optional_packages_are_named_before_any_work(pretrain_refusal, monkeypatch):
    monkeypatch.setattr(specs, "transformer_engine_available", lambda: False)
    refusal = pretrain_refusal([*TINY, "--transformer-impl", "transformer_engine"])
    assert "Transformer Engine is not installed" in refusal and "--transformer-impl local" in refusal
    find_spec = early_checks.importlib.util.find_spec
    monkeypatch.setattr(
        early_checks.importlib.util,
        "find_spec",
        lambda name: None if name == "tensorboard" else find_spec(name),
    )
    args = argparse.Namespace(
        tensorboard_dir="tb", transformer_impl="local", attn_res_impl="torch", device="cpu"
    )
    with pytest.raises(SystemExit, match=r"--tensorboard-dir needs tensorboard: pip install"):
        early_checks.validate_optional_packages(args)
    monkeypatch.undo()

    from attnres_megatron.ops import dispatch

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    args = argparse.Namespace(
        tensorboard_dir=None, transformer_impl="local", attn_res_impl="fused", device="auto"
    )
    with pytest.raises(SystemExit, match=r"--attn-res-impl fused needs Triton.*another --attn-res-impl"):
        early_checks.validate_optional_packages(args)


def test_output_paths_are_checked_before_training(pretrain_refusal, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    refusal = pretrain_refusal([*TINY, "--save", str(a_file)])
    assert f"--save {a_file} is a file, not a directory" in refusal
    refusal = pretrain_refusal([*TINY, "--summary-json", str(tmp_path / "missing" / "s.json")])
    assert f"its directory {tmp_path / 'missing'} does not exist" in refusal
    refusal = pretrain_refusal([*TINY, "--summary-json", str(tmp_path)])
    assert "is a directory; give a file name" in refusal
    refusal = pretrain_refusal([*TINY, "--tensorboard-dir", str(a_file / "tb")])
    assert f"cannot be created: {a_file} is a file" in refusal
    # Directories that do not exist yet are fine when they can be created.
    assert early_checks.directory_problem(str(tmp_path / "new" / "ck")) is None
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert (
            early_checks.directory_problem(str(locked / "ck"))
            == f"cannot be created: {locked} is not writable"
        )
        assert early_checks.file_problem(str(locked / "s.json")) == "is not writable"


# ---------------------------------------------------------------------------- data files


@pytest.fixture
def prefix(tmp_path: Path) -> str:
    """A valid indexed dataset of 12 byte-token documents."""
    rng = np.random.default_rng(0)
    path = str(tmp_path / "corpus")
    data.write_indexed_dataset([rng.integers(1, 255, 40) for _ in range(12)], path, 256, 0)
    return path


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


def _overwrite(path: str, offset: int, content: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(content)


BROKEN_FILES = {
    "truncated-bin": (".bin", lambda p: _truncate(p + ".bin", 100), "truncated (100 bytes; "),
    "longer-bin": (".bin", lambda p: open(p + ".bin", "ab").write(b"xx"), "longer than its index says"),
    "bad-magic": (".idx", lambda p: _overwrite(p + ".idx", 0, b"GARBAGE"), "not a Megatron indexed dataset"),
    "bad-version": (".idx", lambda p: _overwrite(p + ".idx", 9, b"\x07"), "index version 7"),
    "bad-dtype": (".idx", lambda p: _overwrite(p + ".idx", 17, b"\x63"), "unknown token dtype code 99"),
    "truncated-header": (".idx", lambda p: _truncate(p + ".idx", 20), "shorter than the 34-byte header"),
    "truncated-idx": (".idx", lambda p: _truncate(p + ".idx", 80), "truncated (80 bytes; its header's 12"),
    "empty-idx": (".idx", lambda p: _truncate(p + ".idx", 0), "truncated (0 bytes"),
    "missing-idx": (".idx", lambda p: os.remove(p + ".idx"), "missing (no such file)"),
    "missing-bin": (".bin", lambda p: os.remove(p + ".bin"), "missing (no such file)"),
}


@pytest.mark.parametrize("case", list(BROKEN_FILES))
def test_every_broken_data_file_is_named(prefix, case):
    suffix, damage, message = BROKEN_FILES[case]
    data.check_prefixes([prefix])  # intact
    damage(prefix)
    with pytest.raises(data.DataError) as refused:
        data.check_prefixes([prefix])
    text = str(refused.value)
    assert text.startswith(f"data file {prefix}{suffix}: ") and message in text, text
    assert "tools/preprocess_data.py" in text


def test_a_truncated_bin_is_refused_by_the_cli_before_any_work(pretrain_refusal, prefix):
    _truncate(prefix + ".bin", 200)
    refusal = pretrain_refusal([*TINY, "--data-path", prefix])
    assert refusal.startswith(f"error: data file {prefix}.bin: truncated (200 bytes; ")


def test_a_regenerated_prefix_gets_fresh_dataset_indices(tmp_path):
    """Megatron keys its index cache by the path; the content-named directory keeps a prefix
    regenerated in place from reading the old document/sample/shuffle indices (an IndexError)."""
    path, cache = str(tmp_path / "regen"), tmp_path / "indices"
    rng = np.random.default_rng(1)
    data.write_indexed_dataset([rng.integers(1, 100, 50) for _ in range(60)], path, 256, 0)
    first, _ = data.build_datasets([path], "1,0,0", 16, 1, 60, 0, path_to_cache=cache)
    data.write_indexed_dataset([rng.integers(150, 250, 30) for _ in range(10)], path, 256, 0)
    second, _ = data.build_datasets([path], "1,0,0", 16, 1, 60, 0, path_to_cache=cache)
    tokens = np.concatenate([second[i]["tokens"].numpy() for i in range(len(second))])
    assert set(np.unique(tokens)) <= {0, *range(150, 250)}  # the new documents only
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 2
    again, _ = data.build_datasets([path], "1,0,0", 16, 1, 60, 0, path_to_cache=cache)
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 2  # the same content reuses its cache
    assert len(again) == len(second) and len(first) != len(second)


UNDECODABLE = {
    "utf8-jsonl": (
        "bad.jsonl",
        b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
        r"bad\.jsonl:2: not valid UTF-8 \(byte 0xe9",
    ),
    "utf8-text": (
        "latin.txt",
        b"one\ntwo\nna\xefve\n",
        r"latin\.txt:3: not valid UTF-8 \(byte 0xef at column 3",
    ),
    "json-line": ("broken.jsonl", b'{"text": "ok"}\n\n{"text": \n', r"broken\.jsonl:3: malformed JSON"),
    "json-key": (
        "key.jsonl",
        b'{"text": "ok"}\n{"body": "x"}\n',
        r"key\.jsonl:2: expected a JSON object with the key 'text'",
    ),
}


@pytest.mark.parametrize("case", list(UNDECODABLE))
def test_preprocess_names_the_file_and_line_of_undecodable_input(tmp_path, capsys, case):
    name, content, pattern = UNDECODABLE[case]
    source = tmp_path / name
    source.write_bytes(content)
    with pytest.raises(data.DataError, match=pattern):
        preprocess_data.preprocess([str(source)], str(tmp_path / "out"), progress=False)
    assert (
        preprocess_data.main(["--input", str(source), "--output-prefix", str(tmp_path / "out"), "--quiet"])
        == 2
    )
    assert f"{source}:" in capsys.readouterr().err
    assert not list(tmp_path.glob("out.*"))


# ---------------------------------------------------------------------------- faults during a run


def _checkpoint_failure(text: str) -> BaseException:
    """What torch.distributed.checkpoint raises when a write worker fails."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException("write", {0: (RuntimeError(f"Worker failure: {text}"), None)})


def test_disk_full_while_saving_names_the_kept_checkpoint(tmp_path):
    """What ``TrainingLoop.save`` wraps each save in."""
    with pytest.raises(SystemExit) as stopped:
        with faults.exit_when_disk_full(6, str(tmp_path), None):
            raise _checkpoint_failure("[Errno 28] No space left on device")
    assert str(stopped.value.code) == (
        f"error: no space left on device while saving checkpoint 6 to {tmp_path}; no earlier checkpoint "
        "was saved. Free space there or point --save at a device with room, and make sure a checkpoint fits."
    )
    kept = (
        f"checkpoint 8 to {tmp_path}; the previous checkpoint 4 is kept \\(resume with --load {tmp_path}\\)"
    )
    with pytest.raises(SystemExit, match=kept):
        with faults.exit_when_disk_full(8, str(tmp_path), 4):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(SystemExit, match="^error: disk quota exceeded while saving checkpoint 9"):
        with faults.exit_when_disk_full(9, str(tmp_path), 4):
            raise RuntimeError("write failed") from OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(RuntimeError, match="unrelated"):  # other failures are not disk full
        with faults.exit_when_disk_full(10, str(tmp_path), 4):
            raise RuntimeError("unrelated")
    short_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert faults.disk_full_reason(short_write, str(tmp_path)) in (
        "no space left on device",
        "a short write (was the device full?)",
    )
    assert faults.saved_iteration(str(tmp_path)) is None


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 64 KiB tmpfs (root and a working ``mount`` only), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / f"full-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_on_the_first_save_exits_non_zero_with_the_reason(small_tmpfs):
    save = small_tmpfs / "ck"
    command = [sys.executable, "-m", "attnres_megatron.training.pretrain", *TINY, "--train-iters", "2"]
    command += ["--save", str(save), "--save-interval", "1", "--mock-data", "--eval-iters", "0"]
    result = forked_cli.run(command, timeout=300, env=clean_env())  # forked from the preloaded server
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: ") and f"while saving checkpoint 1 to {save}; no earlier checkpoint" in last
    )
    assert "Traceback" not in result.stderr


def test_too_many_skipped_nonfinite_steps_stop_the_run():
    """What ``TrainingLoop.skip`` checks after each skipped iteration (the whole run:
    tests/test_checkpoint.py::test_non_finite_steps_stop_with_the_iteration_or_are_skipped)."""
    faults.check_skip_limit([3, 5], 2)
    with pytest.raises(SystemExit) as stopped:
        faults.check_skip_limit([3, 5, 6], 2)
    message = str(stopped.value.code)
    assert message.startswith(
        "error: 3 iterations skipped for non-finite loss or gradients (the last: 3, 5, 6)"
    )
    assert "more than --max-skipped-nonfinite-steps 2: the run is diverging" in message
    with pytest.raises(SystemExit, match="max-skipped-nonfinite-steps 0"):
        faults.check_skip_limit([1], 0)

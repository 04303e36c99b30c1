"""The launch scripts in examples/ parse with ``bash -n`` and say what they need and run; the tiny
CPU example trains, and the Megatron-LM scripts (GPU clusters) run up to their launch command
(``DRY_RUN=1``) with parallel sizes that fit their world and plugin flags that validate."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted([*EXAMPLES.glob("*.sh"), *EXAMPLES.glob("*.sbatch")])
EXPECTED = {
    "pretrain_tiny_cpu.sh",
    "pretrain_bpe_cpu.sh",
    "pretrain_torchrun.sh",
    "pretrain_mpirun.sh",
    "slurm_attnres_moe.sbatch",
    "megatron_lm_torchrun.sh",
    "megatron_lm_slurm.sbatch",
    "kimi_linear_48b_a3b_slurm.sbatch",
}


def header(path: Path) -> list[str]:
    """The leading comment block (shebang and #SBATCH lines included)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def test_expected_examples_exist():
    assert EXPECTED <= {path.name for path in SCRIPTS}


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.name)
def test_script_parses(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.name)
def test_script_header_says_what_it_needs_and_runs(path):
    lines = header(path)
    assert lines and lines[0].startswith("#!") and "bash" in lines[0], f"{path.name}: no bash shebang"
    text = "\n".join(lines)
    for key in ("Needs:", "Runs:"):
        assert any(line.lstrip("# ").startswith(key) for line in lines), f"{path.name}: no {key!r} in\n{text}"
    body = path.read_text(encoding="utf-8")
    assert "set -euo pipefail" in body, f"{path.name}: missing set -euo pipefail"


@pytest.mark.parametrize(
    "name, nodes, tasks_per_node",
    [
        ("slurm_attnres_moe.sbatch", 2, 8),
        ("megatron_lm_slurm.sbatch", 2, 1),
        ("kimi_linear_48b_a3b_slurm.sbatch", 6, 1),
    ],
)
def test_sbatch_directives_precede_commands(name, nodes, tasks_per_node):
    directives = [line for line in header(EXAMPLES / name) if line.startswith("#SBATCH")]
    assert f"#SBATCH --nodes={nodes}" in directives
    assert f"#SBATCH --ntasks-per-node={tasks_per_node}" in directives
    assert "#SBATCH --gpus-per-node=8" in directives


# ---------------------------------------------------------------- Megatron-LM launch scripts
# They need GPUs and a Megatron-LM checkout; DRY_RUN=1 runs them up to the launch command.

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def dry_run(name: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    checkout = tmp_path / "Megatron-LM"
    if not checkout.exists():
        checkout.mkdir()
        (checkout / "pretrain_gpt.py").write_text("# stand-in for Megatron-LM's pretrain_gpt.py\n")
    variables = dict(
        os.environ,
        DRY_RUN="1",
        MEGATRON_LM_DIR=str(checkout),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu[001-006]",
        MASTER_ADDR="gpu001",
    )
    variables.pop("NPROC", None)
    variables.update(env)
    return subprocess.run(
        ["bash", str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=60,
        env=variables,
        cwd=tmp_path,
    )


def launched_args(output: str) -> list[str]:
    """The Megatron-LM arguments of the printed launch command."""
    words = shlex.split(output.strip().splitlines()[-1])
    return words[words.index("attnres_megatron.megatron_lm.pretrain_gpt_attnres") + 1 :]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def check_parallel_layout(args: list[str], world: int) -> None:
    """The parallel sizes fit the world and the model, as Megatron-LM will require."""
    tp, pp = (
        int(flag(args, "--tensor-model-parallel-size")),
        int(flag(args, "--pipeline-model-parallel-size")),
    )
    vpp = (
        int(flag(args, "--num-virtual-stages-per-pipeline-rank"))
        if "--num-virtual-stages-per-pipeline-rank" in args
        else 1
    )
    ep = int(flag(args, "--expert-model-parallel-size")) if "--expert-model-parallel-size" in args else 1
    assert world % (tp * pp) == 0 and (world // pp) % (ep * tp) == 0
    data_parallel = world // (tp * pp)
    assert int(flag(args, "--num-layers")) % (pp * vpp) == 0
    micro_batches, rest = divmod(
        int(flag(args, "--global-batch-size")), int(flag(args, "--micro-batch-size")) * data_parallel
    )
    assert rest == 0 and micro_batches % pp == 0
    assert int(flag(args, "--num-attention-heads")) % tp == 0


def check_plugin_flags(args: list[str]) -> None:
    """The plugin's flags and the Megatron-LM model flags they must agree with are valid."""
    from unittest import mock

    from megatron_lm_worker import megatron_lm_parser

    with mock.patch("torch.cuda.is_available", return_value=True):  # as on the GPU machine it is for
        parsed, _ = megatron_lm_parser().parse_known_args(args)  # validates the AttnRes flags, or exits
    assert parsed.attention_residuals == "block"


@needs_bash
def test_megatron_lm_torchrun_runs_up_to_the_launch(tmp_path):
    done = dry_run("megatron_lm_torchrun.sh", tmp_path, NPROC="8")
    assert done.returncode == 0, done.stderr
    command = done.stdout.strip()
    assert command.startswith("torchrun --standalone --nnodes 1 --nproc-per-node 8 -m ")
    args = launched_args(command)
    check_parallel_layout(args, world=8)
    check_plugin_flags(args)
    assert (
        "--attn-res-num-blocks 4" in command and "--sequence-parallel" in command and "--mock-data" in command
    )
    data = dry_run("megatron_lm_torchrun.sh", tmp_path, NPROC="2", TP="1", DATA_PATH="/data/a_text_document")
    assert (
        "--data-path /data/a_text_document --split" in data.stdout
        and "--sequence-parallel" not in data.stdout
    )


@needs_bash
def test_megatron_lm_torchrun_patched_route_needs_the_patch(tmp_path):
    done = dry_run("megatron_lm_torchrun.sh", tmp_path, NPROC="2", ROUTE="patched")
    assert done.returncode == 1 and "patches/apply.sh" in done.stderr
    (tmp_path / "Megatron-LM" / "pretrain_gpt.py").write_text(
        "import attnres_megatron.megatron_lm as attnres\n"
    )
    done = dry_run("megatron_lm_torchrun.sh", tmp_path, NPROC="2", ROUTE="patched")
    assert done.returncode == 0, done.stderr
    assert f"--nproc-per-node 2 {tmp_path}/Megatron-LM/pretrain_gpt.py --num-layers" in done.stdout


@needs_bash
@pytest.mark.parametrize(
    "name", ["megatron_lm_torchrun.sh", "megatron_lm_slurm.sbatch", "kimi_linear_48b_a3b_slurm.sbatch"]
)
def test_megatron_lm_scripts_need_a_checkout(name, tmp_path):
    done = dry_run(name, tmp_path, NPROC="2", MEGATRON_LM_DIR=str(tmp_path / "missing"))
    assert done.returncode == 1 and "MEGATRON_LM_DIR" in done.stderr and "core_r0.16" in done.stderr


@needs_bash
def test_megatron_lm_slurm_runs_up_to_the_launch(tmp_path):
    done = dry_run("megatron_lm_slurm.sbatch", tmp_path, SLURM_JOB_NUM_NODES="2")
    assert done.returncode == 0, done.stderr
    command = done.stdout.strip().splitlines()[-1]
    assert command.startswith("srun --nodes=2 --ntasks=2 --ntasks-per-node=1")
    assert "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-id 4242" in command
    args = launched_args(command)
    check_parallel_layout(args, world=16)
    check_plugin_flags(args)


@needs_bash
def test_kimi_linear_48b_slurm_runs_up_to_the_launch(tmp_path):
    missing = dry_run("kimi_linear_48b_a3b_slurm.sbatch", tmp_path, SLURM_JOB_NUM_NODES="6")
    assert missing.returncode == 1 and "DATA_PATH" in missing.stderr and "TOKENIZER_MODEL" in missing.stderr
    done = dry_run(
        "kimi_linear_48b_a3b_slurm.sbatch",
        tmp_path,
        SLURM_JOB_NUM_NODES="6",
        DATA_PATH="/data/kimi_text_document",
        TOKENIZER_MODEL="/models/kimi-linear-tokenizer",
    )
    assert done.returncode == 0, done.stderr
    command = done.stdout.strip().splitlines()[-1]
    args = launched_args(command)
    check_parallel_layout(args, world=48)
    check_plugin_flags(args)  # Megatron-LM's model flags agree with the preset
    assert (flag(args, "--model"), flag(args, "--attn-res-block-size")) == ("kimi-linear-48b-a3b", "6")
    for expected in (
        "--fp8-format hybrid",
        "--recompute-granularity selective",
        "--expert-model-parallel-size 8",
        "--tokenizer-model /models/kimi-linear-tokenizer",
        "--data-path /data/kimi_text_document",
    ):
        assert expected in command


@needs_bash
def test_tiny_cpu_example_trains(tmp_path):
    summary = tmp_path / "summary.json"
    variables = dict(
        os.environ,
        PRETRAIN=f"{sys.executable} -m attnres_megatron.training.pretrain",
        TRAIN_ITERS="4",
        LOG_INTERVAL="2",
        ATTNRES_CACHE_DIR=str(tmp_path / "cache"),
    )
    done = subprocess.run(
        ["bash", str(EXAMPLES / "pretrain_tiny_cpu.sh"), "--corpus-bytes", "200000", "--lr-warmup-iters", "1"]
        + ["--seq-length", "32", "--summary-json", str(summary)],
        capture_output=True,
        text=True,
        timeout=600,
        env=variables,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert (result["attention_residuals"], result["sublayers_per_block"], len(result["losses"])) == (
        "block",
        2,
        4,
    )


@pytest.fixture(scope="module")
def bpe_example_work(tmp_path_factory) -> Path:
    """One work directory for both runs: the example trains its tokenizer there once."""
    return tmp_path_factory.mktemp("bpe_example")


@needs_bash
@pytest.mark.parametrize("nproc", [1, 2], ids=["single", "tp2_sp"])
def test_bpe_cpu_example_trains_and_evaluates(bpe_example_work, tmp_path, nproc):
    from conftest import free_port

    summary = tmp_path / "summary.json"
    variables = dict(
        os.environ,
        PYTHON=sys.executable,
        WORK=str(bpe_example_work),
        NPROC=str(nproc),
        MASTER_PORT=str(free_port()),
        VOCAB_SIZE="512",
        TOKENIZER_BYTES="300000",
        TRAIN_ITERS="4",
        EVAL_INTERVAL="2",
        EVAL_ITERS="1",
        LOG_INTERVAL="2",
        ATTNRES_CACHE_DIR=str(bpe_example_work / "cache"),
    )
    done = subprocess.run(
        ["bash", str(EXAMPLES / "pretrain_bpe_cpu.sh"), "--corpus-bytes", "300000", "--seq-length", "32"]
        + ["--lr-warmup-iters", "1", "--split", "80,20,0", "--summary-json", str(summary)],
        capture_output=True,
        text=True,
        timeout=600,
        env=variables,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert len(result["losses"]) == 4 and abs(result["losses"][0] - math.log(512)) < 0.5
    validations = [e["iteration"] for e in result["evaluations"] if e["split"] == "validation"]
    assert validations == [2, 4, 4] and math.isfinite(result["validation_loss"])
    assert "validation loss at iteration 4 on validation set" in done.stdout

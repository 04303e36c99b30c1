"""``attnres-pretrain`` under torchrun and mpirun, and its refusals of bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import forked_cli
import pytest
from attnres_defaults import PRE_MEGATRON_DEFAULTS, old_ffn
from conftest import free_port

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
    "32",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--lr",
    "3e-3",
    "--lr-warmup-iters",
    "2",
    "--log-interval",
    "4",
    "--train-iters",
    "8",
    "--corpus-bytes",
    "300000",
    "--attention-residuals",
    "block",
    "--attn-res-block-size",
    "3",
]
MOE = [
    "--num-experts",
    "4",
    "--moe-router-topk",
    "2",
    "--moe-ffn-hidden-size",
    "32",
    "--moe-shared-expert-intermediate-size",
    "32",
    "--moe-router-score-function",
    "sigmoid",
    "--moe-router-enable-expert-bias",
]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    env.update(extra)
    return env


def pretrain(
    launcher: list[str], *args: str, env: dict | None = None, fresh: bool = False
) -> subprocess.CompletedProcess:
    """``attnres-pretrain`` with ``launcher``: forked from the preloaded server (forked_cli.py)
    unless ``fresh``, which starts real interpreters."""
    command = [*launcher, "-m", "attnres_megatron.training.pretrain", *args]
    return forked_cli.run(command, env=env or clean_env(), timeout=600, fresh=fresh)


def torchrun(nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
    ]


def losses(tmp_path, name: str, launcher: list[str], *args: str, fresh: bool = False) -> list[float]:
    summary = tmp_path / f"{name}.json"
    result = pretrain(launcher, *TINY, *args, "--summary-json", str(summary), fresh=fresh)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(summary.read_text())["losses"]


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory) -> list[float]:
    return losses(tmp_path_factory.mktemp("single"), "single", [sys.executable])


@pytest.mark.parametrize(
    "name, args",
    [
        ("tp2_sp", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        ("dp2_distributed_optimizer", ["--use-distributed-optimizer"]),
    ],
)
def test_torchrun_layouts_reproduce_single_process_losses(tmp_path, single_process_losses, name, args):
    """TP2+SP with the real torchrun command, starting an interpreter per rank; the other
    torchrun runs here fork their ranks from the preloaded server (forked_cli.py)."""
    parallel = losses(tmp_path, name, torchrun(2), *args, fresh=name == "tp2_sp")
    assert parallel == pytest.approx(single_process_losses, rel=2e-4)


def test_torchrun_expert_parallel_moe_dispatchers_agree(tmp_path):
    # Megatron seeds expert weights per expert-parallel rank, so EP=2 starts from another
    # (valid) init than EP=1; gradient parity with shared weights is in test_parallel.py.
    runs = {
        dispatcher: losses(
            tmp_path,
            f"moe_{dispatcher}",
            torchrun(2),
            *MOE,
            "--expert-model-parallel-size",
            "2",
            "--moe-token-dispatcher-type",
            dispatcher,
        )
        for dispatcher in ("alltoall", "allgather")
    }
    assert runs["alltoall"] == pytest.approx(runs["allgather"], rel=2e-4)
    assert runs["alltoall"][-1] < runs["alltoall"][0] - 0.3


def test_torchrun_interleaved_pipeline_trains_and_reports_cached_traffic(tmp_path):
    summary = tmp_path / "pp.json"
    result = pretrain(
        torchrun(2),
        *TINY,
        "--num-layers",
        "4",
        "--pipeline-model-parallel-size",
        "2",
        "--num-virtual-stages-per-pipeline-rank",
        "2",
        "--global-batch-size",
        "8",
        "--summary-json",
        str(summary),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(summary.read_text())
    assert data["losses"][-1] < data["losses"][0] - 0.3
    traffic = data["pipeline_traffic"]
    assert [row["boundary"] for row in traffic] == ["0->1", "1->2", "2->3"]
    for row in traffic:
        assert row["forward_bytes_per_micro_batch"] == row["backward_bytes_per_micro_batch"]
        per_source = row["forward_bytes_per_micro_batch"] // row["sources_cached"]
        assert per_source == 32 * 2 * 64 * 4  # [s, b, h] in fp32
    assert sum(r["sources_cached"] for r in traffic) < sum(r["sources_naive"] for r in traffic)
    assert "pipeline boundary 2->3" in result.stdout


KIMI_TINY = [
    *PRE_MEGATRON_DEFAULTS,
    "--device",
    "cpu",
    "--model",
    "kimi-linear-tiny",
    "--seq-length",
    "32",
    "--micro-batch-size",
    "2",
    "--train-iters",
    "20",
    "--lr-warmup-iters",
    "2",
    "--log-interval",
    "10",
    "--corpus-bytes",
    "300000",
]


@pytest.mark.parametrize(
    "args",
    [
        ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        ["--expert-model-parallel-size", "2", "--global-batch-size", "4"],
        [
            "--pipeline-model-parallel-size",
            "2",
            "--decoder-first-pipeline-num-layers",
            "2",
            "--global-batch-size",
            "4",
        ],
    ],
    ids=["tp2_sp", "ep2", "pp2"],
)
def test_kimi_linear_tiny_trains_in_parallel(tmp_path, args):
    summary = tmp_path / "kimi.json"
    result = pretrain(torchrun(2), *KIMI_TINY, *args, "--summary-json", str(summary))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(summary.read_text())
    assert data["model"] == "kimi-linear-tiny" and data["attention_residuals"] == "block"
    assert sum(data["losses"][-3:]) / 3 < sum(data["losses"][:3]) / 3 - 0.5


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (scripts/install_mpi.sh)")
def test_mpirun_four_processes_runs_tiny_pretraining(tmp_path, single_process_losses):
    pytest.importorskip("mpi4py", reason="mpi4py not installed (scripts/install_mpi.sh)")
    launcher = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "4", sys.executable]
    tp2_sp = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    parallel = losses(tmp_path, "mpirun", launcher, *tp2_sp, fresh=True)
    assert parallel == pytest.approx(single_process_losses, rel=2e-4)


BAD_INPUT = [
    (
        ["--tensor-model-parallel-size", "2"],
        dict(RANK="0", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"),
        "does not divide the world size 3",
    ),
    (["--sequence-parallel"], {}, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (
        [*MOE[:2], "--expert-model-parallel-size", "3"],
        dict(RANK="0", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"),
        "--num-experts 4 is not divisible",
    ),
    (["--expert-model-parallel-size", "2"], {}, "needs --num-experts"),
    (
        ["--context-parallel-size", "2"],
        dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"),
        "Transformer Engine attention",
    ),
    (["--global-batch-size", "3"], {}, "--global-batch-size 3 must be a multiple"),
    ([], dict(RANK="0"), "WORLD_SIZE"),
]
BAD_INPUT_IDS = [
    "world",
    "sp_without_tp",
    "experts_vs_ep",
    "ep_without_moe",
    "cp_local",
    "batch",
    "launcher_env",
]


@pytest.mark.parametrize("args, env, message", BAD_INPUT, ids=BAD_INPUT_IDS)
def test_bad_input_fails_before_any_work(pretrain_refusal, args, env, message):
    """attnres-pretrain's main() in-process under each launcher environment (conftest.py)."""
    assert message in pretrain_refusal([*TINY, *args], env)


def test_the_cli_refuses_bad_input_before_any_work():
    """End to end, once: the real command exits non-zero with the message and trains nothing."""
    args, env, message = BAD_INPUT[0]
    result = pretrain([sys.executable], *TINY, *args, env=clean_env(**env), fresh=True)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "iteration" not in result.stdout

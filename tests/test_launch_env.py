"""Launcher discovery: torchrun, mpirun, srun and single-process environments, and their errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

from attnres_megatron.training import launch_env as le
from attnres_megatron.training.launch_env import (
    LaunchEnv,
    LaunchEnvError,
    discover_launch_env,
    expand_nodelist,
    export_for_torch,
    first_host,
    parse_tasks_per_node,
)

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_COMM_WORLD_", "PMI_", "MPI_LOCAL")

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "node01",
    "MASTER_PORT": "29500",
}
OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "5",
    "OMPI_COMM_WORLD_SIZE": "8",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
}
SLURM = {
    "SLURM_PROCID": "9",
    "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS_PER_NODE": "8",
    "SLURM_TASKS_PER_NODE": "8(x2)",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
    "SLURM_NODELIST": "gpu[007-008]",
    "SLURM_JOB_ID": "123456",
    "SLURM_STEP_ID": "0",
}


def without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


def expect_error(env: dict[str, str], *fragments: str, use_mpi: bool | None = False) -> str:
    with pytest.raises(LaunchEnvError) as info:
        discover_launch_env(env, use_mpi=use_mpi)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


class FakeComm:
    """Stands in for MPI.COMM_WORLD as seen by one rank; bcast hands non-root ranks a preset payload."""

    def __init__(self, rank: int, hostnames: list[str], root_payload=None):
        self.rank, self.hostnames, self.root_payload = rank, hostnames, root_payload
        self.bcast_calls = 0

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's spelling
        return self.rank

    def Get_size(self) -> int:  # noqa: N802 - mpi4py's spelling
        return len(self.hostnames)

    def allgather(self, value):
        assert value == socket.gethostname()
        return list(self.hostnames)

    def bcast(self, obj, root: int = 0):
        assert root == 0
        self.bcast_calls += 1
        return obj if self.rank == 0 else self.root_payload


@pytest.fixture
def fake_mpi(monkeypatch):
    """Install a FakeComm as MPI.COMM_WORLD; returns a setter."""

    def install(comm: FakeComm) -> FakeComm:
        monkeypatch.setattr(le, "_mpi_comm_world", lambda why: comm)
        return comm

    return install


# ---------------------------------------------------------------------------- torchrun


def test_torchrun_full():
    assert discover_launch_env(TORCHRUN) == LaunchEnv(3, 8, 1, 2, "node01", 29500, "torchrun")


def test_torchrun_without_local_vars_is_one_node():
    env = discover_launch_env(without(TORCHRUN, "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    assert (env.local_rank, env.local_world_size) == (3, 8)


def test_torchrun_takes_precedence_over_mpi_and_slurm():
    env = discover_launch_env({**SLURM, **OPENMPI, **TORCHRUN}, use_mpi=False)
    assert env.launcher == "torchrun" and env.rank == 3


def test_torchrun_missing_world_size_message():
    message = expect_error({"RANK": "0"})
    assert message == (
        "torchrun-style launch: WORLD_SIZE is not set; "
        "launch with torchrun or set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"
    )


@pytest.mark.parametrize("missing", ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"])
def test_torchrun_missing_variable(missing):
    expect_error(without(TORCHRUN, missing), f"{missing} is not set", "launch with torchrun")


def test_torchrun_blank_variable_counts_as_missing():
    expect_error({**TORCHRUN, "MASTER_ADDR": "  "}, "MASTER_ADDR is not set")


@pytest.mark.parametrize(
    "override, fragments",
    [
        ({"RANK": "8"}, ["RANK=8 is outside 0..WORLD_SIZE-1", "WORLD_SIZE=8"]),
        ({"RANK": "-1"}, ["RANK=-1 is outside"]),
        ({"WORLD_SIZE": "0", "RANK": "0"}, ["WORLD_SIZE=0 must be at least 1"]),
        ({"RANK": "three"}, ["RANK='three' is not an integer"]),
        ({"WORLD_SIZE": "8.0"}, ["WORLD_SIZE='8.0' is not an integer"]),
        ({"LOCAL_RANK": "x"}, ["LOCAL_RANK='x' is not an integer"]),
        ({"LOCAL_RANK": "2"}, ["LOCAL_RANK=2 is outside 0..LOCAL_WORLD_SIZE-1"]),
        ({"LOCAL_WORLD_SIZE": "9"}, ["LOCAL_WORLD_SIZE=9 must be in 1..WORLD_SIZE"]),
        ({"MASTER_PORT": "http"}, ["MASTER_PORT='http' is not an integer"]),
        ({"MASTER_PORT": "70000"}, ["MASTER_PORT=70000 is not a TCP port"]),
    ],
)
def test_torchrun_bad_values(override, fragments):
    expect_error({**TORCHRUN, **override}, *fragments, "launch with torchrun")


# ---------------------------------------------------------------------------- OpenMPI / MPICH


def test_openmpi_with_master_vars_needs_no_mpi4py(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # any import attempt would now fail
    env = {**OPENMPI, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"}
    for use_mpi in (False, None):
        assert discover_launch_env(env, use_mpi=use_mpi) == LaunchEnv(5, 8, 1, 4, "10.0.0.1", 23456, "mpirun")


def test_openmpi_use_mpi_false_without_master_vars():
    expect_error(OPENMPI, "use_mpi=False", "MASTER_ADDR, MASTER_PORT not set", "mpirun -x MASTER_ADDR")


def test_openmpi_use_mpi_false_without_local_vars():
    env = {**without(OPENMPI, "OMPI_COMM_WORLD_LOCAL_SIZE"), "MASTER_ADDR": "h", "MASTER_PORT": "2"}
    expect_error(env, "OMPI_COMM_WORLD_LOCAL_SIZE not set")


def test_openmpi_without_mpi4py_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    message = expect_error(
        OPENMPI,
        "mpi4py cannot be imported",
        "pip install 'attnres-megatron[mpi]'",
        "apt-get install libopenmpi-dev openmpi-bin",
        "MASTER_ADDR",
        use_mpi=None,
    )
    assert "OMPI_COMM_WORLD_RANK" in message


def test_use_mpi_true_without_mpi4py(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    env = {**OPENMPI, "MASTER_ADDR": "h", "MASTER_PORT": "2"}
    expect_error(env, "use_mpi=True", "pip install 'attnres-megatron[mpi]'", use_mpi=True)


@pytest.mark.parametrize(
    "env, fragments",
    [
        ({"OMPI_COMM_WORLD_RANK": "0"}, ["OMPI_COMM_WORLD_SIZE is not set", "mpirun -np"]),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, ["OMPI_COMM_WORLD_RANK is not set"]),
        ({**OPENMPI, "OMPI_COMM_WORLD_RANK": "8"}, ["OMPI_COMM_WORLD_RANK=8 is outside"]),
        ({**OPENMPI, "OMPI_COMM_WORLD_SIZE": "eight"}, ["OMPI_COMM_WORLD_SIZE='eight' is not an integer"]),
        ({**OPENMPI, "OMPI_COMM_WORLD_LOCAL_RANK": "4"}, ["OMPI_COMM_WORLD_LOCAL_RANK=4 is outside"]),
        ({**OPENMPI, "MASTER_PORT": "0"}, ["MASTER_PORT=0 is not a TCP port"]),
    ],
)
def test_openmpi_bad_environments(env, fragments):
    expect_error({"MASTER_ADDR": "h", "MASTER_PORT": "2", **env}, *fragments)


def test_mpich_pmi_variables():
    env = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
    env |= {"MASTER_ADDR": "h0", "MASTER_PORT": "4000"}
    assert discover_launch_env(env, use_mpi=False) == LaunchEnv(2, 4, 0, 2, "h0", 4000, "mpirun")
    expect_error(without(env, "PMI_SIZE"), "PMI_SIZE is not set")
    expect_error(without(env, "MPI_LOCALNRANKS"), "MPI_LOCALNRANKS not set")


def test_pmi_under_srun_is_slurm():
    env = discover_launch_env({**SLURM, "PMI_RANK": "9", "PMI_SIZE": "16"}, use_mpi=False)
    assert env.launcher == "slurm"


def test_openmpi_inside_slurm_allocation_is_mpirun():
    env = {**SLURM, **OPENMPI, "MASTER_ADDR": "h", "MASTER_PORT": "2"}
    assert discover_launch_env(env, use_mpi=False).launcher == "mpirun"


def test_mpi_single_host_rank0_broadcasts_loopback_and_free_port(fake_mpi):
    comm = fake_mpi(FakeComm(0, ["box"] * 4))
    env = discover_launch_env({**OPENMPI, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"})
    assert (env.rank, env.world_size, env.master_addr, env.launcher) == (0, 4, "127.0.0.1", "mpirun")
    assert 1 <= env.master_port <= 65535 and comm.bcast_calls == 1


def test_mpi_other_rank_takes_rank0_values_and_derives_local_rank(fake_mpi):
    fake_mpi(FakeComm(3, ["a", "a", "b", "b"], root_payload=("10.1.2.3", 31337, None)))
    env = discover_launch_env({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"})
    assert env == LaunchEnv(3, 4, 1, 2, "10.1.2.3", 31337, "mpirun")


def test_mpi_multi_host_rank0_uses_its_address(fake_mpi, monkeypatch):
    fake_mpi(FakeComm(0, ["a", "b"]))
    monkeypatch.setattr(le.socket, "gethostbyname", lambda host: {"a": "10.0.0.7"}[host])
    env = discover_launch_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    assert (env.master_addr, env.local_rank, env.local_world_size) == ("10.0.0.7", 0, 1)


def test_mpi_env_overrides_win_over_broadcast(fake_mpi):
    fake_mpi(FakeComm(0, ["a", "b"]))
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "MASTER_PORT": "4444"}
    env |= {"OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "1", "MASTER_ADDR": "head"}
    assert discover_launch_env(env, use_mpi=True) == LaunchEnv(0, 2, 0, 1, "head", 4444, "mpirun")


def test_mpi_unresolvable_rank0_host_fails_on_every_rank(fake_mpi, monkeypatch):
    monkeypatch.setattr(le.socket, "gethostbyname", lambda host: "127.0.1.1")
    monkeypatch.setattr(le.socket, "getaddrinfo", lambda *a, **k: [])
    fake_mpi(FakeComm(0, ["a", "b"]))
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    with pytest.raises(LaunchEnvError, match="does not resolve to an address") as info:
        discover_launch_env(env)
    assert "MASTER_ADDR" in str(info.value)
    fake_mpi(FakeComm(1, ["a", "b"], root_payload=(None, None, str(info.value))))
    with pytest.raises(LaunchEnvError, match="does not resolve"):
        discover_launch_env({**env, "OMPI_COMM_WORLD_RANK": "1"})


def test_mpi_rank_disagreeing_with_comm_world(fake_mpi):
    fake_mpi(FakeComm(0, ["a"]))  # e.g. stale OMPI_* variables in a process mpirun did not start
    expect_error(OPENMPI, "disagree with MPI.COMM_WORLD", "launch with mpirun", use_mpi=None)


# ---------------------------------------------------------------------------- Slurm


def test_slurm_full():
    env = discover_launch_env(SLURM)
    assert env == LaunchEnv(9, 16, 1, 8, "gpu007", 10000 + 123456 % 20000, "slurm")


def test_slurm_port_is_deterministic_per_job():
    ports = {discover_launch_env({**SLURM, "SLURM_JOB_ID": str(job)}).master_port for job in (1, 2, 20001)}
    assert ports == {10001, 10002}


def test_slurm_tasks_per_node_fallback_and_nodelist_fallback():
    env = without(SLURM, "SLURM_NTASKS_PER_NODE", "SLURM_NODELIST")
    env |= {"SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NTASKS": "8", "SLURM_PROCID": "5"}
    env |= {"SLURM_JOB_NODELIST": "node[01-03,07],gpu5"}
    found = discover_launch_env(env)
    assert (found.rank, found.world_size, found.local_world_size, found.master_addr) == (5, 8, 4, "node01")


def test_slurm_uneven_tasks_per_node_uses_node_id():
    env = {**without(SLURM, "SLURM_NTASKS_PER_NODE"), "SLURM_TASKS_PER_NODE": "4(x2),3", "SLURM_NTASKS": "11"}
    assert discover_launch_env({**env, "SLURM_NODEID": "2", "SLURM_PROCID": "10"}).local_world_size == 3
    expect_error(without(env, "SLURM_NODEID"), "SLURM_NODEID is not set", "SLURM_TASKS_PER_NODE")
    expect_error({**env, "SLURM_NODEID": "3"}, "SLURM_NODEID=3 is outside")


def test_slurm_step_values_win():
    env = {**SLURM, "SLURM_STEP_NODELIST": "gpu008", "SLURM_STEP_TASKS_PER_NODE": "2"}
    env |= {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}
    found = discover_launch_env(env)
    assert (found.master_addr, found.local_world_size, found.world_size) == ("gpu008", 2, 2)


def test_slurm_single_task_step_in_bigger_allocation():
    env = {**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert discover_launch_env(env).local_world_size == 1


def test_slurm_master_overrides():
    env = discover_launch_env({**SLURM, "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "6000"})
    assert (env.master_addr, env.master_port) == ("10.9.9.9", 6000)


def test_slurm_without_job_id_uses_default_port():
    assert discover_launch_env(without(SLURM, "SLURM_JOB_ID")).master_port == 29500


@pytest.mark.parametrize(
    "env, fragments",
    [
        (without(SLURM, "SLURM_NTASKS"), ["SLURM_NTASKS is not set", "srun"]),
        (without(SLURM, "SLURM_LOCALID"), ["SLURM_LOCALID is not set"]),
        (without(SLURM, "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"), ["SLURM_TASKS_PER_NODE"]),
        (without(SLURM, "SLURM_NODELIST", "SLURM_JOB_NODELIST"), ["SLURM_NODELIST", "MASTER_ADDR"]),
        (without(SLURM, "SLURM_STEP_ID"), ["batch script itself", "srun attnres-pretrain"]),
        ({**SLURM, "SLURM_PROCID": "16"}, ["SLURM_PROCID=16 is outside"]),
        ({**SLURM, "SLURM_NTASKS": "many"}, ["SLURM_NTASKS='many' is not an integer"]),
        ({**SLURM, "SLURM_LOCALID": "8"}, ["SLURM_LOCALID=8 is outside"]),
        ({**SLURM, "SLURM_JOB_ID": "12_3"}, ["SLURM_JOB_ID='12_3' is not an integer", "MASTER_PORT"]),
        ({**SLURM, "SLURM_NTASKS_PER_NODE": "8x"}, ["cannot parse '8x'"]),
        ({**SLURM, "SLURM_NODELIST": "gpu[007-008"}, ["unbalanced '['"]),
    ],
)
def test_slurm_bad_environments(env, fragments):
    expect_error(env, *fragments)


def test_slurm_nprocs_alias():
    env = {**without(SLURM, "SLURM_NTASKS"), "SLURM_NPROCS": "16"}
    assert discover_launch_env(env).world_size == 16


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("a1,b2", ["a1", "b2"]),
        ("n[1-2]", ["n1", "n2"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("gpu[009-011]", ["gpu009", "gpu010", "gpu011"]),
        ("single", ["single"]),
        ("r[1-2]-n[08-09]", ["r1-n08", "r1-n09", "r2-n08", "r2-n09"]),
        (" x[3],y[1-2] ", ["x3", "y1", "y2"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize(
    "nodelist, fragment",
    [
        ("", "empty"),
        ("a,,b", "empty entry"),
        ("node[01-03", "unbalanced '['"),
        ("node01]", "unbalanced ']'"),
        ("node[a-b]", "bad range"),
        ("node[3-1]", "descending range"),
        ("n[[1]]", "nested"),
    ],
)
def test_bad_nodelist(nodelist, fragment):
    with pytest.raises(LaunchEnvError, match=re.escape(fragment)):
        expand_nodelist(nodelist)


def test_first_host_does_not_expand_everything():
    assert first_host("n[0000000-9999999]") == "n0000000"


@pytest.mark.parametrize(
    "value, counts", [("8", [8]), ("4(x2)", [4, 4]), ("4(x2),3", [4, 4, 3]), ("2,1(x3)", [2, 1, 1, 1])]
)
def test_parse_tasks_per_node(value, counts):
    assert parse_tasks_per_node(value) == counts


# ---------------------------------------------------------------------------- single process


def test_single_process_defaults():
    env = discover_launch_env({})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (0, 1, 0, 1)
    assert (env.master_addr, env.launcher) == ("127.0.0.1", "single")
    with socket.socket() as sock:  # the port was free when picked
        sock.bind(("127.0.0.1", env.master_port))


def test_single_process_master_overrides():
    env = discover_launch_env({"MASTER_PORT": "12345", "MASTER_ADDR": "localhost"})
    assert (env.master_addr, env.master_port) == ("localhost", 12345)
    expect_error({"MASTER_PORT": "port"}, "MASTER_PORT='port' is not an integer")


def test_reads_os_environ_by_default(monkeypatch):
    for name in list(os.environ):
        if name in TORCH_VARS or name.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MASTER_PORT", "23232")
    assert discover_launch_env() == LaunchEnv(0, 1, 0, 1, "127.0.0.1", 23232, "single")


# ---------------------------------------------------------------------------- export


def test_export_for_torch_round_trips(monkeypatch):
    # A private copy of the environment: delenv() on an unset variable records nothing, so
    # values exported here would leak into every later test's subprocesses.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in TORCH_VARS})
    launch = LaunchEnv(9, 16, 1, 8, "gpu007", 13456, "slurm")
    export_for_torch(launch)
    assert {name: os.environ[name] for name in TORCH_VARS} == {
        "RANK": "9",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": "13456",
    }
    assert discover_launch_env(dict(os.environ)) == dataclasses.replace(launch, launcher="torchrun")


def test_launch_env_is_frozen_and_error_is_value_error():
    env = LaunchEnv(0, 1, 0, 1, "127.0.0.1", 1, "single")
    with pytest.raises(dataclasses.FrozenInstanceError):
        env.rank = 1  # type: ignore[misc]
    assert issubclass(LaunchEnvError, ValueError)


# ---------------------------------------------------------------------------- real mpirun

# The ranks load launch_env.py by path: importing the package would also import Megatron,
# which costs seconds per rank and is not what this test is about.
MPI_SCRIPT = textwrap.dedent(
    f"""
    import importlib.util
    import sys

    import torch
    import torch.distributed as dist

    spec = importlib.util.spec_from_file_location("launch_env", {le.__file__!r})
    launch_env = sys.modules["launch_env"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_env)
    env = launch_env.discover_launch_env()
    launch_env.export_for_torch(env)
    dist.init_process_group("gloo")
    value = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(value)
    fields = (env.rank, env.world_size, env.local_rank, env.local_world_size, env.launcher, value.item())
    print("RESULT rank=%d world=%d local=%d/%d launcher=%s sum=%g END" % fields, flush=True)
    dist.destroy_process_group()
    """
)


def _mpi_skip_reason() -> str | None:
    if shutil.which("mpirun") is None:
        return "mpirun is not on PATH (install OpenMPI and mpi4py: bash scripts/install_mpi.sh)"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install 'attnres-megatron[mpi]' or bash scripts/install_mpi.sh)"
    return None


def test_real_mpirun_two_ranks_all_reduce():
    reason = _mpi_skip_reason()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k not in TORCH_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    env["PYTHONWARNINGS"] = "ignore"
    result = subprocess.run(
        ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "-c", MPI_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # mpirun forwards each rank's stdout separately, and two lines can arrive glued together.
    results = sorted(re.findall(r"RESULT (.*?) END", result.stdout))
    assert results == [
        "rank=0 world=2 local=0/2 launcher=mpirun sum=3",
        "rank=1 world=2 local=1/2 launcher=mpirun sum=3",
    ], output

"""Bounded failure of distributed runs: collective timeouts and SIGTERM while blocked.

A timed-out or broken collective becomes one error line naming the rank, the operation, its caller,
the group and ``--distributed-timeout-minutes``; a SIGTERM the blocked main thread cannot answer
(or a second one) ends the process with a message; under torchrun a stopped rank makes the other
exit within the timeout."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port

from attnres_megatron.training.collective_errors import exit_on_collective_failure
from attnres_megatron.training.termination import EXIT_STATUS, SigtermWatchdog, TerminationRequest

GLOO_TIMEOUT = (
    "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 6000ms for recv "
    "operation to complete"
)
GLOO_LOST_PEER = (
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:18571. "
    "This is typically caused by a remote worker crashing."
)


def defined_in(path: str, source: str, **names) -> dict:
    """Run ``source`` as if it were the file ``path`` (its frames carry that file name)."""
    namespace = dict(names)
    exec(compile(source, path, "exec"), namespace)
    return namespace


def failing_step(message: str):
    """``step()`` of a fake pretrain.py -> Megatron's finalize_model_grads -> torch.distributed.all_reduce
    raising ``message``, as a gloo collective does."""
    c10d = defined_in(
        "/site/torch/distributed/distributed_c10d.py",
        "def all_reduce(tensor, group=None):\n    raise RuntimeError(MESSAGE)\n",
        MESSAGE=message,
    )
    megatron = defined_in(
        "/site/megatron/core/distributed/finalize_model_grads.py",
        "def finalize_model_grads():\n    all_reduce(None)\n",
        all_reduce=c10d["all_reduce"],
    )
    ours = defined_in(
        "/work/attnres_megatron/training/pretrain.py",
        "def step():\n    finalize_model_grads()\n",
        finalize_model_grads=megatron["finalize_model_grads"],
    )
    return ours["step"]


def collective_error(step, minutes: float = 0.1) -> str:
    with pytest.raises(SystemExit) as exited:
        with exit_on_collective_failure(minutes):
            step()
    return str(exited.value.code)


def test_a_timed_out_collective_is_one_line_naming_rank_operation_group_and_flag(single_rank):
    message = collective_error(failing_step(GLOO_TIMEOUT))
    assert message.startswith(
        "error: rank 0: torch.distributed.all_reduce in finalize_model_grads "
        "(megatron/core/distributed/finalize_model_grads.py:2), called from step "
        "(attnres_megatron/training/pretrain.py:2) over ranks [0] (default_pg) timed out after 6 s "
        "(--distributed-timeout-minutes 0.1)"
    )
    assert "raise --distributed-timeout-minutes" in message
    assert message.endswith("[Timed out waiting 6000ms for recv operation to complete]")
    assert "\n" not in message


def test_a_lost_peer_is_named_as_such(single_rank):
    message = collective_error(failing_step(GLOO_LOST_PEER))
    assert "torch.distributed.all_reduce in finalize_model_grads" in message
    assert "lost its connection" in message and "[Connection closed by peer [127.0.0.1]:18571." in message


@pytest.mark.parametrize("text", ["shape mismatch", "the data loader timed out"])
def test_other_errors_pass_through_unchanged(text):
    def step():
        raise RuntimeError(text)

    with pytest.raises(RuntimeError, match=text):
        with exit_on_collective_failure(10):
            step()


# ------------------------------------------------------------------------------ SIGTERM


class Exits(list):
    """The statuses the watchdog would have exited with (it does not end the test process)."""

    def __init__(self) -> None:
        super().__init__()
        self.ended = threading.Event()

    def __call__(self, status: int) -> None:
        self.append(status)
        self.ended.set()

    def blocked(self, seconds: float) -> float:
        """Block the main thread in one C call (as a collective does) until the watchdog acts."""
        started = time.monotonic()
        self.ended.wait(seconds)
        return time.monotonic() - started


@pytest.fixture
def exits(monkeypatch) -> Exits:
    recorder = Exits()
    monkeypatch.setattr(SigtermWatchdog, "exit_process", staticmethod(recorder))
    return recorder


def test_a_sigterm_the_blocked_main_thread_cannot_answer_ends_the_process(exits, capsys):
    request = TerminationRequest(grace_seconds=0.5)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        waited = exits.blocked(10)
    finally:
        request.restore()
    assert exits == [EXIT_STATUS] and waited < 3
    err = capsys.readouterr().err
    assert "error: rank 0: exiting on SIGTERM (status 143) without finishing the iteration" in err
    assert re.search(r"blocked for \d+ s since the SIGTERM; it is in wait \(threading\.py:\d+\)", err), err
    assert "main thread (most recent call last):" in err


def test_a_second_sigterm_ends_the_process_at_once(exits, capsys):
    request = TerminationRequest(grace_seconds=60)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)
        waited = exits.blocked(10)
    finally:
        request.restore()
    assert exits == [EXIT_STATUS] and waited < 2
    assert "a second SIGTERM arrived" in capsys.readouterr().err


def busy(seconds: float) -> None:
    """Python work through many frames, as a training step does."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sum(i * i for i in range(200))


def test_a_working_main_thread_finishes_its_iteration_and_answers(exits):
    request = TerminationRequest(grace_seconds=0.3)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        busy(1.0)
        assert request.requested and exits == []  # making progress: never cut short
        request.answered = True  # the loop saw the request (everywhere()) and saves
        time.sleep(0.7)  # a long blocking call after the answer (the checkpoint) is not cut short
        assert exits == []
    finally:
        request.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ------------------------------------------------------------------------------ torchrun

TINY = [
    "--device",
    "cpu",
    "--mock-data",
    "--num-layers",
    "1",
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "2",
    "--seq-length",
    "16",
    "--micro-batch-size",
    "1",
    "--train-iters",
    "1000000",
    "--log-interval",
    "1",
    "--eval-iters",
    "0",
    "--no-progress-bar",
]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def workers(launcher: int) -> dict[int, int]:
    """Global rank -> pid of the processes torchrun (pid ``launcher``) started."""
    pids = []
    for task in Path(f"/proc/{launcher}/task").iterdir():
        pids += [int(pid) for pid in (task / "children").read_text().split()]
    ranks = {}
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks[int(next(v for v in environ if v.startswith(b"RANK="))[5:])] = pid
    return ranks


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads torchrun's workers from /proc")
def test_a_stopped_rank_makes_the_other_exit_with_the_collective_named():
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={free_port()}",
        "-m",
        "attnres_megatron.training.pretrain",
        *TINY,
        "--distributed-timeout-minutes",
        "0.1",
    ]
    launcher = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    errors: list[tuple[int, str]] = []
    threading.Thread(target=lambda: errors.extend(enumerate(launcher.stderr)), daemon=True).start()
    ranks: dict[int, int] = {}
    try:
        for line in launcher.stdout:  # the last rank logs the iterations
            if " iteration " in line:
                break
        ranks = workers(launcher.pid)
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        while running(ranks[0]) and time.monotonic() - stopped < 30:
            time.sleep(0.1)
        exited = time.monotonic() - stopped
        assert not running(ranks[0]), "rank 0 still runs 30 s after rank 1 stopped"
        assert exited < 6 + 15, f"rank 0 exited {exited:.0f} s after rank 1 stopped (timeout 6 s)"
        time.sleep(0.5)
        lines = [line for _, line in errors if line.startswith("error: rank 0:")]
        assert lines, "".join(line for _, line in errors)[-3000:]
        assert "timed out after 6 s (--distributed-timeout-minutes 0.1): rank 1 did not take part" in lines[0]
        assert "torch.distributed." in lines[0] and " over ranks [0, 1]" in lines[0]
    finally:
        for pid in ranks.values():
            if running(pid):
                os.kill(pid, signal.SIGKILL)  # also ends a stopped process
        try:
            launcher.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode != 0

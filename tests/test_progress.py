"""The optional tqdm progress bar of ``attnres-pretrain``: on terminals only, off on request."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import sys
import termios
import time
from pathlib import Path

import forked_cli
import pytest
from attnres_defaults import PRE_MEGATRON_DEFAULTS, old_ffn

from attnres_megatron.training import progress
from attnres_megatron.training.progress import ProgressBar, close_progress_bar, print_line

REPO_ROOT = Path(__file__).resolve().parents[1]


class FakeTerminal(io.StringIO):
    """An in-memory stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal_counts_iterations_and_keeps_log_lines_above(capsys):
    pytest.importorskip("tqdm")
    stream = FakeTerminal()
    bar = ProgressBar(total=5, initial=1, stream=stream)
    assert bar.active
    bar.update(2.5)
    print_line("> a log line")  # goes above the bar, on the bar's stream
    bar.update(skipped=True)
    bar.close()
    text = stream.getvalue()
    assert "training" in text and "3/5" in text
    assert "lm loss 2.5000" in text and "skipped: non-finite" in text
    assert "> a log line\n" in text
    assert capsys.readouterr().out == ""
    assert not bar.active
    print_line("> after the bar")  # plain printing again
    assert capsys.readouterr().out == "> after the bar\n"
    assert "after the bar" not in stream.getvalue()


@pytest.mark.parametrize("case", ["not a terminal", "disabled", "tqdm missing"])
def test_no_bar(case, monkeypatch, capsys):
    stream = io.StringIO() if case == "not a terminal" else FakeTerminal()
    if case == "tqdm missing":
        monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    bar = ProgressBar(total=5, stream=stream, enabled=case != "disabled")
    assert not bar.active and progress._active is None
    bar.update(1.0)
    print_line("> a log line")
    bar.close()
    close_progress_bar()
    assert stream.getvalue() == ""
    assert capsys.readouterr().out == "> a log line\n"


def run_in_terminal(*args: str, timeout: float = 300) -> str:
    """Run ``attnres-pretrain`` with stdout on a pseudo-terminal; return what it printed there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 24 x 120 characters
    process = forked_cli.Popen(  # forked from the preloaded server, on the terminal
        [sys.executable, "-m", "attnres_megatron.training.pretrain", *args],
        stdin=forked_cli.DEVNULL,
        stdout=slave,
        stderr=forked_cli.DEVNULL,
        cwd=REPO_ROOT,
    )
    os.close(slave)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                output += data
            elif process.poll() is not None:
                break
        assert process.wait(timeout=max(1.0, deadline - time.monotonic())) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    return output.decode(errors="replace")


TINY = [
    *PRE_MEGATRON_DEFAULTS,
    *old_ffn(32),
    "--device",
    "cpu",
    "--num-layers",
    "1",
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "16",
    "--micro-batch-size",
    "2",
    "--train-iters",
    "3",
    "--lr-warmup-iters",
    "1",
    "--log-interval",
    "1",
    "--corpus-bytes",
    "300000",
]


@pytest.mark.parametrize("flag", [[], ["--no-progress-bar"]], ids=["bar", "no-progress-bar"])
def test_pretrain_on_a_terminal(flag):
    pytest.importorskip("tqdm")
    text = run_in_terminal(*TINY, *flag)
    assert "iteration        3/       3" in text and "> done" in text
    drawn = "training:" in text and "3/3 [" in text
    assert drawn == (not flag), text[-2000:]

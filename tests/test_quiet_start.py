"""Quiet start: known upstream warnings are filtered, one line names the missing optional packages."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from attnres_defaults import PRE_MEGATRON_DEFAULTS, old_ffn

from attnres_megatron.training import quiet

TINY = [
    *PRE_MEGATRON_DEFAULTS,
    *old_ffn(32),
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
    "--train-iters",
    "1",
    "--lr-warmup-iters",
    "0",
    "--log-interval",
    "1",
    "--corpus-bytes",
    "65536",
    "--no-progress-bar",
]
UPSTREAM_MARKERS = ("Apex", "Transformer Engine", "cuda_graph_scope", "UserWarning", "warnings.warn")


def run_pretrain(*args: str) -> str:
    """``attnres-pretrain`` (the console script when installed beside this Python) in a clean
    environment: no pytest warning filters, no PYTHONWARNINGS; stdout and stderr together."""
    script = Path(sys.executable).with_name("attnres-pretrain")
    module = [sys.executable, "-m", "attnres_megatron.training.pretrain"]
    command = [str(script)] if script.is_file() else module
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    result = subprocess.run(
        [*command, *TINY, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout
    return result.stdout


def before_first_iteration(output: str) -> list[str]:
    """The lines printed before the first iteration log line."""
    lines = output.splitlines()
    first = next(i for i, line in enumerate(lines) if "| consumed samples:" in line)
    return lines[:first]


def test_pretrain_starts_quietly_and_names_missing_packages(tmp_path):
    output = run_pretrain("--save", str(tmp_path / "ckpt"), "--save-interval", "1")
    start = before_first_iteration(output)
    for marker in UPSTREAM_MARKERS:
        assert not [line for line in start if marker in line], output
        assert marker not in output, output  # the checkpoint save (a spawned process) stays quiet too
    announced = [line for line in start if "optional packages" in line]
    assert len(announced) == (1 if quiet.missing_optional_packages() else 0), output
    if announced:
        assert announced[0] == f"> {quiet.optional_packages_line()}"
    assert "> saved checkpoint at iteration 1" in output


def test_verbose_warnings_shows_upstream_warnings():
    output = run_pretrain("--verbose-warnings")
    start = before_first_iteration(output)
    # Megatron-Core's own default cuda_graph_scope raises this deprecation whatever is installed.
    assert any("cuda_graph_scope" in line for line in start), output
    assert any("UserWarning" in line for line in start), output
    if any(package.module == "apex" for package in quiet.missing_optional_packages()):
        assert any("Apex is not installed" in line for line in start), output


def emit(message: str, module: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` as if called from ``module``."""
    warnings.warn_explicit(message, category, filename=f"{module}.py", lineno=1, module=module)


def test_filters_hide_known_upstream_warnings_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.install_filters()
        emit("Apex is not installed. Falling back to Torch Norm", "megatron.core.models.backends")
        emit(
            "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
            "megatron.core.optimizer",
        )
        emit(
            "Transformer Engine and Apex are not installed. Falling back to local implementations",
            "megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision",
        )
        emit(
            "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.",
            "megatron.core.transformer.transformer_config",
        )
        emit("Apex is not installed. Falling back to Torch Norm", "attnres_megatron.layers.norms")
        emit("something else entirely", "megatron.core.models.backends")
        emit(
            "Apex is not installed. Falling back to Torch Norm",
            "megatron.core.models.backends",
            FutureWarning,
        )
    shown = [(str(w.message), w.category) for w in caught]
    assert shown == [
        ("Apex is not installed. Falling back to Torch Norm", UserWarning),  # ours: never hidden
        ("something else entirely", UserWarning),
        ("Apex is not installed. Falling back to Torch Norm", FutureWarning),
    ]


def test_cpu_advice_hidden_on_cpu_only():
    advice = (
        "When using async grad allreduce it is recommended to set the environment variable "
        "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup"
    )
    for device, verbose, expected in (("cuda", False, 1), ("cpu", True, 1), ("cpu", False, 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet.hide_cpu_advice(device, verbose)
            emit(advice, "megatron.core.tensor_parallel.layers")
        assert len(caught) == expected, (device, verbose)


@pytest.mark.parametrize(
    "argv, verbose",
    [([], False), (["--device", "cpu"], False), (["--verbose-warnings"], True), (["--verbose-w"], True)],
)
def test_verbose_flag_read_before_parsing(argv, verbose):
    assert quiet.verbose_requested(argv) is verbose
    with warnings.catch_warnings():
        assert quiet.quiet_start(argv) is not verbose


@pytest.mark.parametrize(
    "argv, orig_argv, expected",
    [
        (["/venv/bin/attnres-pretrain", "--device", "cpu"], [], True),
        (["attnres-profile"], [], True),
        (["-m"], ["python", "-u", "-m", "attnres_megatron.training.pretrain", "--device", "cpu"], True),
        (["-m"], ["python", "-m", "attnres_megatron.megatron_lm.pretrain_gpt_attnres"], True),
        ([os.path.join("src", "attnres_megatron", "profiling", "cli.py")], [], True),
        (["my_script.py"], ["python", "my_script.py"], False),
        (["-m"], ["python", "-m", "pytest"], False),
    ],
)
def test_entry_points_recognised(argv, orig_argv, expected):
    assert quiet.started_as_entry_point(argv, orig_argv) is expected


def test_optional_packages_line():
    present = quiet.OptionalPackage("os", "os", "the standard library")
    absent = quiet.OptionalPackage("attnres_no_such_package", "no-such-package", "nothing")
    assert quiet.optional_packages_line([present]) is None
    assert quiet.optional_packages_line([present, absent]) == (
        "optional packages not installed: no-such-package (nothing)"
    )
    names = {package.module for package in quiet.OPTIONAL_PACKAGES}
    assert {"transformer_engine", "apex", "mpi4py", "tensorboard", "triton", "ninja", "fla", "tqdm"} <= names


def test_flag_documented_in_parsers():
    from attnres_megatron.megatron_lm.arguments import driver_args_provider
    from attnres_megatron.profiling.arguments import build_profile_parser
    from attnres_megatron.training.arguments import build_parser

    for parser in (build_parser(), build_profile_parser()):
        assert "--verbose-warnings" in parser.format_help()
        assert parser.parse_args(["--verbose-warnings"]).verbose_warnings is True
        assert parser.parse_args([]).verbose_warnings is False
    megatron_lm = driver_args_provider(argparse.ArgumentParser(allow_abbrev=False))
    assert megatron_lm.parse_args(["--verbose-warnings"]).verbose_warnings is True

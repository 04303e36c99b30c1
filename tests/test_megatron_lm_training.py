"""Megatron-LM's own training loop trains the AttnRes models on the CPU, through both routes.

Each layout runs three times with the same flags: the no-patch driver, Megatron-LM's patched
``pretrain_gpt.py`` and ``attnres-pretrain``; the per-iteration training losses Megatron-LM writes
to TensorBoard must equal ``attnres-pretrain``'s (fp32, dropout on). Skipped without a Megatron-LM
checkout in ``MEGATRON_LM_DIR`` (see ``megatron_lm_runs.py``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from megatron_lm_runs import ROUTES, SKIP_REASON, Run, checkout_available, launch

pytestmark = pytest.mark.skipif(not checkout_available(), reason=SKIP_REASON)

ITERATIONS = 3
TINY_GPT = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --attention-residuals block "
    "--attn-res-num-blocks 2"
).split()
KIMI_TINY = (
    "--model kimi-linear-tiny --num-layers 5 --hidden-size 64 --num-attention-heads 4 --num-experts 8 "
    "--position-embedding-type none --untie-embeddings-and-output-weights"
).split()
SCHEDULE = (
    f"--seq-length 32 --max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8 "
    f"--train-iters {ITERATIONS} --lr 1e-3 --min-lr 1e-4 --lr-decay-iters {ITERATIONS} "
    "--eval-interval 3 --eval-iters 1 --log-interval 1 --seed 1234"
).split()
MOCK_DATA = "--mock-data --tokenizer-type NullTokenizer --vocab-size 255".split()
RUN = [*SCHEDULE, *MOCK_DATA]
# name: (processes, flags); every layout keeps Megatron-LM's dropout (0.1).
LAYOUTS = {
    "single": (1, [*TINY_GPT]),
    "tp2_sp": (
        2,
        [*TINY_GPT, "--normalization", "RMSNorm", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
    ),
    "pp2_vpp2": (
        2,
        [*TINY_GPT, "--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"],
    ),
    "ep2_moe": (
        2,
        [*TINY_GPT]
        + "--num-experts 4 --moe-router-topk 2 --expert-model-parallel-size 2 --disable-bias-linear "
        "--moe-token-dispatcher-type alltoall".split(),
    ),
    "kimi_tiny_pp2": (
        2,
        [*KIMI_TINY, "--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "2"],
    ),
}
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, str], Run]:
    """Launches of this module, by (layout, route), made on first use."""
    return {}


def trained(runs: dict, tmp_path_factory, layout: str, route: str) -> Run:
    if (layout, route) not in runs:
        nproc, flags = LAYOUTS[layout]
        workdir = tmp_path_factory.mktemp(f"{layout}-{route}")
        run = launch(route, [*flags, *RUN], workdir, nproc=nproc)
        assert run.returncode == 0, run.output[-6000:]
        runs[layout, route] = run
    return runs[layout, route]


def assert_same_losses(got: dict[int, float], wanted: dict[int, float]) -> float:
    """Equal per-iteration losses; returns the largest relative difference."""
    assert sorted(got) == sorted(wanted) == list(range(1, ITERATIONS + 1))
    worst = 0.0
    for step, value in wanted.items():
        assert math.isclose(got[step], value, rel_tol=LOSS_RTOL), (step, got[step], value)
        worst = max(worst, abs(got[step] - value) / abs(value))
    return worst


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_lm_loop_trains_with_attnres_pretrains_losses(layout, route, runs, tmp_path_factory):
    run = trained(runs, tmp_path_factory, layout, route)
    reference = trained(runs, tmp_path_factory, layout, "attnres-pretrain")
    worst = assert_same_losses(run.scalars("lm loss"), reference.scalars("lm loss"))
    print(f"{layout} {route}: largest relative loss difference {worst:.2e}")
    # Megatron-LM's own loop did it: its log lines, its evaluation, its TensorBoard tags.
    assert f"iteration        {ITERATIONS}/       {ITERATIONS} |" in run.output
    assert f"validation loss at iteration {ITERATIONS} on validation set" in run.output
    assert run.scalars("lm loss validation") and run.scalars("learning-rate")
    assert (
        "> AttnRes aggregation: --attn-res-impl auto -> one-pass with the C++ kernels "
        "(cpu, float32, block gradients summed in place)"
    ) in (run.output)


# ----------------------------------------------------------------------------- flags before CUDA


def run_quickly(route: str, argv: list[str], tmp_path: Path) -> Run:
    return launch(route, argv, tmp_path / route, nproc=1, timeout=180)


@pytest.mark.parametrize("route", ROUTES)
def test_help_lists_the_plugins_flags(route, tmp_path):
    run = run_quickly(route, ["--help"], tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    for flag in ("--attention-residuals", "--attn-res-num-blocks", "--attn-res-impl", "--model", "--device"):
        assert flag in run.output, flag
    assert "--tensor-model-parallel-size" in run.output  # Megatron-LM's own flags, same parser


@pytest.mark.parametrize("route", ROUTES)
def test_bad_flags_are_refused_before_cuda_initialisation(route, tmp_path):
    # --device cuda on this CPU machine: the AttnRes flag is checked first, then the device,
    # both while parsing, before Megatron-LM initialises anything.
    bad = run_quickly(route, [*TINY_GPT, *RUN, "--attn-res-num-blocks", "0", "--device", "cuda"], tmp_path)
    assert bad.returncode == 2, bad.output[-3000:]
    assert "error: --attn-res-num-blocks must be a positive integer; got 0." in bad.output
    for started in ("initializing torch distributed", "Megatron requires CUDA", "Traceback"):
        assert started not in bad.output
    cuda_only = run_quickly(route, [*TINY_GPT, *RUN, "--fp8-format", "hybrid"], tmp_path)
    assert cuda_only.returncode == 2, cuda_only.output[-3000:]
    assert "error: --fp8-format needs CUDA, and this run is on the CPU (--device cpu)" in cuda_only.output


# ----------------------------------------------------------------------------- a tokenized dataset


@pytest.fixture(scope="module")
def bpe_dataset(tmp_path_factory) -> list[str]:
    """A 300-id byte-level BPE (tools/train_tokenizer.py) and 30 standard-library files tokenized
    with it (tools/preprocess_data.py): the data and tokenizer flags of a run."""
    import json
    import subprocess
    import sys
    import sysconfig

    from megatron_lm_runs import ROOT, environment

    directory = tmp_path_factory.mktemp("bpe")
    tokenizer, prefix, docs = directory / "bpe300", directory / "docs", directory / "docs.jsonl"
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:30]
    docs.write_text("".join(json.dumps({"text": path.read_text()[:20000]}) + "\n" for path in sources))
    hf = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer)]
    for tool, argv in (
        (
            "train_tokenizer.py",
            ["--vocab-size", "300", "--output", str(tokenizer), "--corpus-bytes", "200000"],
        ),
        ("preprocess_data.py", ["--input", str(docs), "--output-prefix", str(prefix), "--quiet", *hf]),
    ):
        done = subprocess.run(
            [sys.executable, str(ROOT / "tools" / tool), *argv],
            env=environment(),
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    return ["--data-path", str(prefix), "--split", "80,10,10", *hf]


def test_megatron_lm_gpt_dataset_with_a_hugging_face_tokenizer(bpe_dataset, tmp_path):
    """Megatron-LM's GPTDataset with --tokenizer-type HuggingFaceTokenizer, as attnres-pretrain reads them."""
    flags = [*TINY_GPT, *SCHEDULE, *bpe_dataset]
    run = launch("driver", flags, tmp_path / "driver")
    assert run.returncode == 0, run.output[-6000:]
    reference = launch("attnres-pretrain", flags, tmp_path / "attnres-pretrain")
    assert reference.returncode == 0, reference.output[-6000:]
    assert "padded vocab (size: 300) with 84 dummy tokens (new size: 384)" in run.output
    worst = assert_same_losses(run.scalars("lm loss"), reference.scalars("lm loss"))
    print(f"BPE GPTDataset driver: largest relative loss difference {worst:.2e}")

"""Real tokenizers: Megatron-Core's libraries behind Megatron-LM's flags, the padded vocabulary,
the data checks, ``--mock-data`` and ``tools/train_tokenizer.py``."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import forked_cli
import numpy as np
import pytest
from conftest import free_port
from megatron.core.datasets.indexed_dataset import IndexedDataset

from attnres_megatron.training import data
from attnres_megatron.training.arguments import build_parser
from attnres_megatron.training.tokenizers import TokenizerError, build_tokenizer, tokenizer_args
from attnres_megatron.training.vocabulary import (
    VocabularyError,
    check_data_vocabulary,
    fits_without_reading,
    padded_vocab_size,
    token_id_range,
    vocab_size_with_padding,
)

REPO = Path(__file__).resolve().parents[1]
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
    "64",
    "--micro-batch-size",
    "2",
    "--lr-warmup-iters",
    "0",
    "--eval-iters",
    "0",
    "--log-interval",
    "5",
]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (tools is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


preprocess_data = load_tool("preprocess_data")
train_tokenizer = load_tool("train_tokenizer")


def hf(model: Path | str) -> object:
    """The tokenizer flags of a Hugging Face tokenizer (directory or tokenizer.json)."""
    return tokenizer_args(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(model))


def stdlib_texts(count: int, skip: int = 0) -> list[str]:
    """The text of ``count`` standard-library sources (documents for the data files)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[skip : skip + count]
    return [path.read_text(encoding="utf-8", errors="replace") for path in files]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}


def pretrain(*args: str, launcher: tuple[str, ...] = (sys.executable,)) -> subprocess.CompletedProcess:
    """``attnres-pretrain args`` with ``launcher``, forked from the preloaded server (forked_cli.py)."""
    command = [*launcher, "-m", "attnres_megatron.training.pretrain", *args]
    return forked_cli.run(command, timeout=600, env=clean_env())


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache root through ``ATTNRES_CACHE_DIR``."""
    root = tmp_path / "cache"
    monkeypatch.setenv(data.CACHE_ENV, str(root))
    return root


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> dict[int, Path]:
    """Byte-level BPE tokenizers of 1000 and 300 ids trained by tools/train_tokenizer.py."""
    made = {}
    for size in (1000, 300):
        output = tmp_path_factory.mktemp(f"bpe{size}")
        argv = ["--vocab-size", str(size), "--output", str(output), "--corpus-bytes", "600000"]
        assert train_tokenizer.main(argv) == 0
        made[size] = output
    return made


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory, bpe) -> str:
    """60 standard-library files preprocessed with the 1000-id BPE; the prefix."""
    directory = tmp_path_factory.mktemp("bpe_data")
    source = write_jsonl(directory / "docs.jsonl", stdlib_texts(60))
    prefix = str(directory / "bpe1000")
    preprocess_data.preprocess([str(source)], prefix, tokenizer=hf(bpe[1000]), progress=False)
    return prefix


# ----------------------------------------------------------------------------- the vocabulary


def megatron_lm_padding(vocab: int, divisor: int, tensor_parallel: int) -> int:
    """Megatron-LM's rule, counted out: the first size >= vocab divisible by divisor x TP."""
    size = vocab
    while size % (divisor * tensor_parallel):
        size += 1
    return size


@pytest.mark.parametrize(
    "vocab, divisor, tp",
    [(256, 128, 1), (256, 128, 4), (257, 128, 1), (1000, 128, 1), (1000, 128, 2), (1000, 64, 3),
     (50257, 128, 8), (2, 1, 1), (32000, 1, 1), (151, 8, 2)],
)  # fmt: skip
def test_padded_vocabulary_is_megatron_lms_rule(vocab, divisor, tp):
    expected = megatron_lm_padding(vocab, divisor, tp)
    assert vocab_size_with_padding(vocab, divisor, tp) == expected
    args = build_parser().parse_args(
        ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab - 1)]  # + its end of document
        + ["--make-vocab-size-divisible-by", str(divisor), "--tensor-model-parallel-size", str(tp)]
    )
    assert build_tokenizer(args).vocab_size == vocab
    assert padded_vocab_size(args) == expected


def test_the_default_byte_vocabulary_and_padding_errors():
    args = build_parser().parse_args([])
    assert (args.tokenizer_type, args.make_vocab_size_divisible_by) == ("ByteLevelTokenizer", 128)
    assert padded_vocab_size(args) == 256
    args.tensor_model_parallel_size = 4
    assert padded_vocab_size(args) == megatron_lm_padding(256, 128, 4) == 512
    args.make_vocab_size_divisible_by = 0
    with pytest.raises(VocabularyError, match="--make-vocab-size-divisible-by must be >= 1"):
        padded_vocab_size(args)


# ----------------------------------------------------------------------------- flags and errors


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(tokenizer_type="HuggingFaceTokenizer"), "needs --tokenizer-model PATH"),
        (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model="/no/such.model"), "no such file"),
        (dict(tokenizer_type="NullTokenizer"), "NullTokenizer needs --vocab-size"),
        (dict(vocab_size=100), "--vocab-size 100 is below ByteLevelTokenizer's 256"),
        (dict(tokenizer_model="x.json"), "reads no file: drop --tokenizer-model"),
    ],
)
def test_bad_tokenizer_flags_name_the_flag(flags, message):
    with pytest.raises(TokenizerError, match=message):
        build_tokenizer(tokenizer_args(**flags))


def test_the_removed_tokenizer_flag_is_refused(capsys):
    for parse in (build_parser().parse_args, preprocess_data.parse_args):
        with pytest.raises(SystemExit) as stopped:
            parse(["--input", "x", "--output-prefix", "y", "--tokenizer", "byte"])
        assert stopped.value.code == 2
        assert "--tokenizer was replaced by Megatron-LM's --tokenizer-type and --tokenizer-model" in (
            capsys.readouterr().err
        )


# ----------------------------------------------------------------------------- tools/train_tokenizer.py


@pytest.mark.slow
def test_train_tokenizer_makes_a_bpe_with_an_end_of_document_token(bpe, tmp_path):
    directory = bpe[1000]
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>"
    from_dir, from_file = build_tokenizer(hf(directory)), build_tokenizer(hf(directory / "tokenizer.json"))
    text = "def main(argv):\n    return 0  # héllo\n"
    for tok in (from_dir, from_file):
        assert (tok.vocab_size, tok.eod) == (1000, 0)  # <|endoftext|> is id 0
        assert tok.detokenize(tok.tokenize(text)) == text
    assert from_dir.tokenize(text) == from_file.tokenize(text)
    assert len(from_dir.tokenize(text)) < len(text.encode()) / 2  # merges learned from the corpus
    assert from_dir.unique_identifiers != from_file.unique_identifiers  # different paths, own caches

    # A lone tokenizer.json names no eos_token: the end of document is its <|endoftext|>; one without
    # any end-of-document token is refused.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bare.train_from_iterator(stdlib_texts(3), trainer)
    bare.save(str(tmp_path / "no_eod.json"))
    with pytest.raises(TokenizerError, match="has no end-of-document token"):
        build_tokenizer(hf(tmp_path / "no_eod.json"))
    assert train_tokenizer.main(["--vocab-size", "100", "--output", str(tmp_path / "x")]) == 2


# ----------------------------------------------------------------------------- preprocessing


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (character -> byte), which tokenizers' ByteLevel uses."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            codes[chr(byte)] = byte
        else:
            codes[chr(256 + extra)] = byte
            extra += 1
    return codes


def tiktoken_ranks_from_bpe(bpe_dir: Path, path: Path) -> int:
    """Megatron's tiktoken JSON (ranks of the 256 bytes, then the merges in order) of a BPE; its size."""
    decoder = gpt2_byte_decoder()
    merges = json.loads((bpe_dir / "tokenizer.json").read_text())["model"]["merges"]
    tokens = [bytes([byte]) for byte in range(256)]
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(decoder[c] for c in left + right)
        if token not in tokens:
            tokens.append(token)
    ranks = [
        {"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("utf-8", "replace")}
        for i, t in enumerate(tokens)
    ]
    path.write_text(json.dumps(ranks))
    return len(ranks)


def sentencepiece_model(tmp_path: Path) -> Path:
    """A tiny SentencePiece BPE model trained here (offline)."""
    import sentencepiece

    lines = [line for text in stdlib_texts(20) for line in text.splitlines() if line.strip()]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=400,
        model_type="bpe",
        character_coverage=1.0,
        minloglevel=2,
    )
    return tmp_path / "sp.model"


def tokenizer_flags(kind: str, bpe: dict[int, Path], tmp_path: Path):
    """The flags of each tokenizer type that works offline, and the expected vocabulary."""
    if kind == "byte":
        return tokenizer_args(), 256
    if kind == "null":
        return tokenizer_args(tokenizer_type="NullTokenizer", vocab_size=5000), 5001
    if kind == "hf-dir":
        return hf(bpe[1000]), 1000
    if kind == "hf-json":
        return hf(bpe[300] / "tokenizer.json"), 300
    if kind == "tiktoken":
        size = tiktoken_ranks_from_bpe(bpe[300], tmp_path / "ranks.json")
        flags = dict(tiktoken_num_special_tokens=16, vocab_size=16 + size)
        return tokenizer_args(
            tokenizer_type="TikTokenizer", tokenizer_model=str(tmp_path / "ranks.json"), **flags
        ), 16 + size
    model = sentencepiece_model(tmp_path)
    return tokenizer_args(tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(model)), 400


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["byte", "null", "hf-dir", "hf-json", "tiktoken", "sentencepiece"])
def test_preprocess_with_each_offline_tokenizer(kind, bpe, tmp_path):
    flags, vocab = tokenizer_flags(kind, bpe, tmp_path)
    texts = ["12 7 3 4999", "0 1"] if kind == "null" else [*stdlib_texts(3, skip=100), "héllo wörld"]
    source = write_jsonl(tmp_path / "docs.jsonl", texts)
    prefix = str(tmp_path / "out")
    stats = preprocess_data.preprocess([str(source)], prefix, tokenizer=flags, progress=False)
    tok = build_tokenizer(flags)
    assert tok.vocab_size == vocab
    assert stats.dtype == np.dtype(data.dtype_for_vocab(vocab)).name
    written = IndexedDataset(prefix)
    expected = [tok.tokenize(text) + [tok.eod] for text in texts]
    assert [written[i].tolist() for i in range(len(written))] == expected
    assert all(0 <= i < vocab for ids in expected for i in ids)
    # SentencePiece normalises whitespace; Megatron-Core's TikTokenizer decodes token by token.
    if kind not in ("null", "sentencepiece", "tiktoken"):
        assert tok.detokenize(expected[-1][:-1]) == texts[-1]
    check_data_vocabulary([prefix], tok)


@pytest.mark.slow
@pytest.mark.distributed
def test_preprocess_workers_build_the_tokenizer_from_the_flags(bpe, tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", stdlib_texts(12))
    serial = preprocess_data.preprocess(
        [str(source)], str(tmp_path / "s"), tokenizer=hf(bpe[300]), progress=False
    )
    argv = ["--input", str(source), "--output-prefix", str(tmp_path / "p"), "--workers", "2", "--quiet"]
    argv += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(bpe[300])]
    assert preprocess_data.main(argv) == 0
    assert serial.dtype == "uint16"
    assert (tmp_path / "s.bin").read_bytes() == (tmp_path / "p.bin").read_bytes()


@pytest.mark.slow
def test_the_built_in_corpus_with_a_bpe_tokenizer(bpe, cache_dir):
    tok = build_tokenizer(hf(bpe[1000]))
    prefix = data.default_corpus_prefix(max_bytes=60000, tokenizer=tok)
    assert "stdlib-byte-v1" not in prefix
    files = data._corpus_files(60000)
    corpus = IndexedDataset(prefix)  # kept: its documents are views of its memory map
    assert corpus[0].tolist() == tok.tokenize(files[0].read_text(encoding="utf-8")) + [tok.eod]
    byte_prefix = data.default_corpus_prefix(max_bytes=60000)
    assert "stdlib-byte-v1" in byte_prefix  # the default tokenizer keeps the existing cache
    assert IndexedDataset(byte_prefix).index.dtype == np.uint8


# ----------------------------------------------------------------------------- the data check


def test_the_data_check_reads_only_what_the_dtype_does_not_bound(tmp_path):
    data.write_indexed_dataset([[5, 6], [250]], tmp_path / "bytes", 256, 0)
    assert fits_without_reading(str(tmp_path / "bytes"), 256)  # uint8 ids cannot leave [0, 256)
    data.write_indexed_dataset([[5, 6], [999]], tmp_path / "wide", 1000, 0)
    assert not fits_without_reading(str(tmp_path / "wide"), 1000)
    assert token_id_range(str(tmp_path / "wide")) == (0, 999)
    small = build_tokenizer(tokenizer_args(tokenizer_type="NullTokenizer", vocab_size=499))
    with pytest.raises(VocabularyError) as refused:
        check_data_vocabulary([str(tmp_path / "bytes"), str(tmp_path / "wide")], small)
    message = str(refused.value)
    assert f"data file {tmp_path / 'wide'} holds ids 0..999" in message
    assert "vocabulary of 500 ids" in message and "bytes holds" not in message


@pytest.mark.slow
def test_out_of_range_token_ids_are_refused_before_any_work(pretrain_refusal, bpe, bpe_data):
    """Data preprocessed with the 1000-id BPE, trained with a smaller tokenizer: refused at start-up."""
    base = [*TINY, "--train-iters", "5", "--data-path", bpe_data]
    smaller = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(bpe[300])]
    refused = pretrain_refusal([*base, *smaller])
    assert f"data file {bpe_data} holds ids 0..999" in refused
    assert "outside the vocabulary of 300 ids" in refused and "--tokenizer-model" in refused
    assert "outside the vocabulary of 256 ids (--tokenizer-type ByteLevelTokenizer)" in pretrain_refusal(base)


# ----------------------------------------------------------------------------- training


BPE_TRAINING = (
    "--train-iters",
    "20",
    "--eval-interval",
    "10",
    "--eval-iters",
    "2",
    "--hidden-dropout",
    "0",
    "--attention-dropout",
    "0",
    "--normalization",
    "RMSNorm",
    "--tokenizer-type",
    "HuggingFaceTokenizer",
    "--attention-residuals",
    "block",
    "--attn-res-block-size",
    "2",
)
"""20 steps on the 1000-id BPE data, evaluating at 10 and 20 and at the end (no dropout, so every
layout computes the same losses)."""


def bpe_training(bpe: dict[int, Path], bpe_data: str, summary: Path, *extra: str, **kwargs):
    result = pretrain(
        *TINY,
        *BPE_TRAINING,
        "--tokenizer-model",
        str(bpe[1000]),
        "--data-path",
        bpe_data,
        "--summary-json",
        str(summary),
        *extra,
        **kwargs,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(summary.read_text()), result.stdout


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, bpe, bpe_data) -> tuple[dict, Path, str]:
    """The BPE training single process, saved; (summary, checkpoint, log)."""
    directory = tmp_path_factory.mktemp("bpe_run")
    ck = directory / "ck"
    summary, log = bpe_training(bpe, bpe_data, directory / "summary.json", "--save", str(ck))
    return summary, ck, log


@pytest.mark.slow
def test_pretrain_trains_and_evaluates_with_a_bpe_tokenizer(bpe_run, bpe, pretrain_refusal, tmp_path):
    summary, ck, log = bpe_run
    losses = summary["losses"]
    assert len(losses) == 20 and np.log(1000) - 0.3 < losses[0] < np.log(1000) + 0.5
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    assert [e["iteration"] for e in summary["evaluations"] if e["split"] == "validation"] == [10, 20, 20]
    assert summary["validation_loss"] < np.log(1000) - 0.3
    assert "validation loss at iteration 20 on validation set | lm loss value:" in log

    # The vocabulary is saved with the run's arguments: the plot tool rebuilds the same model.
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_common_state_dict(str(ck / "iter_0000020"))["args"]
    assert (saved["padded_vocab_size"], saved["tokenizer_model"]) == (1024, str(bpe[1000]))
    tool = [sys.executable, str(REPO / "tools" / "plot_depth_attention.py"), "--load", str(ck)]
    plotted = forked_cli.run([*tool, "--output", str(tmp_path / "depth.png")], timeout=300, cwd=tmp_path)
    assert plotted.returncode == 0, plotted.stderr[-3000:]
    assert "final" in plotted.stdout

    # Resuming with another tokenizer is refused before any work, naming both vocabularies.
    refused = pretrain_refusal([*TINY, "--train-iters", "25", "--load", str(ck)])
    assert f"--load {ck} holds a model with a vocabulary of 1024 ids" in refused and "gives 256" in refused


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    [("--tensor-model-parallel-size", "2", "--sequence-parallel"), ("--pipeline-model-parallel-size", "2")],
    ids=["tp2_sp", "pp2"],
)
def test_bpe_training_and_evaluation_under_torchrun(bpe_run, bpe, bpe_data, tmp_path, layout):
    """TP2+SP computes the single process's losses; PP2 trains and evaluates the same way from
    its own initialisation (Megatron seeds each pipeline stage with seed + 100 x its rank)."""
    single, _, _ = bpe_run
    torchrun = (
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={free_port()}",
    )
    summary, log = bpe_training(bpe, bpe_data, tmp_path / "run.json", *layout, launcher=torchrun)
    got = [(e["split"], e["iteration"], e["loss"]) for e in summary["evaluations"]]
    want = [(e["split"], e["iteration"], e["loss"]) for e in single["evaluations"]]
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert "validation loss at iteration 20 on validation set | lm loss value:" in log
    if "--pipeline-model-parallel-size" in layout:
        losses = summary["losses"]
        assert np.log(1000) - 0.3 < losses[0] < np.log(1000) + 0.5
        assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
        assert summary["validation_loss"] < np.log(1000) - 0.3
        return
    np.testing.assert_allclose(summary["losses"], single["losses"], rtol=1e-4)  # fp32, vocabulary 1024
    np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], rtol=1e-4)


# ----------------------------------------------------------------------------- --mock-data


@pytest.mark.slow
def test_mock_data_draws_ids_from_the_tokenizer_vocabulary(tmp_path):
    tok = build_tokenizer(tokenizer_args(tokenizer_type="NullTokenizer", vocab_size=99))
    train, valid, test = data.build_mock_datasets(32, 1234, 40, 8, 0, tok)
    assert (len(train) >= 40, len(valid) >= 8, test) == (True, True, None)
    samples = np.stack([train[i]["tokens"].numpy() for i in range(40)])
    assert samples.max() < 100 and (samples == tok.eod).any()
    summary = tmp_path / "mock.json"
    mock = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "99"]
    result = pretrain(*TINY, "--train-iters", "6", *mock, "--summary-json", str(summary))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(json.loads(summary.read_text())["losses"]) == 6

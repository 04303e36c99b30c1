"""Fast checks of the Megatron-Core data path: preprocessing, GPT datasets, batches, the default corpus."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from attnres_megatron.training import data
from attnres_megatron.training.tokenizers import TokenizerError, build_tokenizer, tokenizer_args

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (tools is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


preprocess_data = load_tool("preprocess_data")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache root through ``ATTNRES_CACHE_DIR``."""
    root = tmp_path / "cache"
    monkeypatch.setenv(data.CACHE_ENV, str(root))
    return root


def text_documents(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "résumé", "naïve", "x", "yz", "\n", "ü"]
    return [" ".join(rng.choice(words, size=int(rng.integers(5, 60)))) for _ in range(count)]


def make_prefix(tmp_path: Path, name: str, count: int, seed: int) -> str:
    """An indexed dataset of ``count`` JSONL documents; returns its prefix."""
    source = tmp_path / f"{name}.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in text_documents(count, seed)))
    prefix = str(tmp_path / name)
    preprocess_data.preprocess([str(source)], prefix, progress=False)
    return prefix


def test_tokenizers() -> None:
    tok = build_tokenizer()  # the default: Megatron-Core's byte-level tokenizer, NUL ends a document
    assert (tok.tokenizer_type, tok.vocab_size, tok.eod) == ("ByteLevelTokenizer", 256, 0)
    assert tok.tokenize("hé") == list("hé".encode())
    assert tok.detokenize(tok.tokenize("hé")) == "hé"
    wide = build_tokenizer(tokenizer_args(vocab_size=257))
    assert (wide.vocab_size, wide.eod) == (257, 0)
    missing = tokenizer_args(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/nonexistent/t.json")
    with pytest.raises(TokenizerError, match="--tokenizer-model /nonexistent/t.json: no such file"):
        build_tokenizer(missing)


def test_preprocess_roundtrip_text_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first document\nstill first")
    (tmp_path / "b.txt").write_text("")  # empty: skipped
    (tmp_path / "lines.md").write_text("line one\n\nline two\n")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "json one", "id": 1}) + "\n\n" + json.dumps({"text": "jsön two"}) + "\n"
    )
    prefix = str(tmp_path / "out" / "mixed")
    stats = preprocess_data.preprocess(
        [str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl")], prefix, progress=False
    )
    assert (stats.documents, stats.dtype) == (3, "uint8")
    dataset = IndexedDataset(prefix)
    expected = ["first document\nstill first", "json one", "jsön two"]
    assert len(dataset) == len(expected)
    for i, text in enumerate(expected):
        assert dataset[i].tolist() == list(text.encode()) + [0]
    assert dataset.document_indices.tolist() == [0, 1, 2, 3]

    split_prefix = str(tmp_path / "lines")
    assert (
        preprocess_data.main(
            [
                "--input",
                str(tmp_path / "lines.md"),
                "--output-prefix",
                split_prefix,
                "--split-lines",
                "--vocab-size",
                "257",
                "--quiet",
            ]
        )
        == 0
    )
    lines = IndexedDataset(split_prefix)
    assert lines.index.dtype == np.uint16
    assert [lines[i].tolist() for i in range(len(lines))] == [list(b"line one\0"), list(b"line two\0")]


def test_preprocess_workers_match_serial(tmp_path: Path) -> None:
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"body": t}) + "\n" for t in text_documents(40, 3)))
    serial = preprocess_data.preprocess([str(source)], str(tmp_path / "s"), json_key="body", progress=False)
    parallel = preprocess_data.preprocess(
        [str(source)], str(tmp_path / "p"), json_key="body", workers=2, progress=False
    )
    assert serial.tokens == parallel.tokens
    assert (tmp_path / "s.bin").read_bytes() == (tmp_path / "p.bin").read_bytes()
    assert (tmp_path / "s.idx").read_bytes() == (tmp_path / "p.idx").read_bytes()


def test_preprocess_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(data.DataError, match="missing.txt"):
        preprocess_data.preprocess([str(tmp_path / "missing.txt")], str(tmp_path / "x"), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(data.DataError, match=r"bad\.jsonl:2: malformed JSON"):
        preprocess_data.preprocess([str(bad)], str(tmp_path / "x"), progress=False)
    wrong_key = tmp_path / "key.jsonl"
    wrong_key.write_text(json.dumps({"content": "ok"}) + "\n")
    with pytest.raises(data.DataError, match=r"key\.jsonl:1: .*'text'"):
        preprocess_data.preprocess([str(wrong_key)], str(tmp_path / "x"), progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(data.DataError, match="No documents"):
        preprocess_data.preprocess([str(tmp_path / "empty.txt")], str(tmp_path / "x"), progress=False)
    assert not list(tmp_path.glob("x.*"))  # nothing half-written is left behind
    argv = ["--input", str(bad), "--output-prefix", str(tmp_path / "x"), "--quiet"]
    assert preprocess_data.main(argv) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_the_tool_exits_2_on_bad_input(tmp_path: Path) -> None:
    """End to end, once: the script itself exits with status 2 and the message."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    result = subprocess.run(
        [
            sys.executable,
            str(TOOLS / "preprocess_data.py"),
            "--input",
            str(bad),
            "--output-prefix",
            str(tmp_path / "x"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "bad.jsonl:2" in result.stderr


def test_blend_validation(tmp_path: Path) -> None:
    assert data.parse_blend(["p"]) == (["p"], None)
    assert data.parse_blend("0.3 p1 0.7 p2") == (["p1", "p2"], [0.3, 0.7])
    for blend, pattern in [
        (["0.3", "p1", "0.7"], "odd number"),
        (["0.3", "p1", "p2", "0.7"], "Malformed data blend"),
        (["-1", "p1"], "finite, >= 0"),
        ([], "empty"),
    ]:
        with pytest.raises(data.DataError, match=pattern):
            data.build_datasets(blend, "1,0,0", 16, 1, 10, 0)
    with pytest.raises(data.DataError, match="Malformed split"):
        data.build_datasets([str(tmp_path / "p")], "a,b", 16, 1, 10, 0)
    missing = str(tmp_path / "nothing")
    with pytest.raises(data.DataError, match=r"nothing\.bin.*\n.*preprocess_data\.py"):
        data.build_datasets([missing], "1,0,0", 16, 1, 10, 0)


def test_blended_gpt_datasets_and_batches(tmp_path: Path) -> None:
    p1 = make_prefix(tmp_path, "one", 60, 1)
    p2 = make_prefix(tmp_path, "two", 80, 2)
    kwargs = dict(split="90,8,2", seq_length=32, seed=7, train_samples=96, valid_samples=16)
    train, valid = data.build_datasets(["0.3", p1, "0.7", p2], **kwargs)
    assert type(train).__name__ == "BlendedDataset"
    assert len(train) >= 96 and len(valid) >= 16
    sample = train[5]
    assert sample["tokens"].shape == (32,) and sample["labels"].dtype == torch.int64
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    # Both prefixes contribute; the sample order is deterministic (rebuilt from the cache).
    assert set(int(train[i]["dataset_id"]) for i in range(len(train))) == {0, 1}
    again, _ = data.build_datasets(["0.3", p1, "0.7", p2], **kwargs)
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in range(len(train)))

    gbs, mbs, dp = 8, 2, 2
    ranks = [data.DataParallelBatches(train, gbs, mbs, r, dp) for r in range(dp)]
    steps = [[next(batches) for _ in range(6)] for batches in ranks]
    # Megatron's sampler order: micro-batch m of rank r holds samples step*gbs + m*mbs*dp + r*mbs + i.
    for step in range(6):
        for rank in range(dp):
            micro = steps[rank][step]
            assert len(micro) == gbs // (mbs * dp)
            for m, (tokens, labels) in enumerate(micro):
                first = step * gbs + m * mbs * dp + rank * mbs
                expect = torch.stack([train[first + i]["tokens"] for i in range(mbs)])
                assert tokens.shape == (mbs, 32) and torch.equal(tokens, expect)
                assert torch.equal(labels[:, :-1], tokens[:, 1:])
    # Resuming at step 4 reproduces the uninterrupted run, from a freshly built dataset too.
    resumed = data.DataParallelBatches(again, gbs, mbs, 1, dp, start_step=4)
    by_samples = data.DataParallelBatches(again, gbs, mbs, 1, dp, consumed_samples=4 * gbs)
    for step in (4, 5):
        for a, b, c in zip(steps[1][step], next(resumed), next(by_samples)):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[0], c[0])
    assert resumed.consumed_samples == 6 * gbs
    with pytest.raises(data.DataError, match="multiple of micro_batch_size"):
        data.DataParallelBatches(train, 6, 4, 0, 1)
    # Asking the dataset for more than it was built for names the fix.
    with pytest.raises(data.DataError, match="train_samples"):
        data.DataParallelBatches(train, gbs, mbs, 0, dp).batches(len(train) // gbs + 1)


def test_single_prefix_split_without_documents(tmp_path: Path) -> None:
    prefix = make_prefix(tmp_path, "few", 5, 4)
    train, valid = data.build_datasets([prefix], "969,30,1", 64, 1, 20, 0)
    assert type(train).__name__ == "GPTDataset" and len(train) >= 20 and valid is None
    with pytest.raises(data.DataError, match="valid split none"):
        data.build_datasets([prefix], "969,30,1", 64, 1, 20, 4)


def test_default_corpus_cache(cache_dir: Path) -> None:
    prefix = data.default_corpus_prefix(max_bytes=300_000)
    assert prefix.startswith(str(cache_dir / data.DEFAULT_CORPUS_DIR))
    bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
    dataset = IndexedDataset(prefix)
    files = data._corpus_files(300_000)
    assert len(dataset) == len(files) >= 1
    assert dataset[0].tolist() == list(files[0].read_bytes()) + [build_tokenizer().eod]
    stamps = (bin_path.stat().st_mtime_ns, idx_path.stat().st_mtime_ns)
    os.environ.pop(data.CACHE_ENV)  # the explicit argument names the same root
    assert data.default_corpus_prefix(cache_dir, max_bytes=300_000) == prefix
    assert (bin_path.stat().st_mtime_ns, idx_path.stat().st_mtime_ns) == stamps
    assert not [p for p in bin_path.parent.parent.iterdir() if ".tmp-" in p.name]
    train, _ = data.build_datasets([prefix], "98,2,0", 128, 1, 32, 0, path_to_cache=cache_dir / "idx")
    assert len(train) >= 32


def test_default_corpus_concurrent_processes(cache_dir: Path) -> None:
    code = "from attnres_megatron.training import data; print(data.default_corpus_prefix(max_bytes=200_000))"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120)[0].strip().splitlines()[-1] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert len(set(outputs)) == 1
    assert IndexedDataset(outputs[0]).sequence_lengths.sum() > 0

"""``attnres-pretrain`` takes Megatron-LM's flags with Megatron-LM's meanings and defaults.

The expected defaults come from this file's own table of Megatron-LM core_v0.16 defaults and, when
``MEGATRON_LM_DIR`` names a Megatron-LM checkout, from its ``megatron/training/arguments.py`` (and
the config dataclasses its parser is generated from), read as source without importing it. The
Megatron-LM example's command line parses unchanged; SwiGLU, biases, untied output weights and GQA
change the model as in Megatron-LM (parameter names and shapes, counted here); Megatron-LM flags
without a counterpart are refused with the flag to use instead.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attnres_megatron.training.arguments import build_parser, validate_args
from attnres_megatron.training.megatron_lm_flags import MEGATRON_LM_FLAGS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")
needs_megatron_lm = pytest.mark.skipif(
    not (MEGATRON_LM_DIR and Path(MEGATRON_LM_DIR, "megatron/training/arguments.py").is_file()),
    reason="set MEGATRON_LM_DIR to a Megatron-LM core_r0.16 checkout",
)
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")

# Megatron-LM core_v0.16's parser defaults of the flags attnres-pretrain shares with it.
MEGATRON_LM_DEFAULTS = {
    # model
    "--ffn-hidden-size": None,
    "--kv-channels": None,
    "--group-query-attention": False,
    "--num-query-groups": 1,
    "--max-position-embeddings": None,
    "--position-embedding-type": "learned_absolute",
    "--normalization": "LayerNorm",
    "--norm-epsilon": 1e-5,
    "--swiglu": False,
    "--disable-bias-linear": True,  # dest add_bias_linear
    "--add-qkv-bias": False,
    "--qk-layernorm": False,
    "--untie-embeddings-and-output-weights": False,
    "--init-method-std": 0.02,
    "--hidden-dropout": 0.1,
    "--attention-dropout": 0.1,
    "--attention-backend": "auto",
    "--use-cpu-initialization": None,
    "--use-mcore-models": False,
    # optimizer and schedule
    "--optimizer": "adam",
    "--weight-decay": 0.01,
    "--clip-grad": 1.0,
    "--adam-beta1": 0.9,
    "--adam-beta2": 0.999,
    "--adam-eps": 1e-8,
    "--min-lr": 0.0,
    "--lr-decay-style": "linear",
    "--lr-decay-iters": None,
    "--lr-warmup-iters": 0,
    "--lr-warmup-fraction": None,
    "--lr-warmup-init": 0.0,
    "--lr-wsd-decay-iters": None,
    "--lr-wsd-decay-style": "exponential",
    "--seed": 1234,
    "--global-batch-size": None,
    "--bf16": False,
    "--use-distributed-optimizer": False,
    # data and evaluation
    "--data-path": None,
    "--mock-data": False,
    "--eval-iters": 100,
    "--no-create-attention-mask-in-dataloader": True,
    # recompute and fusions
    "--recompute-granularity": None,
    "--recompute-method": None,
    "--recompute-num-layers": None,
    "--recompute-modules": None,
    "--no-masked-softmax-fusion": True,
    "--no-bias-gelu-fusion": True,
    "--no-bias-swiglu-fusion": True,
    "--no-bias-dropout-fusion": True,
    "--no-rope-fusion": True,
    "--no-gradient-accumulation-fusion": True,
    "--no-persist-layer-norm": False,
    # parallelism
    "--tensor-model-parallel-size": 1,
    "--pipeline-model-parallel-size": 1,
    "--num-virtual-stages-per-pipeline-rank": None,
    "--decoder-first-pipeline-num-layers": None,
    "--decoder-last-pipeline-num-layers": None,
    "--pipeline-model-parallel-layout": None,
    "--sequence-parallel": False,
    "--context-parallel-size": 1,
    "--expert-model-parallel-size": 1,
    "--expert-tensor-parallel-size": None,
    "--distributed-backend": "nccl",
    "--distributed-timeout-minutes": 10,
    # mixture of experts
    "--num-experts": None,
    "--moe-router-topk": 2,
    "--moe-ffn-hidden-size": None,
    "--moe-shared-expert-intermediate-size": None,
    "--moe-router-score-function": "softmax",
    "--moe-router-enable-expert-bias": False,
    "--moe-router-bias-update-rate": 1e-3,
    "--moe-router-topk-scaling-factor": None,
    "--moe-router-load-balancing-type": "aux_loss",
    "--moe-aux-loss-coeff": 0.0,
    "--moe-token-dispatcher-type": "allgather",
    "--moe-grouped-gemm": False,
    # checkpoints and logging
    "--save": None,
    "--save-interval": None,
    "--load": None,
    "--no-load-optim": None,
    "--exit-interval": None,
    "--ckpt-format": "torch_dist",
    "--exit-signal-handler": False,
    "--tensorboard-dir": None,
    "--log-interval": 100,
}

# attnres-pretrain's own defaults where Megatron-LM requires a value (or has none), each
# documented in the flag's help: flag -> (attnres-pretrain's default, Megatron-LM's default).
DOCUMENTED_DIFFERENCES = {
    "--num-layers": (4, None),
    "--hidden-size": (128, None),
    "--num-attention-heads": (4, None),
    "--seq-length": (128, None),
    "--micro-batch-size": (4, None),
    "--train-iters": (100, None),
    "--lr": (3e-3, None),
    "--transformer-impl": ("auto", "transformer_engine"),  # auto: TE when it imports, else local
    "--split": ("969,30,1", None),  # Megatron-LM turns None into 969,30,1 when --data-path is given
}

# The tokenizer options' own default (the built-in corpus is byte-level; see training/tokenizers.py).
TOKENIZER_DIFFERENCES = {"--tokenizer-type": ("ByteLevelTokenizer", None)}

# attnres-pretrain's own flags (not Megatron-LM's).
ATTNRES_ONLY = {
    "--model",
    "--attention-residuals",
    "--attn-res-block-size",
    "--attn-res-layers-per-block",
    "--attn-res-num-blocks",
    "--attn-res-eps",
    "--attn-res-impl",
    "--attn-res-weight-decay",
    "--corpus-bytes",
    "--skip-nonfinite-steps",
    "--max-skipped-nonfinite-steps",
    "--overwrite-checkpoints",
    "--no-verify-checkpoint",
    "--no-progress-bar",
    "--verbose-warnings",
    "--device",
    "--summary-json",
}


def actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Flag -> argparse action of every option."""
    return {flag: action for action in parser._actions for flag in action.option_strings}


def refusal(argv: list[str], capsys) -> str:
    """The error ``attnres-pretrain``'s parser exits with for ``argv`` (exit status 2)."""
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------------------ defaults


def test_shared_defaults_are_megatron_lms():
    ours = actions(build_parser())
    missing = sorted(set(MEGATRON_LM_DEFAULTS) - set(ours))
    assert not missing, f"Megatron-LM flags missing from attnres-pretrain: {missing}"
    wrong = {
        flag: (ours[flag].default, expected)
        for flag, expected in MEGATRON_LM_DEFAULTS.items()
        if ours[flag].default != expected or type(ours[flag].default) is not type(expected)
    }
    assert not wrong, f"attnres-pretrain default != Megatron-LM's: {wrong}"


def test_documented_differences_say_so_in_the_help():
    ours = actions(build_parser())
    for flag, (default, _megatron_lm) in DOCUMENTED_DIFFERENCES.items():
        assert ours[flag].default == default, flag
        assert "Megatron-LM" in ours[flag].help, f"{flag}: the help should explain the default"


def test_every_flag_has_help_and_shows_its_default():
    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings} has no help text"
        assert "%(default)" in formatter._get_help_string(action), action.option_strings
    assert "(default: 0.999)" in parser.format_help()  # --adam-beta2


def test_megatron_lm_training_starts_without_warmup_flags():
    """``--train-iters 10`` alone was refused while the warmup default was 10 iterations."""
    args = build_parser().parse_args(["--train-iters", "10"])
    validate_args(args, world_size=1)
    assert (args.lr_warmup_iters, args.lr_decay_style, args.min_lr) == (0, "linear", 0.0)


def _literal(node: ast.AST):
    """A literal's value, else its source text (enum members, expressions)."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)


def _dataclasses(root: Path) -> dict[str, ast.ClassDef]:
    """Class name -> definition, for every class in a Megatron source file using dataclasses."""
    index: dict[str, ast.ClassDef] = {}
    for path in sorted((root / "megatron").rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if "@dataclass" in text:
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ClassDef):
                    index.setdefault(node.name, node)
    return index


def _field_default(value: ast.AST) -> tuple[bool, object, dict]:
    """(has a default, the default, argparse_meta) of a dataclass field's right-hand side."""
    if not (isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[-1] == "field"):
        return True, _literal(value), {}
    keywords = {k.arg: k.value for k in value.keywords}
    if "init" in keywords and _literal(keywords["init"]) is False:
        return False, None, {}
    meta: dict = {}
    metadata = keywords.get("metadata")
    if isinstance(metadata, ast.Dict):
        for key, val in zip(metadata.keys, metadata.values):
            if isinstance(key, ast.Constant) and key.value == "argparse_meta" and isinstance(val, ast.Dict):
                meta = {k.value: v for k, v in zip(val.keys, val.values) if isinstance(k, ast.Constant)}
    if "default" in keywords:
        return True, _literal(keywords["default"]), meta
    if "default_factory" in keywords:
        return True, {"list": [], "dict": {}}.get(ast.unparse(keywords["default_factory"])), meta
    return False, None, meta


def _dataclass_flags(cls: ast.ClassDef, index: dict[str, ast.ClassDef], exclude: set) -> dict:
    """Flag -> default of the options Megatron-LM's ``ArgumentGroupFactory`` makes of ``cls``."""
    flags: dict = {}
    for base in cls.bases:
        name = ast.unparse(base).split(".")[-1]
        if name in index:
            flags.update(_dataclass_flags(index[name], index, exclude))
    for stmt in cls.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value):
            continue
        name, annotation = stmt.target.id, ast.unparse(stmt.annotation).replace(" ", "")
        has_default, default, meta = _field_default(stmt.value)
        if name in exclude or not has_default or "ClassVar" in annotation:
            continue
        dashed = name.replace("_", "-")
        names = [f"--{dashed}"]
        if annotation in ("bool", "Optional[bool]", "bool|None") and default is not False:
            names = [f"--no-{dashed}", f"--disable-{dashed}"]  # store_false switches
        names = _literal(meta["arg_names"]) if "arg_names" in meta else names
        default = _literal(meta["default"]) if "default" in meta else default
        flags.update(dict.fromkeys(names, default))
    return flags


def megatron_lm_source_defaults(root: Path) -> dict:
    """Flag -> default of Megatron-LM's parser, read from ``megatron/training/arguments.py``: its
    ``add_argument`` calls and the dataclasses it turns into options (``ArgumentGroupFactory``)."""
    tree = ast.parse((root / "megatron/training/arguments.py").read_text(encoding="utf-8"))
    index = _dataclasses(root)
    defaults: dict = {}
    for function in (node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)):
        lists = {
            target.id: _literal(node.value)
            for node in ast.walk(function)
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.List)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in (n for n in ast.walk(function) if isinstance(n, ast.Call)):
            func = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if func == "ArgumentGroupFactory" and node.args:
                exclude = keywords.get("exclude")
                if isinstance(exclude, ast.Name):
                    exclude = lists.get(exclude.id, [])
                elif exclude is not None:
                    exclude = _literal(exclude)
                cls = index.get(ast.unparse(node.args[0]).split(".")[-1])
                if cls is not None:
                    defaults.update(_dataclass_flags(cls, index, set(exclude or ())))
            elif func.endswith(".add_argument"):
                flags = [
                    a.value
                    for a in node.args
                    if isinstance(a, ast.Constant) and str(a.value).startswith("--")
                ]
                action = _literal(keywords["action"]) if "action" in keywords else None
                implied = {"store_true": False, "store_false": True}.get(action)
                default = _literal(keywords["default"]) if "default" in keywords else implied
                defaults.update(dict.fromkeys(flags, default))
    return defaults


def _same(ours, theirs) -> bool:
    """Equal defaults (an enum member's source text matches its value's name)."""
    if isinstance(theirs, str) and "." in theirs and not isinstance(ours, float):
        theirs = theirs.rsplit(".", 1)[-1]
    return ours == theirs


@needs_megatron_lm
def test_defaults_match_megatron_lms_own_source():
    source = megatron_lm_source_defaults(Path(MEGATRON_LM_DIR))
    assert len(source) > 500 and source["--adam-beta2"] == 0.999  # the reader found the parser
    ours = actions(build_parser())
    differences = {**DOCUMENTED_DIFFERENCES, **TOKENIZER_DIFFERENCES}
    shared = sorted(set(ours) & set(source) - set(differences) - {"-h", "--help"})
    wrong = {
        flag: (ours[flag].default, source[flag])
        for flag in shared
        if not _same(ours[flag].default, source[flag])
    }
    assert not wrong, f"attnres-pretrain default != Megatron-LM's: {wrong}"
    assert set(MEGATRON_LM_DEFAULTS) <= set(source), "the table names flags Megatron-LM does not have"
    table = {flag: (value, source[flag]) for flag, value in MEGATRON_LM_DEFAULTS.items()}
    assert all(_same(ours, theirs) for ours, theirs in table.values()), table
    for flag, (_ours, theirs) in differences.items():
        assert flag in source and _same(theirs, source[flag]), (flag, source.get(flag))
    unknown = sorted(set(ours) - set(source) - ATTNRES_ONLY - {"-h", "--help", "--tokenizer"})
    assert not unknown, f"attnres-pretrain flags that Megatron-LM does not have: {unknown}"
    assert set(MEGATRON_LM_FLAGS) <= set(source), sorted(set(MEGATRON_LM_FLAGS) - set(source))


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "argv, hint",
    [
        (
            ["--fp16"],
            "--fp16 (a Megatron-LM flag): not supported (attnres-pretrain has no fp16 loss scaling); "
            "use --bf16.",
        ),
        (["--train-samples", "1000"], "use --train-iters"),
        (["--lr-warmup-samples", "10"], "use --lr-warmup-iters or --lr-warmup-fraction"),
        (["--num-layers-per-virtual-pipeline-stage", "2"], "use --num-virtual-stages-per-pipeline-rank"),
        (["--data-cache-path", "/tmp/x"], "$ATTNRES_CACHE_DIR"),
        (["--num-workers", "2"], "--num-workers (a Megatron-LM flag): not supported"),
        (["--async-save"], "--async-save (a Megatron-LM flag): not supported"),
        (["--use-legacy-models"], "Megatron-Core models only"),
        (["--rotary-base=500000"], "--rotary-base (a Megatron-LM flag): not supported: RoPE"),
        (["--recompute-activations"], "use --recompute-granularity selective"),
    ],
)
def test_megatron_lm_flags_without_counterpart_name_the_equivalent(argv, hint, capsys):
    error = refusal(argv, capsys)
    assert f"error: unrecognized arguments: {' '.join(argv)}" in error
    assert hint in error


def test_unknown_flags_fail_with_argparses_error_only(capsys):
    error = refusal(["--no-such-flag", "3"], capsys)
    assert "error: unrecognized arguments: --no-such-flag 3" in error
    assert "Megatron-LM flag" not in error


def test_several_refused_flags_each_get_their_hint(capsys):
    error = refusal(["--fp16", "--num-workers", "2", "--fp16"], capsys)
    assert error.count("--fp16 (a Megatron-LM flag)") == 1 and "--num-workers (a Megatron-LM flag)" in error


def test_the_table_lists_no_flag_attnres_pretrain_takes():
    ours = actions(build_parser())
    assert not set(MEGATRON_LM_FLAGS) & set(ours)
    for flag, hint in MEGATRON_LM_FLAGS.items():
        assert flag.startswith("--") and hint.endswith(".")
        assert re.search(r"\buse\b|not supported|not needed|drop it", hint), flag


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-query-groups", "2"], "--num-query-groups needs --group-query-attention"),
        (["--attention-backend", "flash"], "invalid choice: 'flash'"),
        (["--ckpt-format", "torch"], "invalid choice: 'torch'"),
        (["--distributed-timeout-minutes", "0"], "must be a positive number of minutes, got 0"),
    ],
)
def test_accepted_flags_refuse_what_they_cannot_do(argv, message, capsys):
    assert message in refusal(argv, capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        ("--lr-warmup-iters 20 --train-iters 10", "--lr-warmup-iters 20 must be in [0, 10)"),
        ("--lr-warmup-iters 2 --lr-warmup-fraction 0.1", "pass only one"),
        ("--lr-warmup-fraction 1.5", "--lr-warmup-fraction must be in [0, 1)"),
        ("--lr-decay-iters 0", "--lr-decay-iters must be >= 1"),
        (
            "--max-position-embeddings 64 --seq-length 128",
            "--max-position-embeddings 64 must be >= --seq-length",
        ),
        ("--group-query-attention --num-query-groups 3", "--num-query-groups 3 must divide"),
        ("--swiglu --hidden-size 16 --num-attention-heads 2", "pass --ffn-hidden-size"),
        ("--mock-data --data-path /data/x", "--mock-data"),
        ("--min-lr 1 --lr 0.1", "--min-lr 1.0 must be in [0, --lr 0.1]"),
    ],
)
def test_bad_megatron_lm_values_name_the_flag(argv, message, capsys):
    args = build_parser().parse_args(argv.split())
    with pytest.raises(SystemExit) as stopped:
        validate_args(args, world_size=1)
    assert message in str(stopped.value)


def test_sequence_parallel_layernorm_needs_transformer_engine():
    args = build_parser().parse_args(
        "--tensor-model-parallel-size 2 --sequence-parallel --transformer-impl local".split()
    )
    with pytest.raises(SystemExit, match="needs --normalization RMSNorm"):
        validate_args(args, world_size=2)


def test_lr_flags_reach_megatrons_scheduler():
    from attnres_megatron.training.arguments import lr_decay_iters, lr_warmup_iters, lr_wsd_decay_iters

    args = build_parser().parse_args("--train-iters 100 --lr-decay-iters 80 --lr-warmup-fraction 0.1".split())
    assert (lr_decay_iters(args), lr_warmup_iters(args), lr_wsd_decay_iters(args)) == (80, 8.0, 8)
    args = build_parser().parse_args("--train-iters 50".split())
    assert (lr_decay_iters(args), lr_warmup_iters(args)) == (50, 0)


# ------------------------------------------------------------------------------ example command lines


def example_command(tmp_path: Path, **env: str) -> list[str]:
    """The Megatron-LM arguments examples/megatron_lm_torchrun.sh prints with ``DRY_RUN=1``."""
    checkout = tmp_path / "Megatron-LM"
    checkout.mkdir(exist_ok=True)
    (checkout / "pretrain_gpt.py").write_text("# stand-in for Megatron-LM's pretrain_gpt.py\n")
    variables = {**os.environ, "DRY_RUN": "1", "MEGATRON_LM_DIR": str(checkout), "NPROC": "8", **env}
    done = subprocess.run(
        ["bash", str(EXAMPLES / "megatron_lm_torchrun.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env=variables,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    words = shlex.split(done.stdout.strip().splitlines()[-1])
    return words[words.index("attnres_megatron.megatron_lm.pretrain_gpt_attnres") + 1 :]


def without_undefined_tokenizer_flags(argv: list[str]) -> list[str]:
    """``argv`` less the Megatron-LM tokenizer flags while attnres-pretrain does not define them yet
    (they come with its tokenizer options); unchanged once it does."""
    known = actions(build_parser())
    kept, skip = [], False
    for word in argv:
        if word in ("--tokenizer-type", "--vocab-size", "--tokenizer-model") and word not in known:
            skip = True
            continue
        if skip and not word.startswith("--"):
            continue
        skip = False
        kept.append(word)
    return kept


@needs_bash
@pytest.mark.parametrize("data", ["mock", "files"])
def test_the_megatron_lm_example_command_line_parses_unchanged(data, tmp_path):
    env = {"DATA_PATH": "0.7 /data/a_text_document 0.3 /data/b_text_document"} if data == "files" else {}
    argv = example_command(tmp_path, **env)
    args = build_parser().parse_args(without_undefined_tokenizer_flags(argv))
    assert (args.swiglu, args.add_bias_linear, args.untie_embeddings_and_output_weights) == (
        True,
        False,
        True,
    )
    assert (args.normalization, args.position_embedding_type) == ("RMSNorm", "rope")
    assert (args.max_position_embeddings, args.seq_length, args.hidden_dropout) == (2048, 2048, 0.0)
    assert (args.eval_interval, args.eval_iters, args.ckpt_format) == (500, 10, "torch_dist")
    assert (args.lr_warmup_iters, args.lr_decay_style, args.adam_beta2) == (200, "cosine", 0.95)
    assert args.mock_data is (data == "mock")
    assert args.data_path == (None if data == "mock" else env["DATA_PATH"].split())


@needs_megatron_lm
def test_megatron_lms_gpt3_example_flags_are_accepted_or_explained():
    """Every flag of Megatron-LM's own GPT-3 175B script is attnres-pretrain's, or refused with a hint."""
    script = Path(MEGATRON_LM_DIR, "examples/gpt3/train_gpt3_175b_distributed.sh").read_text()
    start = script.index("GPT_MODEL_ARGS=(")
    body = script[start : script.index("torchrun", start)]
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", body))
    tokenizer = {"--vocab-file", "--merge-file"}  # the tokenizer options' business
    ours = actions(build_parser())
    unexplained = sorted(flags - set(ours) - set(MEGATRON_LM_FLAGS) - tokenizer)
    assert not unexplained, f"Megatron-LM flags neither accepted nor refused with a hint: {unexplained}"
    assert {"--init-method-std", "--lr-warmup-fraction", "--lr-decay-iters", "--eval-interval"} <= set(ours)
    assert {"--fp16", "--rampup-batch-size"} <= set(MEGATRON_LM_FLAGS)


# ------------------------------------------------------------------------------ training with the defaults


def test_train_iters_5_with_every_other_default_trains(tmp_path):
    summary = tmp_path / "summary.json"
    tiny = "--num-layers 2 --hidden-size 32 --num-attention-heads 2 --seq-length 32 --micro-batch-size 2"
    done = subprocess.run(
        [sys.executable, "-m", "attnres_megatron.training.pretrain", "--device", "cpu", *tiny.split()]
        + ["--train-iters", "5", "--corpus-bytes", "300000", "--summary-json", str(summary)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert len(result["losses"]) == 5 and all(0 < loss < 10 for loss in result["losses"])
    # Megatron-LM's defaults: tied GeLU model with biases, LayerNorm and learned positions.
    hidden, vocab, seq, ffn = 32, 256, 32, 4 * 32
    layer = 4 * hidden + (hidden * 3 * hidden + 3 * hidden) + (hidden * hidden + hidden)
    layer += (hidden * ffn + ffn) + (ffn * hidden + hidden)
    assert f"{vocab * hidden + seq * hidden + 2 * layer + 2 * hidden:,} parameters" in done.stdout


# ------------------------------------------------------------------------------ the model the flags build

TINY = "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 16".split()
MODEL_CASES = {
    "megatron_lm_defaults": [],
    "swiglu": ["--swiglu"],
    "no_bias": ["--disable-bias-linear"],
    "untied": ["--untie-embeddings-and-output-weights"],
    "gqa": ["--group-query-attention", "--num-query-groups", "2"],
    "llama_like": "--swiglu --disable-bias-linear --untie-embeddings-and-output-weights "
    "--normalization RMSNorm --position-embedding-type rope --group-query-attention "
    "--num-query-groups 2".split(),
    "qkv_bias_only": ["--disable-bias-linear", "--add-qkv-bias"],
}


def expected_parameters(flags: list[str], layers: int = 2, hidden: int = 64, heads: int = 4) -> dict:
    """Parameter name -> shape of Megatron's GPT (local spec) for ``flags``, worked out here."""
    swiglu, bias = "--swiglu" in flags, "--disable-bias-linear" not in flags
    qkv_bias = bias or "--add-qkv-bias" in flags
    groups = (
        int(flags[flags.index("--num-query-groups") + 1]) if "--group-query-attention" in flags else heads
    )
    ffn = int(8 * hidden / 3 / 64) * 64 if swiglu else 4 * hidden  # Megatron-LM's default widths
    head = hidden // heads
    norm = ["weight"] if "RMSNorm" in flags else ["weight", "bias"]
    shapes = {"embedding.word_embeddings.weight": (256, hidden)}
    if "rope" not in flags:
        shapes["embedding.position_embeddings.weight"] = (16, hidden)
    linear = {
        "self_attention.linear_proj": ((hidden, heads * head), bias),
        "self_attention.linear_qkv": (((heads + 2 * groups) * head, hidden), qkv_bias),
        "mlp.linear_fc1": (((2 if swiglu else 1) * ffn, hidden), bias),
        "mlp.linear_fc2": ((hidden, ffn), bias),
    }
    for i in range(layers):
        prefix = f"decoder.layers.{i}"
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            shapes.update({f"{prefix}.{name}.{p}": (hidden,) for p in norm})
        for name, (shape, has_bias) in linear.items():
            shapes[f"{prefix}.{name}.weight"] = shape
            if has_bias:
                shapes[f"{prefix}.{name}.bias"] = (shape[0],)
    shapes.update({f"decoder.final_layernorm.{p}": (hidden,) for p in norm})
    if "--untie-embeddings-and-output-weights" in flags:
        shapes["output_layer.weight"] = (256, hidden)
    return shapes


def attnres_pretrain_model(argv: list[str]) -> torch.nn.Module:
    """The (single-stage) GPT ``attnres-pretrain`` builds for ``argv``."""
    from attnres_megatron.models.builder import build_gpt_model
    from attnres_megatron.training.model_setup import config_from_args, gpt_model_kwargs

    args = build_parser().parse_args([*argv, "--transformer-impl", "local"])
    validate_args(args, world_size=1)
    config = config_from_args(args, "cpu")
    return build_gpt_model(config, vocab_size=256, transformer_impl="local", **gpt_model_kwargs(args))


def shapes_of(model: torch.nn.Module) -> dict:
    """Parameter name -> shape."""
    return {name: tuple(param.shape) for name, param in model.named_parameters()}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_model_flags_build_megatron_lms_model(case, single_rank, reseed):
    flags = MODEL_CASES[case]
    reseed()
    ours = attnres_pretrain_model([*TINY, *flags])
    expected = expected_parameters(flags)
    assert shapes_of(ours) == expected
    assert sum(p.numel() for p in ours.parameters()) == sum(torch.Size(s).numel() for s in expected.values())
    config = ours.config
    assert (config.gated_linear_unit, config.activation_func) == (
        ("--swiglu" in flags, F.silu) if "--swiglu" in flags else (False, F.gelu)
    )
    assert ours.share_embeddings_and_output_weights is ("--untie-embeddings-and-output-weights" not in flags)
    if "--add-qkv-bias" in flags:
        return  # not among the Megatron-LM flags of the test parser below
    # The same command line through the plugin's Megatron-LM model provider (Megatron-LM's mapping).
    from megatron_lm_worker import megatron_lm_args

    from attnres_megatron import megatron_lm

    ffn = str(expected["decoder.layers.0.mlp.linear_fc2.weight"][1])  # Megatron-LM's validate_args fills it
    extra = ["--transformer-impl", "local", "--use-cpu-initialization", "--no-persist-layer-norm"]
    extra += ["--no-rope-fusion", "--ffn-hidden-size", ffn]  # validate_args: no fusion without TE
    reseed()
    theirs = megatron_lm.model_provider(args=megatron_lm_args([*TINY, *flags, *extra]))
    assert shapes_of(theirs) == shapes_of(ours)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))

"""Megatron-LM launch integration: the plugin's flags in Megatron-LM's parser, the model provider
(same model as ``attnres-pretrain`` per pipeline stage and virtual chunk; stock model when AttnRes
is off), the no-patch driver, and ``patches/`` (well-formed, version-checked, applies and reverts).

A Megatron-LM core_r0.16 checkout in ``$MEGATRON_LM_DIR`` adds the checks against the real
``pretrain_gpt.py`` and Megatron-LM's own argument parser and config mapping."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from megatron_lm_worker import (
    GPT_AS_ATTNRES_PRETRAIN,
    KIMI_TINY_AS_MEGATRON_LM,
    SCENARIOS,
    TINY_GPT,
    attnres_pretrain_chunks,
    megatron_lm_args,
    megatron_lm_chunks,
    megatron_lm_parser,
)

from attnres_megatron import megatron_lm
from attnres_megatron.models.specs import transformer_engine_available
from attnres_megatron.training.arguments import build_parser

ROOT = Path(__file__).resolve().parent.parent
PATCHES = ROOT / "patches"
PATCH = PATCHES / "megatron_lm_core_r0.16_pretrain_gpt.patch"
APPLY = PATCHES / "apply.sh"
MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")
needs_checkout = pytest.mark.skipif(
    not (MEGATRON_LM_DIR and Path(MEGATRON_LM_DIR, "pretrain_gpt.py").is_file()),
    reason="set MEGATRON_LM_DIR to a Megatron-LM core_r0.16 checkout",
)
needs_bash_git = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("git") is None, reason="needs bash and git"
)
PLUGIN_FLAGS = {
    "--attention-residuals",
    "--attn-res-block-size",
    "--attn-res-layers-per-block",
    "--attn-res-num-blocks",
    "--attn-res-eps",
    "--attn-res-impl",
    "--model",
}


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def names_and_shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(param.shape)) for name, param in model.named_parameters()]


def parse_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        megatron_lm_args(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------------- arguments


def test_flags_are_attnres_pretrains_and_none_of_megatron_lms():
    plain = argparse.ArgumentParser(allow_abbrev=False)
    added = set(option_actions(megatron_lm.extra_args_provider(plain))) - {"-h", "--help"}
    assert added == PLUGIN_FLAGS | {"--device"}
    ours, theirs = option_actions(plain), option_actions(build_parser())
    for flag in PLUGIN_FLAGS | {"--device"}:
        mine, cli = ours[flag], theirs[flag]
        assert (mine.dest, mine.default, mine.choices, mine.type) == (
            cli.dest,
            cli.default,
            cli.choices,
            cli.type,
        )
    # Megatron-LM's own flags (mirrored by the test parser) are not defined a second time.
    megatron_flags = set(option_actions(megatron_lm_parser())) - PLUGIN_FLAGS
    assert {
        "--num-layers",
        "--num-experts",
        "--multi-latent-attention",
        "--transformer-impl",
    } <= megatron_flags


def test_every_plugin_flag_is_accepted():
    args = megatron_lm_args(
        [*TINY_GPT, "--attention-residuals", "block", "--attn-res-layers-per-block", "2"]
        + "--attn-res-eps 1e-5 --attn-res-impl reference --model gpt".split()
    )
    assert (args.attention_residuals, args.attn_res_layers_per_block) == ("block", 2)
    assert (args.attn_res_eps, args.attn_res_impl, args.model) == (1e-5, "reference", "gpt")
    for option, sublayers in (("--attn-res-block-size 3", 3), ("--attn-res-num-blocks 4", 2)):
        argv = [*TINY_GPT, *GPT_AS_ATTNRES_PRETRAIN, "--attention-residuals", "block", *option.split()]
        args = megatron_lm_args(argv)
        assert megatron_lm.config_from_megatron_args(args).attn_res_sublayers_per_block == sublayers
    args = megatron_lm_args([*KIMI_TINY_AS_MEGATRON_LM, "--attention-residuals", "full"])
    assert megatron_lm.config_from_megatron_args(args).attn_res_sublayers_per_block == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            "--attention-residuals block --attn-res-block-size 0",
            "--attn-res-block-size must be a positive integer",
        ),
        ("--attention-residuals block --attn-res-block-size 2 --attn-res-num-blocks 2", "not allowed with"),
        ("--attention-residuals block", "needs exactly one of --attn-res-block-size"),
        ("--attn-res-num-blocks 4", "is set but --attention-residuals is 'none'"),
        ("--attention-residuals full --attn-res-num-blocks 4", "conflicts with --attention-residuals full"),
        ("--attention-residuals block --attn-res-num-blocks 9", "exceeds the 8 sublayers"),
        ("--attention-residuals full --attn-res-eps 0", "--attn-res-eps must be > 0"),
        ("--attention-residuals full --attn-res-impl fast", "invalid choice"),
        ("--attention-residuals full --spec my.spec", "--spec is not supported"),
        ("--attention-residuals full --rotary-base 500000", "--rotary-base 500000 is not supported"),
        ("--attention-residuals full --transformer-impl inference_optimized", "not supported with AttnRes"),
        ("--model kimi-linear-9b", "invalid choice"),
        ("--recompute-modules attn_res core_attn", "--recompute-modules attn_res is not available"),
    ],
)
def test_bad_values_are_refused_when_parsing(argv, message, capsys):
    assert message in parse_error([*TINY_GPT, *argv.split()], capsys)


@pytest.mark.parametrize(
    "change, message",
    [
        (("--num-layers", "4"), "pass --num-layers 5"),
        (("--num-experts", "4"), "pass --num-experts 8"),
        (("--position-embedding-type", "rope"), "pass --position-embedding-type none"),
        (("--untie-embeddings-and-output-weights", None), "pass --untie-embeddings-and-output-weights"),
        (("--attn-res-num-blocks", "2"), "needs --attention-residuals block"),
    ],
)
def test_kimi_preset_refuses_megatron_flags_that_contradict_it(change, message, capsys):
    flag, value = change
    argv = list(KIMI_TINY_AS_MEGATRON_LM)
    if flag in argv:
        at = argv.index(flag)
        argv[at : at + (2 if value is not None else 1)] = [flag, value] if value is not None else []
    else:
        argv += [flag, value]
    assert message in parse_error(argv, capsys)


def test_chained_providers_keep_megatron_lms_extra_arguments():
    def modelopt_like(parser):
        parser.add_argument("--other-plugin-flag", type=int, default=3)
        return parser

    parser = megatron_lm.chain_args_providers(megatron_lm.extra_args_provider, None, modelopt_like)(
        argparse.ArgumentParser(allow_abbrev=False)
    )
    args = parser.parse_args("--attention-residuals full --other-plugin-flag 5".split())
    assert (args.attention_residuals, args.other_plugin_flag) == ("full", 5)


# ------------------------------------------------------------------------- model provider


def test_defaults_leave_megatron_lm_unchanged(single_rank, reseed):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from attnres_megatron.megatron_lm.config import transformer_config_kwargs

    args = megatron_lm_args([*TINY_GPT, *GPT_AS_ATTNRES_PRETRAIN, "--no-persist-layer-norm"])
    assert not megatron_lm.attnres_requested(args)
    calls = []
    provider = megatron_lm.model_provider_or(lambda **kwargs: calls.append(kwargs) or "stock model")
    assert provider(pre_process=True, post_process=False, args=args) == "stock model"
    assert calls == [
        dict(pre_process=True, post_process=False, vp_stage=None, config=None, pg_collection=None)
    ]

    # The AttnRes provider itself, with AttnRes off, builds Megatron's stock GPT: same weights.
    config = megatron_lm.config_from_megatron_args(args)
    assert config.attention_residuals == "none" and not config.attn_res_enabled
    reseed()
    ours = megatron_lm.model_provider(args=args)
    fields = {
        f: v
        for f, v in transformer_config_kwargs(args).items()
        if f in TransformerConfig.__dataclass_fields__
    }
    reseed()
    stock = GPTModel(
        TransformerConfig(**fields),
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=256,
        max_sequence_length=16,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    assert names_and_shapes(ours) == names_and_shapes(stock)
    assert not any("attn_res" in name for name, _ in names_and_shapes(ours))
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), stock.parameters()))


CASES = {
    "gpt_block": [*TINY_GPT, "--attention-residuals", "block", "--attn-res-num-blocks", "3"],
    "gpt_full_moe": [*TINY_GPT, "--attention-residuals", "full"]
    + "--num-experts 4 --moe-router-topk 2 --moe-shared-expert-intermediate-size 32".split()
    + "--moe-router-score-function sigmoid --moe-router-enable-expert-bias".split()
    + "--moe-token-dispatcher-type alltoall".split(),
    "gpt_none": list(TINY_GPT),
    "kimi_tiny": [],
    "kimi_tiny_none": ["--attention-residuals", "none"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_provider_builds_what_attnres_pretrain_builds(case, single_rank, reseed):
    shared = CASES[case]
    kimi = case.startswith("kimi")
    megatron_only = KIMI_TINY_AS_MEGATRON_LM if kimi else GPT_AS_ATTNRES_PRETRAIN
    args = megatron_lm_args([*shared, *megatron_only])
    reseed()
    [ours] = (
        megatron_lm_chunks(args)
        if megatron_lm.attnres_requested(args)
        else [megatron_lm.model_provider(args=args)]
    )
    reseed()
    [theirs] = attnres_pretrain_chunks([*shared, *megatron_only])  # the same command line
    assert type(ours.config) is type(theirs.config)
    assert ours.config.attention_residuals == theirs.config.attention_residuals
    assert ours.config.attn_res_sublayers_per_block == theirs.config.attn_res_sublayers_per_block
    assert names_and_shapes(ours) == names_and_shapes(theirs)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    assert any("attn_res" in name for name, _ in names_and_shapes(ours)) == (not case.endswith("none"))


MLA_GPT = [*TINY_GPT, "--attention-residuals", "block", "--attn-res-block-size", "2"] + (
    "--multi-latent-attention --kv-lora-rank 16 --qk-head-dim 16 --qk-pos-emb-head-dim 8 --v-head-dim 16"
).split()


def test_multi_latent_attention_gpt_config():
    config = megatron_lm.config_from_megatron_args(megatron_lm_args([*MLA_GPT, *GPT_AS_ATTNRES_PRETRAIN]))
    assert isinstance(config, megatron_lm.AttnResMLATransformerConfig)
    assert (config.multi_latent_attention, config.kv_lora_rank, config.qk_pos_emb_head_dim) == (True, 16, 8)
    assert (config.attention_residuals, config.attn_res_sublayers_per_block) == ("block", 2)


@pytest.mark.skipif(
    not transformer_engine_available(), reason="MLA GPT layers need the Transformer Engine spec"
)
def test_multi_latent_attention_gpt_model(single_rank):
    args = megatron_lm_args([*MLA_GPT, *GPT_AS_ATTNRES_PRETRAIN, "--transformer-impl", "transformer_engine"])
    names = [name for name, _ in names_and_shapes(megatron_lm.model_provider(args=args))]
    assert (
        any("linear_kv_down_proj" in name for name in names)
        and "decoder.attn_res_final.pseudo_query" in names
    )


def test_provider_refuses_foreign_configs_and_process_groups(single_rank):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    args = megatron_lm_args([*TINY_GPT, *GPT_AS_ATTNRES_PRETRAIN, "--attention-residuals", "full"])
    stock_config = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4)
    with pytest.raises(TypeError, match="needs an AttnResTransformerConfig"):
        megatron_lm.model_provider(config=stock_config, args=args)
    other_tp = ProcessGroupCollection(tp=torch.distributed.new_group([0]))
    with pytest.raises(NotImplementedError, match="pg_collection.tp"):
        megatron_lm.model_provider(pg_collection=other_tp, args=args)


@pytest.fixture(scope="module")
def pipeline_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("megatron_lm")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={free_port()}",
        str(Path(__file__).with_name("megatron_lm_worker.py")),
        "--out",
        str(out),
        *SCENARIOS,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    found: dict = {}
    for path in out.glob("*.json"):
        data = json.loads(path.read_text())
        found.setdefault(data["scenario"], {})[data["rank"]] = data
    return found


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_pipeline_chunk_matches_attnres_pretrain(pipeline_results, scenario):
    ranks = pipeline_results[scenario]
    assert sorted(ranks) == [0, 1]
    chunks = [chunk for rank in (0, 1) for chunk in ranks[rank]["megatron_lm"]]
    for rank in (0, 1):
        assert ranks[rank]["megatron_lm"] == ranks[rank]["attnres_pretrain"]
        assert all(ranks[rank]["same_values"])
    # Megatron-LM's chunk order: rank 0 holds virtual chunks 0, 2..., rank 1 holds 1, 3...
    virtual = len(ranks[0]["megatron_lm"])
    order = [chunks[r * virtual + v] for v in range(virtual) for r in (0, 1)]
    names = [{name for name, _ in chunk} for chunk in order]
    assert ["embedding.word_embeddings.weight" in chunk for chunk in names] == [True] + [False] * (
        len(order) - 1
    )
    assert ["output_layer.weight" in chunk for chunk in names] == [False] * (len(order) - 1) + [True]
    layers = [
        len({name.split(".")[2] for name in chunk if name.startswith("decoder.layers.")}) for chunk in names
    ]
    assert layers == ([1, 1, 1, 1] if scenario.startswith("gpt") else [2, 3])


# ------------------------------------------------------------------------- schedule and driver


def test_pipeline_schedule_is_installed_into_megatron_lms_training_loop(monkeypatch):
    import types

    from megatron.core import pipeline_parallel

    from attnres_megatron.compat.megatron_lm_loop import install_attnres_schedule
    from attnres_megatron.pipeline import schedule

    if megatron_lm.megatron_lm_available():
        pytest.skip("uses a stand-in for megatron.training")
    training = types.ModuleType("megatron.training.training")
    training.get_forward_backward_func = pipeline_parallel.get_forward_backward_func
    package = types.ModuleType("megatron.training")
    package.training = training
    monkeypatch.setitem(sys.modules, "megatron.training", package)
    monkeypatch.setitem(sys.modules, "megatron.training.training", training)
    install_attnres_schedule()
    install_attnres_schedule()
    assert training.get_forward_backward_func is schedule.get_forward_backward_func
    training.get_forward_backward_func = lambda: None
    with pytest.raises(RuntimeError, match="is not Megatron-Core's"):
        install_attnres_schedule()


def test_driver_names_the_missing_megatron_lm_checkout():
    if megatron_lm.megatron_lm_available():
        pytest.skip("Megatron-LM is importable here")
    env = {key: value for key, value in os.environ.items() if key not in ("MEGATRON_LM_DIR", "PYTHONPATH")}
    done = subprocess.run(
        [sys.executable, "-m", "attnres_megatron.megatron_lm.pretrain_gpt_attnres", "--num-layers", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 1
    assert (
        "megatron.training" in done.stderr and "Megatron-LM core_r0.16 checkout on PYTHONPATH" in done.stderr
    )
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------- patches/


def run_apply(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(APPLY), *argv], capture_output=True, text=True, timeout=60)


def fake_checkout(root: Path, minor: int = 16, pretrain_gpt: str = "") -> Path:
    (root / "megatron" / "core").mkdir(parents=True)
    (root / "megatron" / "core" / "package_info.py").write_text(f"MAJOR = 0\nMINOR = {minor}\nPATCH = 1\n")
    (root / "pretrain_gpt.py").write_text(pretrain_gpt)
    return root


def preimage(patch: str) -> str:
    """A file the patch applies to: its context and removed lines at their line numbers, filler between."""
    lines: list[str] = []
    in_hunk = False
    for line in patch.splitlines():
        header = re.match(r"@@ -(\d+),\d+ \+\d+,\d+ @@", line)
        if header:
            in_hunk = True
            lines += [f"# filler line {n}" for n in range(len(lines) + 1, int(header.group(1)))]
        elif in_hunk and line[:1] in (" ", "-"):
            lines.append(line[1:])
        elif in_hunk and line[:1] != "+":
            in_hunk = False
    return "\n".join([*lines, "# end"]) + "\n"


@needs_bash_git
def test_patch_is_well_formed_and_only_uses_the_plugins_api(tmp_path):
    done = subprocess.run(
        ["git", "apply", "--stat", str(PATCH)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "pretrain_gpt.py" in done.stdout and "9 insertions(+), 2 deletions(-)" in done.stdout
    added = [
        line for line in PATCH.read_text().splitlines() if line.startswith("+") and not line.startswith("+++")
    ]
    used = set(re.findall(r"\battnres\.(\w+)", "\n".join(added)))
    assert used == {"model_provider_or", "chain_args_providers", "extra_args_provider", "prepare_pretrain"}
    assert all(hasattr(megatron_lm, name) for name in used)


@needs_bash_git
def test_apply_refuses_a_directory_that_is_not_megatron_lm(tmp_path):
    done = run_apply(str(tmp_path))
    assert done.returncode == 1 and "is not a Megatron-LM checkout" in done.stderr
    done = run_apply(str(tmp_path / "missing"))
    assert done.returncode == 1 and "is not a directory" in done.stderr
    done = run_apply()
    assert done.returncode == 1 and "usage: patches/apply.sh" in done.stdout + done.stderr


@needs_bash_git
def test_apply_refuses_another_megatron_lm_version(tmp_path):
    checkout = fake_checkout(tmp_path, minor=15, pretrain_gpt=preimage(PATCH.read_text()))
    before = (checkout / "pretrain_gpt.py").read_bytes()
    done = run_apply(str(checkout))
    assert done.returncode == 1
    assert "Megatron-LM 0.15" in done.stderr and "this patch is for core_r0.16" in done.stderr
    assert (checkout / "pretrain_gpt.py").read_bytes() == before


@needs_bash_git
def test_apply_check_and_revert(tmp_path):
    checkout = fake_checkout(tmp_path, pretrain_gpt=preimage(PATCH.read_text()))
    script = checkout / "pretrain_gpt.py"
    original = script.read_bytes()
    assert "applies cleanly" in run_apply("--check", str(checkout)).stdout
    assert "nothing to revert" in run_apply("--revert", str(checkout)).stdout
    done = run_apply(str(checkout))
    assert done.returncode == 0, done.stderr
    assert "attnres.model_provider_or(partial(model_provider, gpt_builder))" in script.read_text()
    assert "already applied" in run_apply(str(checkout)).stdout
    assert "is applied" in run_apply("--check", str(checkout)).stdout
    done = run_apply("--revert", str(checkout))
    assert done.returncode == 0, done.stderr
    assert script.read_bytes() == original


@needs_bash_git
def test_apply_refuses_a_modified_pretrain_gpt(tmp_path):
    text = preimage(PATCH.read_text()).replace("partial(model_provider, gpt_builder)", "my_provider")
    checkout = fake_checkout(tmp_path, pretrain_gpt=text)
    done = run_apply(str(checkout))
    assert done.returncode == 1 and "does not match the patch" in done.stderr
    assert (checkout / "pretrain_gpt.py").read_text() == text


@needs_checkout
@needs_bash_git
def test_patch_applies_to_the_real_pretrain_gpt_and_reverts(tmp_path):
    source = Path(MEGATRON_LM_DIR)
    checkout = fake_checkout(tmp_path, pretrain_gpt=(source / "pretrain_gpt.py").read_text())
    shutil.copy(source / "megatron" / "core" / "package_info.py", checkout / "megatron" / "core")
    original = (checkout / "pretrain_gpt.py").read_bytes()
    done = run_apply(str(checkout))
    assert done.returncode == 0, done.stderr
    compiled = subprocess.run([sys.executable, "-m", "py_compile", str(checkout / "pretrain_gpt.py")])
    assert compiled.returncode == 0
    assert run_apply("--revert", str(checkout)).returncode == 0
    assert (checkout / "pretrain_gpt.py").read_bytes() == original


REAL_MAPPING = """
import sys, warnings
warnings.filterwarnings("ignore")
sys.argv = ["pretrain_gpt.py", *sys.argv[1:]]
from megatron.training.arguments import parse_args, validate_args
from attnres_megatron import megatron_lm
from attnres_megatron.megatron_lm import config
args = parse_args(megatron_lm.extra_args_provider)
validate_args(args, {})
real = config.transformer_config_kwargs(args)
config.megatron_lm_available = lambda: False
own = config.transformer_config_kwargs(args)
diff = {k: (real.get(k), own.get(k)) for k in set(real) | set(own) if real.get(k, 0) != own.get(k, 0)}
assert not diff, diff
print("same", len(real))
"""
MEGATRON_RUN = "--max-position-embeddings 16 --micro-batch-size 1 --train-iters 2 --lr 1e-3 " + (
    "--tokenizer-type NullTokenizer"
)


@needs_checkout
@pytest.mark.parametrize("case", ["gpt_block", "gpt_full_moe", "kimi_tiny"])
def test_own_mapping_agrees_with_megatron_lms(case):
    megatron_only = KIMI_TINY_AS_MEGATRON_LM if case.startswith("kimi") else GPT_AS_ATTNRES_PRETRAIN
    argv = [*CASES[case], *megatron_only, *MEGATRON_RUN.split(), "--vocab-size", "256"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([MEGATRON_LM_DIR, str(ROOT)]), WORLD_SIZE="1", RANK="0")
    done = subprocess.run(
        [sys.executable, "-c", REAL_MAPPING, *argv], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "same" in done.stdout

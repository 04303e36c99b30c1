"""The model-family registry (``attnres_megatron/models/families.py``): every ``--model`` choice is an
entry, attnres-pretrain and the Megatron-LM provider build the same model through it, and
``--transformer-impl auto`` follows one rule for every family (Transformer Engine when it imports
and the device is CUDA, else local). Expected values are facts written out here, not read back
from the registry."""

from __future__ import annotations

import argparse

import pytest
import torch
from megatron_lm_worker import (
    GPT_AS_ATTNRES_PRETRAIN,
    KIMI_TINY_AS_MEGATRON_LM,
    TINY_GPT,
    VOCAB,
    attnres_pretrain_chunks,
    megatron_lm_args,
    megatron_lm_parser,
)

from attnres_megatron import megatron_lm
from attnres_megatron.megatron_lm import provider
from attnres_megatron.models import families, specs
from attnres_megatron.models.kimi.presets import PRESETS
from attnres_megatron.training.arguments import build_parser, parse_args, validate_parallel_args
from attnres_megatron.training.model_setup import config_from_args, setup_training

# --model: (layers, hidden size, default depth mixing, sublayers per block S of that default,
# name in the run's description line).
FACTS = {
    "gpt": (4, 128, "none", None, "AttnRes GPT"),
    "kimi-linear-48b-a3b": (27, 2304, "block", 6, "kimi-linear-48b-a3b"),
    "kimi-linear-1b-proxy": (16, 1024, "block", 6, "kimi-linear-1b-proxy"),
    "kimi-linear-tiny": (5, 64, "block", 4, "kimi-linear-tiny"),
}
GPT_BLOCK = [*TINY_GPT, "--attention-residuals", "block", "--attn-res-block-size", "3"]
BOTH = {"gpt": (GPT_BLOCK, GPT_AS_ATTNRES_PRETRAIN), "kimi-linear-tiny": ([], KIMI_TINY_AS_MEGATRON_LM)}


def model_choices(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """The choices of a parser's ``--model``."""
    [action] = [action for action in parser._actions if "--model" in action.option_strings]
    return tuple(action.choices)


def names_and_shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(param.shape)) for name, param in model.named_parameters()]


def test_every_model_choice_is_a_registry_entry():
    choices = model_choices(build_parser())
    assert set(choices) == {"gpt"} | set(PRESETS) == set(FACTS)
    assert model_choices(megatron_lm_parser()) == choices
    assert tuple(families.MODEL_FAMILIES) == choices
    for name in choices:
        assert families.model_family(name).name == name
    with pytest.raises(ValueError, match="unknown --model"):
        families.model_family("llama")


@pytest.mark.parametrize("name", sorted(FACTS))
def test_each_family_knows_its_shape_mode_and_name(name):
    layers, hidden, mode, sublayers, display = FACTS[name]
    family = families.model_family(name)
    args = parse_args(["--model", name, "--device", "cpu"])
    config = config_from_args(args, "cpu")
    assert (config.num_layers, config.hidden_size, config.attention_residuals) == (layers, hidden, mode)
    if sublayers is not None:
        assert config.attn_res_sublayers_per_block == sublayers
    # GPT records its default mode with the run's arguments; a preset keeps "its own" (None).
    assert args.attention_residuals == (mode if name == "gpt" else None)
    assert family.display_name == display
    assert family.default_attention_residuals == mode
    assert family.shape("num_layers", 999) == (999 if name == "gpt" else layers)


def expected_parameters(name: str) -> dict[str, tuple[int, ...]]:
    """Parameters every chunk of the test model must have (4-layer GPT 64/128 SwiGLU; Kimi tiny)."""
    hidden = 64
    facts = {
        "embedding.word_embeddings.weight": (VOCAB, hidden),
        "output_layer.weight": (VOCAB, hidden),  # untied in both
        "decoder.attn_res_final.pseudo_query": (hidden,),
    }
    if name == "gpt":
        for layer in range(4):
            facts[f"decoder.layers.{layer}.self_attention.linear_qkv.weight"] = (3 * hidden, hidden)
            facts[f"decoder.layers.{layer}.mlp.linear_fc1.weight"] = (2 * 128, hidden)  # SwiGLU
        return facts
    for layer in (3, 4):  # MLA at layers 4 and 5 (1-based)
        facts[f"decoder.layers.{layer}.self_attention.linear_kv_down_proj.weight"] = (16 + 8, hidden)
    for layer in (0, 1, 2):  # Kimi Delta Attention elsewhere
        facts[f"decoder.layers.{layer}.self_attention.q_conv1d.weight"] = (2 * 16, 1, 4)
    facts["decoder.layers.0.mlp.linear_fc1.weight"] = (2 * 128, hidden)  # the first layer is dense
    for layer in (1, 2, 3, 4):
        facts[f"decoder.layers.{layer}.mlp.router.weight"] = (8, hidden)
    return facts


@pytest.mark.parametrize("name", sorted(BOTH))
def test_provider_and_attnres_pretrain_build_the_same_model(name, single_rank, reseed):
    shared, flags = BOTH[name]
    reseed()
    ours = megatron_lm.model_provider(args=megatron_lm_args([*shared, *flags]))
    reseed()
    [theirs] = attnres_pretrain_chunks([*shared, *flags])
    params = names_and_shapes(ours)
    assert params == names_and_shapes(theirs)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    layers = FACTS[name][0]
    assert {n.split(".")[2] for n, _ in params if n.startswith("decoder.layers.")} == {
        str(i) for i in range(layers)
    }
    assert sum(n.endswith("pseudo_query") for n, _ in params) == 2 * layers + 1
    assert not any(n.endswith(".bias") or "position_embeddings" in n for n, _ in params)
    assert expected_parameters(name).items() <= dict(params).items()


class Built(Exception):
    """Raised by the fake builders with the layer-spec implementation they were given."""

    def __init__(self, impl: str) -> None:
        super().__init__(impl)
        self.impl = impl


def fake_builder(config, *args, transformer_impl: str, **kwargs):
    raise Built(transformer_impl)


@pytest.fixture
def machine(monkeypatch):
    """``machine(te, cuda)``: Transformer Engine importable or not, CUDA available or not."""
    monkeypatch.setattr(families, "build_gpt_model", fake_builder)
    monkeypatch.setattr(families, "build_kimi_linear_model", fake_builder)

    def set_up(te: bool, cuda: bool) -> None:
        monkeypatch.setattr(specs, "transformer_engine_available", lambda: te)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)

    return set_up


def built_impl(build) -> str:
    with pytest.raises(Built) as built:
        build()
    return built.value.impl


@pytest.mark.parametrize("te", [True, False], ids=["te", "no_te"])
@pytest.mark.parametrize("cuda", [True, False], ids=["cuda", "cpu"])
@pytest.mark.parametrize("name", sorted(BOTH))
def test_auto_follows_one_rule_for_every_family(name, cuda, te, machine, single_rank, monkeypatch):
    expected = "transformer_engine" if te and cuda else "local"
    device = "cuda" if cuda else "cpu"
    shared, flags = BOTH[name]
    cli = parse_args([*shared, *flags, "--transformer-impl", "auto", "--device", "cpu"])
    cli_config = config_from_args(cli, "cpu")
    mlm = megatron_lm_args([*shared, *flags])
    mlm_config = megatron_lm.config_from_megatron_args(mlm)
    # Megatron-LM's parser has no `auto`; set it on the namespace and skip the flag check to reach the rule.
    mlm.transformer_impl = "auto"
    monkeypatch.setattr(provider, "validate_attn_res_args", lambda args: None)
    machine(te, cuda)
    assert specs.resolve_transformer_impl("auto", device) == expected
    # attnres-pretrain and attnres-profile (same setup_training), then the Megatron-LM provider.
    assert built_impl(lambda: setup_training(cli, cli_config, VOCAB, device)) == expected
    assert built_impl(lambda: megatron_lm.model_provider(config=mlm_config, args=mlm)) == expected
    # An explicit choice is kept (TE refused when it does not import).
    if te:
        cli.transformer_impl = "transformer_engine"
        assert built_impl(lambda: setup_training(cli, cli_config, VOCAB, "cpu")) == "transformer_engine"
    cli.transformer_impl = "local"
    assert built_impl(lambda: setup_training(cli, cli_config, VOCAB, device)) == "local"


def test_the_profiler_builds_through_attnres_pretrains_setup():
    from attnres_megatron.profiling import runner
    from attnres_megatron.training import model_setup

    assert runner.setup_training is model_setup.setup_training
    assert runner.config_from_args is model_setup.config_from_args


@pytest.mark.parametrize("name", sorted(BOTH))
def test_validation_applies_the_same_rule(name, machine):
    machine(te=True, cuda=True)
    argv = ["--model", name, "--context-parallel-size", "2", "--transformer-impl", "auto"]
    validate_parallel_args(parse_args([*argv, "--device", "cuda"]), world_size=2)  # auto: TE on CUDA
    with pytest.raises(SystemExit, match="context-parallel-size > 1 needs Transformer Engine"):
        validate_parallel_args(parse_args([*argv, "--device", "cpu"]), world_size=2)  # auto: local on CPU

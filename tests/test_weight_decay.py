"""Weight decay of the AttnRes vectors (``--attn-res-weight-decay``) through Megatron's param groups."""

from __future__ import annotations

import pytest
import torch
from attnres_defaults import PRE_MEGATRON_DEFAULTS

from attnres_megatron.training.arguments import build_parser, validate_args
from attnres_megatron.training.model_setup import config_from_args, setup_training

GLOBAL_WD = 0.1
VOCAB = 64
TINY = [
    *PRE_MEGATRON_DEFAULTS,
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "4",
    "--ffn-hidden-size",
    "48",
    "--seq-length",
    "8",
    "--attention-residuals",
    "block",
    "--attn-res-block-size",
    "2",
    "--transformer-impl",
    "local",
    "--weight-decay",
    str(GLOBAL_WD),
    "--lr",
    "0.01",
    "--lr-warmup-iters",
    "2",
    "--train-iters",
    "10",
]


def build(reseed, *flags: str):
    """A tiny AttnRes GPT with its optimizer and scheduler for ``TINY + flags``."""
    args = build_parser().parse_args([*TINY, *flags])
    validate_args(args, world_size=1)
    reseed()
    return setup_training(args, config_from_args(args, "cpu"), VOCAB, "cpu")


def is_attn_res(name: str) -> bool:
    """AttnRes vectors by their module path, independently of the plugin's own selection."""
    module, _, leaf = name.rpartition(".")
    return module.rpartition(".")[2].startswith("attn_res_") and leaf in ("pseudo_query", "key_gain")


def decay_by_name(setup) -> dict[str, float]:
    """The weight decay the optimizer applies to each named parameter of the model."""
    decay = {id(p): group["weight_decay"] for group in setup.optimizer.param_groups for p in group["params"]}
    return {name: decay[id(param)] for name, param in setup.unwrapped()[0].named_parameters()}


@pytest.mark.parametrize(
    "flags, attn_res_wd",
    [
        ([], 0.0),
        (["--attn-res-weight-decay", "none"], 0.0),
        (["--attn-res-weight-decay", "default"], GLOBAL_WD),
        (["--attn-res-weight-decay", "0.05"], 0.05),
        (["--attn-res-weight-decay", "0"], 0.0),
    ],
    ids=["unset", "none", "default", "float", "zero"],
)
def test_param_groups_follow_the_flag(reseed, flags, attn_res_wd):
    setup = build(reseed, *flags)
    decay = decay_by_name(setup)
    attn_res = [name for name in decay if is_attn_res(name)]
    assert len(attn_res) == 2 * (2 * 2 + 1)  # two vectors per sublayer, plus the final mix
    matrices = [name for name, p in setup.unwrapped()[0].named_parameters() if p.dim() > 1]
    vectors = [name for name, p in setup.unwrapped()[0].named_parameters() if p.dim() == 1]
    assert any("linear_fc1.weight" in name for name in matrices)
    assert any("layernorm" in name for name in vectors)
    for name in attn_res:
        assert decay[name] == pytest.approx(attn_res_wd, rel=1e-12, abs=0), name
    for name in matrices:
        assert decay[name] == GLOBAL_WD, name
    for name in set(vectors) - set(attn_res):
        assert decay[name] == 0.0, name
    # Megatron matches checkpointed groups by (wd_mult, lr_mult, ...): each must be unique.
    identifiers = [
        (g["wd_mult"], g["lr_mult"], g["is_expert_parallel"]) for g in setup.optimizer.param_groups
    ]
    assert len(identifiers) == len(set(identifiers))


def test_decay_reaches_the_attn_res_vectors_in_a_step(reseed):
    """With zero gradients an AdamW step only decays: key gains (ones) shrink by lr x wd."""
    for flags, wd in ([], 0.0), (["--attn-res-weight-decay", "0.05"], 0.05):
        setup = build(reseed, *flags)
        setup.scheduler.step(increment=2)  # end of warmup: lr = 0.01
        for chunk in setup.chunks:
            chunk.zero_grad_buffer()
        updated, _, _ = setup.optimizer.step()
        assert updated
        model = setup.unwrapped()[0]
        gain = model.decoder.layers[0].attn_res_mlp.key_gain.detach()
        torch.testing.assert_close(gain, torch.full_like(gain, 1 - 0.01 * wd), rtol=0, atol=1e-7)
        assert torch.count_nonzero(model.decoder.attn_res_final.pseudo_query) == 0


def test_checkpoint_round_trip_keeps_the_groups(reseed, tmp_path):
    from attnres_megatron.training.checkpointing import load_checkpoint, save_checkpoint

    flags = ["--attn-res-weight-decay", "0.05"]
    setup = build(reseed, *flags)
    setup.scheduler.step(increment=2)
    generator = torch.Generator().manual_seed(0)
    for param in setup.unwrapped()[0].parameters():
        param.main_grad.copy_(torch.randn(param.shape, generator=generator))
    setup.optimizer.step()
    save_checkpoint(setup, 3, str(tmp_path))
    fresh = build(reseed, *flags)
    load_checkpoint(fresh, str(tmp_path))
    assert decay_by_name(fresh) == decay_by_name(setup)
    saved, loaded = setup.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert [(g["wd_mult"], len(g["params"])) for g in loaded["param_groups"]] == [
        (g["wd_mult"], len(g["params"])) for g in saved["param_groups"]
    ]
    for index, state in saved["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(loaded["state"][index][name], value, rtol=0, atol=0)


@pytest.mark.parametrize("value", ["-0.1", "abc", "nan", "inf"])
def test_bad_values_name_the_flag(value, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*TINY, "--attn-res-weight-decay", value])
    assert "--attn-res-weight-decay" in capsys.readouterr().err


def test_coefficient_needs_a_global_weight_decay():
    args = build_parser().parse_args([*TINY, "--weight-decay", "0", "--attn-res-weight-decay", "0.05"])
    with pytest.raises(SystemExit, match="--attn-res-weight-decay 0.05 needs --weight-decay > 0"):
        validate_args(args, world_size=1)
    for ok in ("none", "default", "0"):
        args = build_parser().parse_args([*TINY, "--weight-decay", "0", "--attn-res-weight-decay", ok])
        validate_args(args, world_size=1)

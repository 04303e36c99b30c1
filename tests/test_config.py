"""Every invalid AttnRes configuration raises ValueError naming the option."""

from __future__ import annotations

import pytest

from attnres_megatron import AttnResTransformerConfig

BASE = dict(num_layers=4, hidden_size=32, num_attention_heads=4)


def config(**fields) -> AttnResTransformerConfig:
    return AttnResTransformerConfig(**{**BASE, **fields})


@pytest.mark.parametrize(
    "fields, expected_sublayers",
    [
        (dict(attention_residuals="full"), 1),
        (dict(attention_residuals="block", attn_res_block_size=3), 3),
        (dict(attention_residuals="block", attn_res_layers_per_block=2), 4),
        (dict(attention_residuals="block", attn_res_num_blocks=3), 3),  # ceil(8 / 3)
        (dict(attention_residuals="block", attn_res_num_blocks=8), 1),
        (dict(attention_residuals="none"), None),
    ],
)
def test_block_size_resolution(fields, expected_sublayers):
    assert config(**fields).attn_res_sublayers_per_block == expected_sublayers


INVALID = [
    (dict(attention_residuals="sparse"), "--attention-residuals"),
    (dict(attention_residuals="block"), "--attn-res-num-blocks"),
    (dict(attention_residuals="block", attn_res_block_size=2, attn_res_num_blocks=2), "exactly one"),
    (dict(attention_residuals="block", attn_res_block_size=0), "--attn-res-block-size"),
    (dict(attention_residuals="block", attn_res_layers_per_block=-1), "--attn-res-layers-per-block"),
    (dict(attention_residuals="block", attn_res_num_blocks=9), "--attn-res-num-blocks"),
    (dict(attention_residuals="block", attn_res_block_size=9), "--attn-res-block-size"),
    (dict(attention_residuals="block", attn_res_layers_per_block=5), "--attn-res-layers-per-block"),
    (dict(attention_residuals="full", attn_res_num_blocks=4), "--attn-res-num-blocks"),
    (dict(attention_residuals="none", attn_res_block_size=2), "--attn-res-block-size"),
    (dict(attention_residuals="full", attn_res_eps=0.0), "--attn-res-eps"),
    (dict(attention_residuals="full", attn_res_impl="cuda"), "--attn-res-impl"),
    (dict(attention_residuals="full", recompute_modules=["attn_res"]), "--recompute-granularity selective"),
    (
        dict(
            attention_residuals="block",
            attn_res_block_size=2,
            attn_res_impl="two-phase",
            recompute_granularity="selective",
            recompute_modules=["attn_res"],
        ),
        "--attn-res-impl torch or fused",
    ),
    (dict(attention_residuals="full", num_layers=64, attn_res_impl="fused"), "--attn-res-num-blocks"),
    (
        dict(attention_residuals="full", apply_residual_connection_post_layernorm=True),
        "apply_residual_connection_post_layernorm",
    ),
    (dict(attention_residuals="full", mtp_num_layers=1), "mtp_num_layers"),
]


@pytest.mark.parametrize("fields, option", INVALID, ids=[str(i) for i in range(len(INVALID))])
def test_invalid_configurations_name_the_option(fields, option):
    with pytest.raises(ValueError, match=option):
        config(**fields)


def test_stock_config_fields_still_validated():
    with pytest.raises(ValueError, match="tensor_model_parallel_size"):  # Megatron's own check
        AttnResTransformerConfig(
            num_layers=2,
            hidden_size=32,
            num_attention_heads=3,
            tensor_model_parallel_size=2,
            attention_residuals="full",
        )


def test_attn_res_recompute_module_passes_megatron_validation():
    cfg = config(
        attention_residuals="full",
        recompute_granularity="selective",
        recompute_modules=["attn_res", "layernorm"],
    )
    assert cfg.attn_res_recompute
    assert cfg.recompute_modules == ["layernorm", "attn_res"]
    assert not config(attention_residuals="full", recompute_granularity="selective").attn_res_recompute


def test_full_recompute_is_accepted():
    cfg = config(
        attention_residuals="block",
        attn_res_block_size=3,
        recompute_granularity="full",
        recompute_method="block",
        recompute_num_layers=2,
    )
    assert cfg.recompute_granularity == "full"


def test_fused_without_triton_names_the_install(monkeypatch):
    import builtins

    from attnres_megatron.ops.triton_aggregate import require_triton

    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("No module named 'triton'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    with pytest.raises(ImportError, match=r"attnres-megatron\[triton\]"):
        require_triton()
    # Where CUDA exists the config asks for Triton up front; CPU tensors use C++ kernels.
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(ImportError, match=r"attnres-megatron\[triton\]"):
        config(attention_residuals="full", attn_res_impl="fused")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert config(attention_residuals="full", attn_res_impl="fused").attn_res_impl == "fused"

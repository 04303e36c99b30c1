"""Kimi Linear on Megatron-Core: release parameter counts, layer pattern, NoPE MLA, tiny training step."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from megatron.core.models.common.embeddings import apply_rotary_pos_emb
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.spec_utils import build_module

from attnres_megatron.layers.transformer_layer import AttnResTransformerLayer
from attnres_megatron.models.kimi.kda_attention import KimiDeltaAttention
from attnres_megatron.models.kimi.layers import (
    kimi_attention_pattern,
    kimi_linear_block_spec,
    kimi_linear_layer_specs,
)
from attnres_megatron.models.kimi.mla import NoPEMLASelfAttention, NoRotaryEmbedding
from attnres_megatron.models.kimi.presets import (
    PRESETS,
    KimiLinearConfig,
    build_kimi_linear_model,
    kimi_linear_config,
)

TOOLS = Path(__file__).resolve().parents[1] / "tools"
RELEASE = "kimi-linear-48b-a3b"
RELEASE_MLA_LAYERS = [4, 8, 12, 16, 20, 24, 27]

# From the released checkpoint (model.safetensors.index.json): router expert biases are
# Megatron buffers (26 MoE layers x 256), the rest are trainable parameters.
RELEASE_TRAINABLE = 49_122_675_072
RELEASE_WITH_EXPERT_BIAS = 49_122_681_728
RELEASE_ACTIVE = 3_484_453_248
# DESIGN section 1: (w_j, g_j) of shape [2304] per sublayer (54) plus the final aggregation.
ATTN_RES_EXTRA = (2 * 27 + 1) * 2 * 2304


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (tools is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def counter(single_rank) -> ModuleType:
    """tools/count_parameters.py, imported once the single-rank world exists."""
    return load_tool("count_parameters")


@pytest.fixture(scope="module")
def release_model(counter):
    """The 48B-A3B release shape without AttnRes, built on the meta device."""
    config = kimi_linear_config(RELEASE, attention_residuals="none")
    return config, counter.build_on_meta(config)


def test_attention_pattern_matches_release():
    assert [i + 1 for i, m in enumerate(kimi_attention_pattern(27)) if m == "mla"] == RELEASE_MLA_LAYERS
    assert kimi_attention_pattern(5) == ["kda", "kda", "kda", "mla", "mla"]
    assert kimi_attention_pattern(8).count("mla") == 2  # the last layer is already a 4th layer
    with pytest.raises(ValueError, match="1-based"):
        kimi_attention_pattern(4, mla_layers=[0])


def test_release_config():
    config = kimi_linear_config(RELEASE)
    assert isinstance(config, KimiLinearConfig)
    assert config.attn_res_sublayers_per_block == 6
    assert config.attn_res_num_sources_at_output() == 10
    assert config.moe_layer_freq == [0] + [1] * 26
    assert (config.kda_num_heads, config.kda_head_dim, config.kda_gate_rank) == (32, 128, 128)
    assert config.q_lora_rank is None and config.kv_lora_rank == 512
    assert config.moe_router_topk_scaling_factor == 2.446 and config.moe_router_enable_expert_bias
    assert kimi_linear_config(RELEASE, attention_residuals="none").attn_res_block_size is None
    assert kimi_linear_config(RELEASE, attn_res_num_blocks=5).attn_res_sublayers_per_block == 11
    with pytest.raises(ValueError, match="rope_type"):
        kimi_linear_config(RELEASE, rope_type="yarn")
    with pytest.raises(ValueError, match="kimi_first_k_dense"):
        kimi_linear_config(RELEASE, moe_layer_freq=[1] * 27)


def test_release_parameter_count_without_attn_res(counter, release_model):
    config, model = release_model
    counts = counter.count_model(model, config)
    assert counts["total"] == RELEASE_TRAINABLE
    assert counts["total_with_buffers"] == RELEASE_WITH_EXPERT_BIAS
    assert counts["buffers"] == 26 * 256 and counts["buffer_names"] == ["expert_bias"]
    assert counts["active"] == RELEASE_ACTIVE
    by = counts["total_by_component"]
    assert by["attention_kda"] == 20 * 39_514_272
    assert by["attention_mla"] == 7 * 29_114_880
    assert by["dense_mlp"] == 63_700_992
    assert by["embedding"] == by["head"] == 163840 * 2304
    assert by["norms"] == 27 * 2 * 2304 + 2304
    assert by["attn_res"] == 0 and by["other"] == 0


def test_release_parameter_count_with_attn_res(counter):
    counts = counter.count_parameters(kimi_linear_config(RELEASE))
    assert counts["total_by_component"]["attn_res"] == ATTN_RES_EXTRA == 253_440
    assert counts["total"] == RELEASE_TRAINABLE + ATTN_RES_EXTRA
    assert counts["active"] == RELEASE_ACTIVE + ATTN_RES_EXTRA


def test_release_layer_types(release_model):
    _, model = release_model
    layers = model.decoder.layers
    assert len(layers) == 27
    for index, layer in enumerate(layers, start=1):
        assert layer.layer_number == index
        mixer = type(layer.self_attention)
        assert mixer is (NoPEMLASelfAttention if index in RELEASE_MLA_LAYERS else KimiDeltaAttention), index
        if index == 1:
            assert type(layer.mlp) is MLP and layer.mlp.linear_fc1.weight.shape == (2 * 9216, 2304)
        else:
            assert isinstance(layer.mlp, MoELayer), index
            assert layer.mlp.shared_experts is not None
            assert len(layer.mlp.experts.local_experts) == 256
    assert isinstance(layers[3].self_attention.rotary_pos_emb, NoRotaryEmbedding)
    assert model.position_embedding_type == "none" and not model.share_embeddings_and_output_weights


def test_block_spec_slices_pipeline_stages(single_rank):
    config = kimi_linear_config(RELEASE, pipeline_model_parallel_size=3, pipeline_dtype=torch.float32)
    specs = kimi_linear_layer_specs(config)
    assert all(spec.module is AttnResTransformerLayer for spec in specs)
    stage = kimi_linear_block_spec(config, pp_rank=1)
    assert len(stage.layer_specs) == 9
    assert stage.layer_specs == specs[9:18]  # global layers 10..18: MLA at 12 and 16
    mixers = [spec.submodules.self_attention.module for spec in stage.layer_specs]
    assert [i for i, m in enumerate(mixers, start=10) if m is NoPEMLASelfAttention] == [12, 16]
    with pytest.raises(ValueError, match="attention_residuals"):
        no_attn_res = kimi_linear_config(RELEASE, attention_residuals="none")
        kimi_linear_block_spec(no_attn_res, attention_residuals=True)


def _tiny_mla(config: KimiLinearConfig, module: type = NoPEMLASelfAttention) -> torch.nn.Module:
    """The tiny preset's MLA self-attention (layer 4) as a standalone fp64 module."""
    spec = kimi_linear_layer_specs(config, attention_residuals=False)[3].submodules.self_attention
    spec = type(spec)(module=module, params=spec.params, submodules=spec.submodules)
    return build_module(spec, config=config, layer_number=4).double()


def _manual_nope_mla(mla: torch.nn.Module, config: KimiLinearConfig, x: torch.Tensor) -> torch.Tensor:
    """Kimi's NoPE MLA (HF modeling_kimi) written out with the module's weights: [s, b, h] -> [s, b, h]."""
    s, b, _ = x.shape
    n, nope, pe, dv, rank = (
        config.num_attention_heads,
        config.qk_head_dim,
        config.qk_pos_emb_head_dim,
        config.v_head_dim,
        config.kv_lora_rank,
    )
    q = (x @ mla.linear_q_proj.weight.T).view(s, b, n, nope + pe)
    latent, k_pe = (x @ mla.linear_kv_down_proj.weight.T).split([rank, pe], dim=-1)
    latent = latent * torch.rsqrt(latent.pow(2).mean(-1, keepdim=True) + config.layernorm_epsilon)
    latent = latent * mla.kv_layernorm.weight
    k_nope, v = (latent @ mla.linear_kv_up_proj.weight.T).view(s, b, n, nope + dv).split([nope, dv], dim=-1)
    k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(s, b, n, pe)], dim=-1)
    scores = torch.einsum("qbnd,kbnd->bnqk", q, k) / math.sqrt(nope + pe)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    out = torch.einsum("bnqk,kbnd->qbnd", probs, v).reshape(s, b, n * dv)
    return out @ mla.linear_proj.weight.T


def test_mla_is_nope(reseed):
    config = kimi_linear_config("kimi-linear-tiny", use_cpu_initialization=True)
    reseed()
    mla = _tiny_mla(config)
    assert isinstance(mla, MLASelfAttention) and isinstance(mla.rotary_pos_emb, NoRotaryEmbedding)
    assert mla.softmax_scale == pytest.approx(1 / math.sqrt(config.qk_head_dim + config.qk_pos_emb_head_dim))
    s, b = 12, 2
    x = torch.randn(s, b, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, bias = mla(x, None)
        assert bias is None
        # 1. The positional slice is never rotated: the module equals Kimi's NoPE MLA written out.
        torch.testing.assert_close(out, _manual_nope_mla(mla, config, x), rtol=1e-10, atol=1e-12)
        # 2. The rotary embedding it applies is the exact identity (no angle, no deinterleave).
        t = torch.randn(s, b, config.num_attention_heads, config.qk_pos_emb_head_dim, dtype=torch.float64)
        assert torch.equal(apply_rotary_pos_emb(t, mla.rotary_pos_emb(s), config=config), t)
        # 3. Positions enter only through the causal mask: permuting the prefix leaves the last
        #    token unchanged.
        prefix = torch.randperm(s - 1, generator=torch.Generator().manual_seed(5))
        perm = torch.cat([prefix, torch.tensor([s - 1])])
        torch.testing.assert_close(mla(x[perm], None)[0][-1], out[-1], rtol=1e-10, atol=1e-12)
        # Megatron's stock MLA with the same weights rotates the slice, so it differs.
        stock = _tiny_mla(config, MLASelfAttention)
        stock.load_state_dict(mla.state_dict())
        assert not torch.allclose(stock(x, None)[0], out)


def test_tiny_forward_backward(reseed):
    config = kimi_linear_config("kimi-linear-tiny", use_cpu_initialization=True)
    assert config.attn_res_enabled and PRESETS["kimi-linear-tiny"]["kimi_vocab_size"] == 256
    reseed()
    model = build_kimi_linear_model(config, max_sequence_length=32)
    mixers = [type(layer.self_attention) for layer in model.decoder.layers]
    assert mixers == [KimiDeltaAttention] * 3 + [NoPEMLASelfAttention] * 2
    assert not hasattr(model, "rotary_pos_emb")  # NoPE: GPTModel passes rotary_pos_emb=None to MLA
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 33), generator=generator)
    tokens, labels = ids[:, :-1], ids[:, 1:]
    positions = torch.arange(32).unsqueeze(0).expand_as(tokens)
    loss = model(tokens, positions, None, labels=labels).float().mean()
    assert torch.isfinite(loss)
    assert abs(loss.item() - math.log(256)) < 1.0  # near-uniform predictions at init
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # Exactly zero by construction at step 0: the key gains (zero-initialised pseudo-queries
    # give constant logits) and the first sublayer's query (a softmax over one source, b0).
    exempt = {"decoder.layers.0.attn_res_attention.pseudo_query"}
    silent = [
        name
        for name, p in model.named_parameters()
        if not p.grad.any() and not name.endswith("key_gain") and name not in exempt
    ]
    assert not silent, silent

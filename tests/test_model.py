"""AttnRes GPT inside Megatron-Core: stock equivalence, fp64 oracle parity, zero init."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from reference_model import attnres_gpt_logits
from worker_models import small_gpt_config

from attnres_megatron import AttnResGPTModel, AttnResTransformerConfig, DepthAttention
from attnres_megatron.models.builder import build_gpt_model
from attnres_megatron.models.specs import get_gpt_decoder_block_spec, get_gpt_layer_spec

VOCAB, SEQ, BATCH, HEADS = 64, 8, 2, 4


def make_config(num_layers: int = 5, **attn_res) -> AttnResTransformerConfig:
    return small_gpt_config(
        num_layers=num_layers, num_attention_heads=HEADS, params_dtype=torch.float32, **attn_res
    )


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(SEQ).unsqueeze(0).expand_as(ids)
    return model(ids, positions, None)


def test_mode_none_is_stock_megatron(reseed):
    config = make_config(num_layers=3)
    block_spec = get_gpt_decoder_block_spec(config, get_gpt_layer_spec("local", attention_residuals=False))
    reseed()
    stock = GPTModel(
        config, block_spec, vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope"
    )
    reseed()
    plugin = AttnResGPTModel(
        config, block_spec, vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope"
    )
    assert list(stock.state_dict()) == list(plugin.state_dict())
    for (name, a), b in zip(stock.state_dict().items(), plugin.state_dict().values()):
        assert (a is None and b is None) or torch.equal(a, b), name
    ids = tokens()
    assert torch.equal(logits_of(stock, ids), logits_of(plugin, ids))


PARITY_CASES = {
    "full": dict(attention_residuals="full"),
    "block_S2": dict(attention_residuals="block", attn_res_block_size=2),
    "block_S4_partial_last": dict(attention_residuals="block", attn_res_block_size=4),
    "block_S6_partial_last": dict(attention_residuals="block", attn_res_block_size=6),
    "block_S3_odd": dict(attention_residuals="block", attn_res_block_size=3),
    "block_by_num_blocks": dict(attention_residuals="block", attn_res_num_blocks=3),
}


@pytest.mark.parametrize("impl", ["torch", "two-phase", "auto"])
@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_fp64_parity_with_independent_reference(reseed, case, impl):
    config = make_config(num_layers=5, attn_res_impl=impl, **PARITY_CASES[case])
    reseed()
    model = build_gpt_model(config, VOCAB, SEQ, transformer_impl="local").double()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "attn_res" in name:  # random, non-zero pseudo-queries and gains
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))
    weights = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    tensors = [k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)]
    assert sorted(weights) == sorted(tensors)
    ids = tokens(1)
    upstream = torch.randn(BATCH, SEQ, VOCAB, generator=generator, dtype=torch.float64)

    ours = logits_of(model, ids)
    (ours * upstream).sum().backward()
    ref = attnres_gpt_logits(
        weights, ids, config.num_layers, HEADS, config.attn_res_sublayers_per_block, config.attn_res_eps
    )
    (ref * upstream).sum().backward()

    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, weights[name].grad, rtol=1e-9, atol=1e-10, msg=name)
        if not name.startswith("decoder.layers.0.attn_res_attention."):  # one source: constant
            assert weights[name].grad.abs().sum() > 0, name


def test_zero_init_mixes_are_means_and_queries_learn(reseed):
    config = make_config(num_layers=3, attention_residuals="block", attn_res_block_size=2)
    reseed()
    model = build_gpt_model(config, VOCAB, SEQ, transformer_impl="local").double()
    checked = []

    def check_mean(module, inputs, output):
        (sources,) = inputs
        expected = torch.stack(sources).mean(0)
        torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
        checked.append(len(sources))

    mixers = [m for m in model.modules() if isinstance(m, DepthAttention)]
    assert len(mixers) == 2 * config.num_layers + 1
    for mixer in mixers:
        assert torch.count_nonzero(mixer.pseudo_query) == 0
        mixer.register_forward_hook(check_mean)
    logits_of(model, tokens()).sum().backward()
    assert checked == [1, 2, 2, 3, 3, 4, 4]  # sources per sublayer with S=2, then the final mix
    for mixer in mixers[1:]:  # the very first mix has one source: softmax is constant
        assert mixer.pseudo_query.grad.abs().max() > 0


def test_sources_at_output_match_kimi_linear_layout():
    config = make_config(num_layers=27, attention_residuals="block", attn_res_block_size=6)
    assert config.attn_res_num_sources_at_output() == 10

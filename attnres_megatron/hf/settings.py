"""Model settings between an attnres-pretrain run and a Hugging Face ``config.json``.

:func:`hf_config` turns a run's Megatron config and GPT flags into ``AttnResConfig`` fields (our
sublayer block size becomes layers per block, refused when it is not a whole number of layers);
:func:`pretrain_flags` turns such fields back into the ``attnres-pretrain`` flags that build the
same model. What cannot be converted is refused with the reason (:class:`ConversionError`).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

ARCHITECTURE = "AttnResForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_attnres.AttnResConfig",
    "AutoModelForCausalLM": "modeling_attnres.AttnResForCausalLM",
}
MODEL_TYPE = "attnres_gpt"
BLOCK_SIZE_FLAGS = ("attn_res_block_size", "attn_res_layers_per_block", "attn_res_num_blocks")
# Moonshot's modeling_kimi names the Kimi Linear tensors like this; none of them can be checked here.
KIMI_REFUSAL = (
    "the Hugging Face export covers GPT models (--model gpt); --model {model} is refused. Moonshot's "
    "modeling_kimi names (self_attn.{{q,k,v}}_proj, {{q,k,v}}_conv1d, f_a_proj, f_b_proj, A_log [1,1,H,1], "
    "dt_bias, b_proj, g_a_proj, g_b_proj, o_norm, o_proj for KDA; q_proj, kv_a_proj_with_mqa, "
    "kv_a_layernorm, kv_b_proj for MLA; block_sparse_moe.gate.weight, "
    "gate.e_score_correction_bias, experts.N.w1/w2/w3, shared_experts.* for MoE) would take this "
    "model's tensors, but the mapping cannot be verified: modeling_kimi runs only with "
    "flash-linear-attention's GPU kernels and flash_attention_2 (no logits-parity check on CPU), its "
    "kv_a_layernorm uses eps 1e-6 where this model uses its norm epsilon, and it has no Attention "
    "Residuals, so the AttnRes keys (self_attention_res_*, mlp_res_*, output_attn_res_*) have no "
    "modeling code that reads them and the model would load as a different function."
)


class ConversionError(ValueError):
    """What cannot be converted, and why (the message names the option or file and the fix)."""


def _given_block_flag(args: argparse.Namespace) -> str:
    """``--flag VALUE`` of the block-size option the run used (for messages)."""
    for name in BLOCK_SIZE_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            return f"--{name.replace('_', '-')} {value}"
    return "the preset's block size"


def attn_res_fields(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    """``attn_res_block_size`` (layers; None when off or Full), ``attn_res_full`` and ``attn_res_eps``."""
    if not config.attn_res_enabled:
        return dict(attn_res_block_size=None, attn_res_full=False, attn_res_eps=config.attn_res_eps)
    sublayers = config.attn_res_sublayers_per_block
    if sublayers == 1:  # Full AttnRes: every sublayer closes a block; layers cannot express it
        return dict(attn_res_block_size=None, attn_res_full=True, attn_res_eps=config.attn_res_eps)
    if sublayers % 2:
        raise ConversionError(
            f"{_given_block_flag(args)} gives S = {sublayers} sublayers per depth block, which is not a "
            "whole number of transformer layers: the Hugging Face convention counts attn_res_block_size in "
            "layers (an attention and an MLP sublayer each), so only an even S (S/2 layers; "
            "--attn-res-layers-per-block K) or Full AttnRes (--attention-residuals full) can be exported. "
            f"Train with --attn-res-block-size {sublayers - 1} or {sublayers + 1} instead."
        )
    return dict(attn_res_block_size=sublayers // 2, attn_res_full=False, attn_res_eps=config.attn_res_eps)


def check_exportable(args: argparse.Namespace, config: Any) -> None:
    """Refuse what the GPT convention has no names or modeling code for, naming the option."""
    from attnres_megatron.models.families import model_family

    if not model_family(args.model).shape_from_flags:
        raise ConversionError(KIMI_REFUSAL.format(model=args.model))
    if config.num_moe_experts:
        raise ConversionError(
            f"--num-experts {config.num_moe_experts}: the Hugging Face export covers dense GPT models; "
            "mixture-of-experts layers are not exported."
        )
    if getattr(config, "multi_latent_attention", False):
        raise ConversionError("multi-latent attention is not exported (dense GPT attention only).")
    if args.position_embedding_type not in ("rope", "learned_absolute", "none"):
        raise ConversionError(f"--position-embedding-type {args.position_embedding_type} is not exported.")


def hf_config(args: argparse.Namespace, config: Any, vocab_size: int, token_ids: Mapping[str, Any]) -> dict:
    """``AttnResConfig`` fields of the run (``args``, its Megatron ``config``) and its tokenizer's ids."""
    check_exportable(args, config)
    heads = config.num_attention_heads
    return dict(
        model_type=MODEL_TYPE,
        architectures=[ARCHITECTURE],
        auto_map=dict(AUTO_MAP),
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=config.num_query_groups or heads,
        head_dim=config.kv_channels,
        hidden_act="silu" if config.gated_linear_unit else "gelu",
        gated_mlp=bool(config.gated_linear_unit),
        attention_bias=bool(config.add_qkv_bias),
        attention_out_bias=bool(config.add_bias_linear),
        mlp_bias=bool(config.add_bias_linear),
        normalization=config.normalization,
        norm_eps=config.layernorm_epsilon,
        qk_norm=bool(config.qk_layernorm),
        position_embedding_type=args.position_embedding_type,
        max_position_embeddings=args.max_position_embeddings or args.seq_length,
        rope_theta=10000.0,  # Megatron's rotary base (attnres-pretrain has no --rotary-base)
        **attn_res_fields(args, config),
        initializer_range=config.init_method_std,
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        use_cache=True,
        **{key: value for key, value in token_ids.items() if value is not None},
    )


def required(config: Mapping, name: str, default: Any = None) -> Any:
    """A field the import needs (refused by name when absent)."""
    """A field the import needs (refused by name when absent)."""
    value = config.get(name, default)
    if value is None:
        raise ConversionError(f"config.json has no {name}.")
    return value


def _bias_flags(config: Mapping) -> list[str]:
    """``--disable-bias-linear`` / ``--add-qkv-bias`` for the three bias fields (refused when mixed)."""
    linear, qkv = bool(config.get("mlp_bias")), bool(config.get("attention_bias"))
    if bool(config.get("attention_out_bias")) != linear or (linear and not qkv):
        raise ConversionError(
            "config.json's biases (attention_bias, attention_out_bias, mlp_bias) have no attnres-pretrain "
            "flags: --disable-bias-linear turns the output-projection and MLP biases off together, "
            "--add-qkv-bias adds the query/key/value ones."
        )
    if linear:
        return []
    return ["--disable-bias-linear"] + (["--add-qkv-bias"] if qkv else [])


def _mlp_flags(config: Mapping) -> list[str]:
    """``--swiglu`` for a gated SiLU MLP, nothing for GeLU; anything else refused."""
    act, gated = config.get("hidden_act", "gelu"), bool(config.get("gated_mlp"))
    if (act, gated) not in (("silu", True), ("gelu", False)):
        raise ConversionError(
            f"config.json's MLP (hidden_act {act!r}, gated_mlp {gated}) is neither SwiGLU (silu, gated) "
            "nor GeLU (gelu, not gated), the two attnres-pretrain builds."
        )
    return ["--swiglu"] if gated else []


def _attn_res_flags(config: Mapping) -> list[str]:
    """``--attention-residuals`` with the block size in layers, and the key RMS epsilon."""
    full, layers = bool(config.get("attn_res_full")), config.get("attn_res_block_size")
    eps = ["--attn-res-eps", repr(float(config.get("attn_res_eps") or required(config, "norm_eps")))]
    if full:
        return ["--attention-residuals", "full", *eps]
    if layers is None:
        return ["--attention-residuals", "none"]
    return ["--attention-residuals", "block", "--attn-res-layers-per-block", str(layers), *eps]


def pretrain_flags(config: Mapping) -> list[str]:
    """The ``attnres-pretrain`` model flags that build the model of a Hugging Face ``config``."""
    if config.get("model_type") != MODEL_TYPE:
        raise ConversionError(
            f"config.json has model_type {config.get('model_type')!r}; only {MODEL_TYPE!r} directories "
            "(written by tools/convert_hf.py export) can be imported."
        )
    heads = required(config, "num_attention_heads")
    groups = config.get("num_key_value_heads") or heads
    positions = config.get("max_position_embeddings") or 0
    flags = [
        *("--num-layers", str(required(config, "num_hidden_layers"))),
        *("--hidden-size", str(required(config, "hidden_size"))),
        *("--ffn-hidden-size", str(required(config, "intermediate_size"))),
        *("--num-attention-heads", str(heads)),
        *("--kv-channels", str(config.get("head_dim") or config["hidden_size"] // heads)),
        *(["--group-query-attention", "--num-query-groups", str(groups)] if groups != heads else []),
        *("--normalization", str(config.get("normalization", "RMSNorm"))),
        *("--norm-epsilon", repr(float(required(config, "norm_eps")))),
        *_mlp_flags(config),
        *_bias_flags(config),
        *(["--qk-layernorm"] if config.get("qk_norm") else []),
        *("--position-embedding-type", str(config.get("position_embedding_type", "rope"))),
        *(["--max-position-embeddings", str(positions), "--seq-length", str(positions)] if positions else []),
        *([] if config.get("tie_word_embeddings") else ["--untie-embeddings-and-output-weights"]),
        *("--init-method-std", repr(float(config.get("initializer_range", 0.02)))),
        *_attn_res_flags(config),
    ]
    return flags

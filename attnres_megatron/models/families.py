"""The model families of ``--model``: one registry entry decides everything that differs between them.

Each :class:`ModelFamily` knows its display name, its preset (the model fields it fixes; empty
when the shape flags give the shape), its default depth mixing, how to build its config from
attnres-pretrain's flags or Megatron-LM's config mapping plus overrides, and how to build one
pipeline chunk. ``attnres-pretrain``, the profiler, the Megatron-LM provider and the tools look
the family up here instead of comparing model names; adding a family is adding one entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Optional

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from attnres_megatron.config import AttnResTransformerConfig
from attnres_megatron.models.builder import build_gpt_model
from attnres_megatron.models.gpt import AttnResGPTModel
from attnres_megatron.models.kimi.presets import (
    PRESETS,
    KimiLinearConfig,
    build_kimi_linear_model,
    kimi_linear_config,
)
from attnres_megatron.models.specs import resolve_transformer_impl


@dataclasses.dataclass
class AttnResMLATransformerConfig(MLATransformerConfig, AttnResTransformerConfig):
    """Multi-latent attention config with the AttnRes options (GPT with ``--multi-latent-attention``)."""


def field_names(config_class: type) -> set[str]:
    """The constructor fields of a config dataclass."""
    return {each.name for each in dataclasses.fields(config_class) if each.init}


ATTN_RES_FIELDS = frozenset(field_names(AttnResTransformerConfig) - field_names(TransformerConfig))

# Kimi Linear fields that Megatron-LM's flags may set although a preset exists (its shape,
# attention, routing and AttnRes fields come from the preset and the class).
KIMI_FIELDS_FROM_FLAGS = frozenset({"hidden_dropout", "attention_dropout"})
KIMI_SHAPE_FIELDS = frozenset(
    {
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "kv_channels",
        "num_moe_experts",
        "moe_layer_freq",
        "apply_rope_fusion",
        "rotary_interleaved",
    }
)
KIMI_CLASS_FIELDS = frozenset(inspect.get_annotations(KimiLinearConfig)) | frozenset(
    inspect.get_annotations(MLATransformerConfig)
)

MOE_FIELDS_FROM_ARGS = (
    "moe_router_topk",
    "moe_router_score_function",
    "moe_router_enable_expert_bias",
    "moe_router_bias_update_rate",
    "moe_router_topk_scaling_factor",
    "moe_router_load_balancing_type",
    "moe_aux_loss_coeff",
    "moe_token_dispatcher_type",
    "moe_grouped_gemm",
    "moe_shared_expert_intermediate_size",
)


def ffn_hidden_size(args: argparse.Namespace) -> int:
    """``--ffn-hidden-size``, else Megatron-LM's: 4 x hidden, or int(8 x hidden / 3 / 64) x 64 with SwiGLU."""
    if args.ffn_hidden_size is not None:
        return args.ffn_hidden_size
    if args.swiglu:
        return int((4 * args.hidden_size * 2 / 3) / 64) * 64
    return 4 * args.hidden_size


def gpt_shape_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Config fields of the GPT shape flags, mapped as Megatron-LM's ``core_transformer_config_from_args``
    maps them (SwiGLU -> gated SiLU MLP, else GeLU; biases; GQA only with ``--group-query-attention``)."""
    return dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=ffn_hidden_size(args),
        num_attention_heads=args.num_attention_heads,
        kv_channels=args.kv_channels,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias or args.add_bias_linear,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        qk_layernorm=args.qk_layernorm,
        init_method_std=args.init_method_std,
    )


def gpt_moe_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Config fields of the MoE flags (none without ``--num-experts``)."""
    if args.num_experts is None:
        return {}
    moe = {name: getattr(args, name) for name in MOE_FIELDS_FROM_ARGS}
    moe.update(
        num_moe_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size or ffn_hidden_size(args),
        moe_router_dtype="fp32",
    )
    return moe


@dataclass(frozen=True)
class ChunkInputs:
    """What a model chunk is built from besides its config and pipeline stage."""

    vocab_size: int
    max_sequence_length: int
    transformer_impl: str = "auto"
    device: Optional[str] = None
    position_embedding_type: str = "rope"
    share_embeddings_and_output_weights: bool = False


def chunk_inputs(args: argparse.Namespace, vocab_size: int, device: Optional[str] = None) -> ChunkInputs:
    """Chunk inputs of attnres-pretrain's or Megatron-LM's flags; device: given, else ``--device``."""
    return ChunkInputs(
        vocab_size=vocab_size,
        max_sequence_length=args.max_position_embeddings or args.seq_length,
        transformer_impl=getattr(args, "transformer_impl", "transformer_engine"),
        device=device if device is not None else getattr(args, "device", None),
        position_embedding_type=args.position_embedding_type,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
    )


@dataclass(frozen=True)
class ModelFamily(ABC):
    """One ``--model`` choice; subclasses say how its configs and chunks are built."""

    name: str
    display_name: str
    preset: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def shape_from_flags(self) -> bool:
        """Whether the shape flags (``--num-layers``, ...) give the shape (no preset fixes it)."""
        return not self.preset

    @property
    def default_attention_residuals(self) -> str:
        """The depth mixing without ``--attention-residuals``: the preset's, else 'none'."""
        return self.preset.get("attention_residuals", "none")

    def shape(self, name: str, flag_value: Any) -> Any:
        """A model field: the preset's value, else the one the flags give."""
        return self.preset.get(name, flag_value)

    def attention_residuals(self, given: Optional[str]) -> str:
        """The depth-mixing mode ``--attention-residuals given`` selects."""
        return given if given is not None else self.default_attention_residuals

    def mode_flag(self, given: Optional[str]) -> Optional[str]:
        """``--attention-residuals`` as recorded for a build: a preset keeps None (its own mode and S)."""
        return given if given is not None or self.preset else self.default_attention_residuals

    def own_fields(self) -> frozenset[str]:
        """Config fields the family sets itself, which Megatron-LM's generic flag mapping never overrides."""
        return ATTN_RES_FIELDS

    @abstractmethod
    def config_class(self, fields: Mapping[str, Any]) -> type[AttnResTransformerConfig]:
        """The config dataclass these fields build."""

    @abstractmethod
    def flag_fields(self, args: argparse.Namespace) -> dict[str, Any]:
        """The model fields attnres-pretrain's flags give (none when a preset fixes them)."""

    @abstractmethod
    def make_config(self, **fields: Any) -> AttnResTransformerConfig:
        """The family's config with these field overrides."""

    def megatron_lm_fields(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The fields of Megatron-LM's config mapping (``kwargs``) that this family takes."""
        names = field_names(self.config_class(kwargs)) - self.own_fields()
        return {name: value for name, value in kwargs.items() if name in names}

    def build_chunk(
        self,
        config: AttnResTransformerConfig,
        inputs: ChunkInputs,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
    ) -> AttnResGPTModel:
        """This pipeline chunk, its layer spec chosen by the one ``transformer_impl`` rule."""
        impl = resolve_transformer_impl(inputs.transformer_impl, inputs.device)
        stage = dict(pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
        return self.make_chunk(config, inputs, impl, stage)

    @abstractmethod
    def make_chunk(
        self, config: AttnResTransformerConfig, inputs: ChunkInputs, impl: str, stage: dict[str, Any]
    ) -> AttnResGPTModel:
        """Build a chunk with a resolved ``impl`` ('local' or 'transformer_engine')."""


@dataclass(frozen=True)
class GPTFamily(ModelFamily):
    """The AttnRes GPT: the shape, MoE and position flags define the model."""

    def config_class(self, fields: Mapping[str, Any]) -> type[AttnResTransformerConfig]:
        """The MLA config class with ``multi_latent_attention``, else the plain one."""
        mla = fields.get("multi_latent_attention")
        return AttnResMLATransformerConfig if mla else AttnResTransformerConfig

    def flag_fields(self, args: argparse.Namespace) -> dict[str, Any]:
        """The GPT shape and MoE fields of the flags."""
        return {**gpt_shape_fields(args), **gpt_moe_fields(args)}

    def make_config(self, **fields: Any) -> AttnResTransformerConfig:
        """An AttnRes GPT config, standard residuals unless the fields ask for AttnRes."""
        return self.config_class(fields)(**{"attention_residuals": "none", **fields})

    def make_chunk(
        self, config: AttnResTransformerConfig, inputs: ChunkInputs, impl: str, stage: dict[str, Any]
    ) -> AttnResGPTModel:
        """The GPT chunk with the flags' positions and embedding tying."""
        return build_gpt_model(
            config,
            vocab_size=inputs.vocab_size,
            max_sequence_length=inputs.max_sequence_length,
            transformer_impl=impl,
            position_embedding_type=inputs.position_embedding_type,
            share_embeddings_and_output_weights=inputs.share_embeddings_and_output_weights,
            **stage,
        )


@dataclass(frozen=True)
class KimiLinearFamily(ModelFamily):
    """A Kimi Linear preset: the preset fixes the shape, NoPE and untied embeddings."""

    def own_fields(self) -> frozenset[str]:
        """The preset's, the Kimi/MLA class's, the AttnRes and the shape fields (not the dropouts)."""
        return (
            frozenset(self.preset) | KIMI_CLASS_FIELDS | ATTN_RES_FIELDS | KIMI_SHAPE_FIELDS
        ) - KIMI_FIELDS_FROM_FLAGS

    def config_class(self, fields: Mapping[str, Any]) -> type[AttnResTransformerConfig]:
        """Always :class:`KimiLinearConfig`."""
        return KimiLinearConfig

    def flag_fields(self, args: argparse.Namespace) -> dict[str, Any]:
        """None: the preset fixes the model fields."""
        return {}

    def make_config(self, **fields: Any) -> AttnResTransformerConfig:
        """The preset's config with these overrides."""
        return kimi_linear_config(self.name, **fields)

    def make_chunk(
        self, config: AttnResTransformerConfig, inputs: ChunkInputs, impl: str, stage: dict[str, Any]
    ) -> AttnResGPTModel:
        """The Kimi Linear chunk (the given vocabulary, not the preset's)."""
        return build_kimi_linear_model(
            config,
            vocab_size=inputs.vocab_size,
            max_sequence_length=inputs.max_sequence_length,
            transformer_impl=impl,
            **stage,
        )


MODEL_FAMILIES: Mapping[str, ModelFamily] = MappingProxyType(
    {
        "gpt": GPTFamily("gpt", "AttnRes GPT"),
        **{name: KimiLinearFamily(name, name, MappingProxyType(PRESETS[name])) for name in sorted(PRESETS)},
    }
)


def model_family(name: str) -> ModelFamily:
    """The registry entry of ``--model name``; ``ValueError`` for an unknown name."""
    try:
        return MODEL_FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown --model {name!r}; choose one of {', '.join(MODEL_FAMILIES)}.") from None


def model_shape_from_flags(name: str) -> bool:
    """Whether ``--model name`` takes its shape from the flags (False for a preset or an unknown name)."""
    family = MODEL_FAMILIES.get(name)
    return family is not None and family.shape_from_flags

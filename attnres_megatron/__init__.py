"""attnres-megatron: Attention Residuals (arXiv 2603.15031) for Megatron-Core."""

__version__ = "0.1.0"

from attnres_megatron.training.quiet import quiet_entry_point  # noqa: E402

quiet_entry_point()  # the CLIs hide known upstream warnings before Megatron-Core is imported

from attnres_megatron.compat.versions import check_megatron_core_version  # noqa: E402

check_megatron_core_version()  # a clear ImportError before megatron-core itself is imported

from attnres_megatron.config import AttnResTransformerConfig  # noqa: E402
from attnres_megatron.layers.depth_attention import DepthAttention  # noqa: E402
from attnres_megatron.layers.transformer_block import AttnResTransformerBlock  # noqa: E402
from attnres_megatron.layers.transformer_layer import AttnResTransformerLayer  # noqa: E402
from attnres_megatron.models.gpt import AttnResGPTModel  # noqa: E402
from attnres_megatron.models.specs import (  # noqa: E402
    get_gpt_decoder_block_spec,
    get_gpt_layer_spec,
    with_attention_residuals,
)

__all__ = [
    "AttnResGPTModel",
    "AttnResTransformerBlock",
    "AttnResTransformerConfig",
    "AttnResTransformerLayer",
    "DepthAttention",
    "get_gpt_decoder_block_spec",
    "get_gpt_layer_spec",
    "with_attention_residuals",
]

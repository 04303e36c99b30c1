"""AttnRes GPT: Megatron-Core's ``GPTModel`` with an AttnRes transformer block."""

from __future__ import annotations

from megatron.core.models.gpt.gpt_model import GPTModel

from attnres_megatron.config import AttnResTransformerConfig
from attnres_megatron.layers.transformer_block import AttnResTransformerBlock


class AttnResGPTModel(GPTModel):
    """``GPTModel`` whose decoder threads AttnRes depth state.

    Takes exactly ``GPTModel``'s arguments. Pass a layer spec from
    :func:`attnres_megatron.models.specs.get_gpt_layer_spec` (or any spec converted with
    ``with_attention_residuals``) and an :class:`AttnResTransformerConfig`. With
    ``attention_residuals='none'`` the model is identical to ``GPTModel``.
    """

    def __init__(self, config: AttnResTransformerConfig, *args, **kwargs):
        if not isinstance(config, AttnResTransformerConfig):
            raise TypeError(
                "AttnResGPTModel needs an AttnResTransformerConfig; build one with the same "
                "fields as your TransformerConfig plus attention_residuals=..."
            )
        super().__init__(config, *args, **kwargs)
        AttnResTransformerBlock.adopt(self.decoder)

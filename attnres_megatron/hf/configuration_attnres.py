"""Hugging Face configuration of an attnres-megatron GPT (``model_type`` ``attnres_gpt``).

Standalone: imports only transformers, so an exported directory loads where attnres-megatron and
Megatron are not installed (``AutoConfig.from_pretrained(directory, trust_remote_code=True)``).

Attention Residuals fields, in the convention inference engines read:

* ``attn_res_block_size``: transformer **layers** per depth block (Block AttnRes); absent or None
  with ``attn_res_full`` false means standard residuals. The bank write happens before the
  attention of every layer with ``layer_idx % attn_res_block_size == 0``; layer 0 writes the
  embedding.
* ``attn_res_full``: this project's extra field for Full AttnRes, where every sublayer (attention
  and MLP each) closes a block. The layer-counted field cannot express it, so it stays None there.
* ``attn_res_eps``: epsilon of the key RMS normalisation (the value the model was trained with).
"""

from __future__ import annotations

from typing import Any, Optional

from transformers import PretrainedConfig

NORMALIZATIONS = ("RMSNorm", "LayerNorm")
POSITION_EMBEDDINGS = ("rope", "learned_absolute", "none")


class AttnResConfig(PretrainedConfig):
    """A PreNorm decoder (Megatron-Core's GPT) whose residual stream may be replaced by AttnRes."""

    model_type = "attnres_gpt"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_size: int = 128,
        intermediate_size: int = 512,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        hidden_act: str = "gelu",
        gated_mlp: bool = False,
        attention_bias: bool = False,
        attention_out_bias: bool = False,
        mlp_bias: bool = False,
        normalization: str = "RMSNorm",
        norm_eps: float = 1e-5,
        qk_norm: bool = False,
        position_embedding_type: str = "rope",
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        attn_res_block_size: Optional[int] = None,
        attn_res_full: bool = False,
        attn_res_eps: Optional[float] = None,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.gated_mlp = gated_mlp
        self.attention_bias = attention_bias
        self.attention_out_bias = attention_out_bias
        self.mlp_bias = mlp_bias
        self.normalization = normalization
        self.norm_eps = norm_eps
        self.qk_norm = qk_norm
        self.position_embedding_type = position_embedding_type
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.attn_res_block_size = attn_res_block_size
        self.attn_res_full = attn_res_full
        self.attn_res_eps = norm_eps if attn_res_eps is None else attn_res_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self._check()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _check(self) -> None:
        """Refuse values the modeling file cannot run, naming the field."""
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {self.normalization!r}.")
        if self.position_embedding_type not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"position_embedding_type must be one of {POSITION_EMBEDDINGS}; got "
                f"{self.position_embedding_type!r}."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads.")
        block = self.attn_res_block_size
        if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
            raise ValueError(f"attn_res_block_size counts layers per block (an integer >= 1); got {block!r}.")
        if self.attn_res_full and block is not None:
            raise ValueError("attn_res_full (every sublayer a block) leaves attn_res_block_size None.")

    @property
    def attn_res_enabled(self) -> bool:
        """Whether AttnRes replaces the residual stream (Block or Full)."""
        return bool(self.attn_res_full) or self.attn_res_block_size is not None

    @property
    def attn_res_sublayers_per_block(self) -> Optional[int]:
        """Sublayers per depth block: 1 (Full), twice the layers per block (Block), None (off)."""
        if self.attn_res_full:
            return 1
        return None if self.attn_res_block_size is None else 2 * self.attn_res_block_size

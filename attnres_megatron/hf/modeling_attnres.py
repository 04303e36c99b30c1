"""Hugging Face causal LM of an attnres-megatron GPT, with Attention Residuals (arXiv 2603.15031).

Standalone: imports only torch and transformers (and its sibling configuration file), so an exported
directory runs where attnres-megatron and Megatron are not installed:
``AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)``, then ``generate()``.

The math follows the project's DESIGN (section 1). Sublayers (attention and MLP each) are numbered
j = 0 .. 2L-1. The sources are the embedding b0, the completed blocks and the current block's
partial sum (absent at a block's start). Before sublayer j, when j > 0 and j is a multiple of S
(sublayers per block), the partial sum becomes a completed block. Each sublayer reads

    softmax_i(w_j . (g_j * v_i / rms(v_i))) over the sources v_i, mixing the raw v_i (fp32),

runs its own pre-norm and adds its raw output to the partial sum; after the last sublayer one
more mix over all sources feeds the final norm. With S = 2 * ``attn_res_block_size`` the block
boundary falls before the attention of every layer with ``layer_idx % attn_res_block_size == 0``.
Depth mixing is per token, so decoding needs no cache of its own: only attention keeps its keys
and values in transformers' cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_attnres import AttnResConfig

# transformers 5 calls the attention cache ``cache`` (``past_key_values`` before it); outputs carry it there.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in fp32 and cast back to the input's dtype."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """Normalise the last dimension of ``x``."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class PseudoQuery(nn.Linear):
    """A sublayer's pseudo-query ``w`` as a bias-free ``Linear(h, 1)`` (weight ``[1, h]``, zero at init)."""

    def __init__(self, size: int) -> None:
        super().__init__(size, 1, bias=False)


def make_norm(config: AttnResConfig, size: int) -> nn.Module:
    """The model's pre-norm type (RMSNorm or LayerNorm) over ``size`` features."""
    if config.normalization == "LayerNorm":
        return nn.LayerNorm(size, eps=config.norm_eps)
    return RMSNorm(size, config.norm_eps)


def depth_mix(sources: list[Tensor], norm: RMSNorm, query: PseudoQuery) -> Tensor:
    """Softmax over sources of ``query . norm(v)``, mixing the raw sources; fp32, cast back."""
    values = torch.stack(sources).float()  # [n, b, s, h]
    logits = F.linear(norm(values), query.weight.float()).squeeze(-1)  # [n, b, s]
    weights = torch.softmax(logits, dim=0)
    return (weights.unsqueeze(-1) * values).sum(0).to(sources[0].dtype)


class DepthBank:
    """The sources of the depth mixes: completed blocks (the embedding first) and the partial sum."""

    def __init__(self, embedding: Tensor) -> None:
        self.blocks = [embedding]
        self.partial: Optional[Tensor] = None

    def seal(self) -> None:
        """Close the current block: its partial sum becomes a completed block."""
        if self.partial is not None:
            self.blocks.append(self.partial)
            self.partial = None

    def sources(self) -> list[Tensor]:
        """Completed blocks, then the partial sum when there is one."""
        return self.blocks + ([self.partial] if self.partial is not None else [])

    def add(self, output: Tensor) -> None:
        """Add a sublayer's raw output to the partial sum."""
        self.partial = output if self.partial is None else self.partial + output


def rotary_tables(
    position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Cosines and sines ``[b, 1, s, head_dim]`` of rotate-half RoPE at ``position_ids`` ``[b, s]``."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    freqs = position_ids[..., None].float() * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[b, heads, s, d]`` by the tables (the two halves of each head pair up)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def attention_mask_4d(padding: Optional[Tensor], batch: int, query_len: int, past: int, device) -> Tensor:
    """Boolean ``[b, 1, q, k]`` mask (True: may attend): causal, without padded keys; a padded
    query attends to itself only, so no row is empty."""
    keys = torch.arange(past + query_len, device=device)
    queries = keys[past:, None]
    allowed = (keys[None, :] <= queries).expand(batch, 1, query_len, past + query_len)
    if padding is None:
        return allowed
    allowed = allowed & padding[:, None, None, : past + query_len].bool()
    return allowed | (keys[None, :] == queries)


def default_positions(padding: Optional[Tensor], batch: int, length: int, past: int, device) -> Tensor:
    """Positions ``[b, length]`` of the new tokens: counted over the unpadded tokens of ``padding``
    (left padding starts every row at 0), else ``past`` on."""
    if padding is None:
        return (torch.arange(length, device=device) + past).unsqueeze(0).expand(batch, -1)
    return (padding.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]


class AttnResAttention(nn.Module):
    """Causal self-attention with grouped key/value heads, optional RoPE and query/key norms."""

    def __init__(self, config: AttnResConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = make_norm(config, self.head_dim)
            self.k_norm = make_norm(config, self.head_dim)

    def _heads(self, projection: nn.Linear, x: Tensor, norm: Optional[nn.Module]) -> Tensor:
        """``[b, s, h]`` -> ``[b, heads, s, d]``, normalised per head when ``norm`` is given."""
        out = projection(x).view(*x.shape[:2], -1, self.head_dim)
        return (norm(out) if norm is not None else out).transpose(1, 2)

    def forward(
        self, x: Tensor, rotary: Optional[tuple[Tensor, Tensor]], mask: Optional[Tensor], cache
    ) -> Tensor:
        """Attention of ``x`` ``[b, s, h]`` over the cached and new keys; ``mask`` None: plain causal."""
        query = self._heads(self.q_proj, x, getattr(self, "q_norm", None))
        key = self._heads(self.k_proj, x, getattr(self, "k_norm", None))
        value = self._heads(self.v_proj, x, None)
        if rotary is not None:
            query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if self.kv_heads != self.heads:
            key = key.repeat_interleave(self.heads // self.kv_heads, dim=1)
            value = value.repeat_interleave(self.heads // self.kv_heads, dim=1)
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=mask is None, scale=1.0 / math.sqrt(self.head_dim)
        )
        return self.o_proj(context.transpose(1, 2).reshape(*x.shape[:2], -1))


class AttnResMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` (gated) or ``down(act(up(x)))``."""

    def __init__(self, config: AttnResConfig) -> None:
        super().__init__()
        hidden, width = config.hidden_size, config.intermediate_size
        if config.gated_mlp:
            self.gate_proj = nn.Linear(hidden, width, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden, width, bias=config.mlp_bias)
        self.down_proj = nn.Linear(width, hidden, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        """The MLP of ``x`` ``[b, s, h]``."""
        if hasattr(self, "gate_proj"):
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class AttnResDecoderLayer(nn.Module):
    """Attention and MLP sublayers, each with its pre-norm and (with AttnRes) its depth mixer."""

    def __init__(self, config: AttnResConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = make_norm(config, config.hidden_size)
        self.self_attn = AttnResAttention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config, config.hidden_size)
        self.mlp = AttnResMLP(config)
        if config.attn_res_enabled:
            self.self_attention_res_norm = RMSNorm(config.hidden_size, config.attn_res_eps)
            self.self_attention_res_proj = PseudoQuery(config.hidden_size)
            self.mlp_res_norm = RMSNorm(config.hidden_size, config.attn_res_eps)
            self.mlp_res_proj = PseudoQuery(config.hidden_size)

    def attention(self, x: Tensor, **kwargs: Any) -> Tensor:
        """The attention sublayer's raw output (its pre-norm, then attention)."""
        return self.self_attn(self.input_layernorm(x), **kwargs)

    def feed_forward(self, x: Tensor) -> Tensor:
        """The MLP sublayer's raw output (its pre-norm, then the MLP)."""
        return self.mlp(self.post_attention_layernorm(x))

    def forward(self, hidden: Tensor, **kwargs: Any) -> Tensor:
        """Standard residuals: ``h + attention(h)``, then ``h + mlp(h)``."""
        hidden = hidden + self.attention(hidden, **kwargs)
        return hidden + self.feed_forward(hidden)

    def forward_attn_res(self, bank: DepthBank, sublayers_per_block: int, **kwargs: Any) -> None:
        """Both sublayers on the depth bank: seal at block starts, mix, run, add to the partial sum."""
        sublayers = (
            (
                self.self_attention_res_norm,
                self.self_attention_res_proj,
                lambda x: self.attention(x, **kwargs),
            ),
            (self.mlp_res_norm, self.mlp_res_proj, self.feed_forward),
        )
        for offset, (norm, query, run) in enumerate(sublayers):
            sublayer = 2 * self.layer_idx + offset
            if sublayer > 0 and sublayer % sublayers_per_block == 0:
                bank.seal()
            bank.add(run(depth_mix(bank.sources(), norm, query)))


class AttnResPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading settings shared by the base model and the LM."""

    config_class = AttnResConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["AttnResDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) linears and embeddings, zero biases and pseudo-queries, unit norms."""
        std = self.config.initializer_range
        if isinstance(module, PseudoQuery):
            module.weight.zero_()  # AttnRes starts as the mean of its sources
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


class AttnResModel(AttnResPreTrainedModel):
    """Embeddings, decoder layers, the final depth mix (AttnRes) and the final norm."""

    def __init__(self, config: AttnResConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(AttnResDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        if config.attn_res_enabled:
            self.output_attn_res_norm = RMSNorm(config.hidden_size, config.attn_res_eps)
            self.output_attn_res_proj = PseudoQuery(config.hidden_size)
        self.norm = make_norm(config, config.hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _embed(
        self, input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor], position_ids: Tensor
    ) -> Tensor:
        """Token embeddings plus learned positions (when the model has them)."""
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if hasattr(self, "embed_positions"):
            hidden = hidden + self.embed_positions(position_ids)
        return hidden

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        cache: Optional[Any] = None,
        inputs_embeds: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        past_key_values: Optional[Any] = None,
        **_: Any,
    ) -> BaseModelOutputWithPast:
        """Final-norm hidden states ``[b, s, h]``; ``cache`` (``past_key_values``) keeps attention's keys."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device = self.embed_tokens.weight.device
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = default_positions(attention_mask, batch, length, past, device)
        hidden = self._embed(input_ids, inputs_embeds, position_ids)
        mask = None
        if attention_mask is not None or past > 0:
            mask = attention_mask_4d(attention_mask, batch, length, past, device)
        rotary = None
        if self.config.position_embedding_type == "rope":
            rotary = rotary_tables(position_ids, self.config.head_dim, self.config.rope_theta, hidden.dtype)
        kwargs = dict(rotary=rotary, mask=mask, cache=cache if use_cache else None)
        hidden = self._decode(hidden, kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), **{CACHE_FIELD: cache})

    def _decode(self, hidden: Tensor, kwargs: dict) -> Tensor:
        """The decoder layers on the embeddings: residual stream, or the AttnRes depth bank."""
        if not self.config.attn_res_enabled:
            for layer in self.layers:
                hidden = layer(hidden, **kwargs)
            return hidden
        bank = DepthBank(hidden)
        for layer in self.layers:
            layer.forward_attn_res(bank, self.config.attn_res_sublayers_per_block, **kwargs)
        return depth_mix(bank.sources(), self.output_attn_res_norm, self.output_attn_res_proj)


class AttnResForCausalLM(AttnResPreTrainedModel, GenerationMixin):
    """The model with its output layer (its own, or the input embedding when ``tie_word_embeddings``)."""

    def __init__(self, config: AttnResConfig) -> None:
        super().__init__(config)
        self.model = AttnResModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> Optional[nn.Linear]:
        return getattr(self, "lm_head", None)

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        cache: Optional[Any] = None,
        inputs_embeds: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: Union[int, Tensor] = 0,
        past_key_values: Optional[Any] = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits ``[b, s, vocab]`` (the last ``logits_to_keep`` positions when given), and the
        next-token loss when ``labels`` are given."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, Tensor):
            hidden = hidden[:, logits_to_keep]
        weight = self.lm_head.weight if hasattr(self, "lm_head") else self.model.embed_tokens.weight
        logits = F.linear(hidden, weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)}
        )

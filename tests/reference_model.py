"""Independent plain-PyTorch GPT with Attention Residuals (DESIGN section 1).

Uses neither Megatron-Core nor plugin code: it reads weights from a dict keyed by the
plugin model's parameter names and recomputes everything with torch primitives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def depth_mix(sources: list[torch.Tensor], query: torch.Tensor, gain: torch.Tensor, eps: float):
    """softmax_i(w . (g * v_i / rms(v_i))) over sources, then the weighted sum of raw v_i."""
    values = torch.stack(sources)
    logits = torch.einsum("nsbh,h->nsb", rms_norm(values, gain, eps), query)
    weights = torch.softmax(logits, dim=0)
    return torch.einsum("nsb,nsbh->sbh", weights, values)


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate-half rotary embedding of x [s, b, heads, d] by absolute position."""
    seq, dim = x.shape[0], x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def attention(weights: dict, prefix: str, x: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    seq, batch, hidden = x.shape
    head_dim = hidden // heads
    h = rms_norm(x, weights[f"{prefix}.input_layernorm.weight"], eps)
    qkv = h @ weights[f"{prefix}.self_attention.linear_qkv.weight"].T
    qkv = qkv.view(seq, batch, heads, 3 * head_dim)
    q, k, v = qkv.split(head_dim, dim=-1)
    q, k = rope(q), rope(k)
    scores = torch.einsum("sbnd,tbnd->bnst", q, k) / head_dim**0.5
    causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    context = torch.einsum("bnst,tbnd->sbnd", probs, v).reshape(seq, batch, hidden)
    return context @ weights[f"{prefix}.self_attention.linear_proj.weight"].T


def swiglu_mlp(weights: dict, prefix: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    h = rms_norm(x, weights[f"{prefix}.pre_mlp_layernorm.weight"], eps)
    gate, up = (h @ weights[f"{prefix}.mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ weights[f"{prefix}.mlp.linear_fc2.weight"].T


def attnres_gpt_logits(
    weights: dict,
    tokens: torch.Tensor,
    num_layers: int,
    heads: int,
    sublayers_per_block: int,
    attn_res_eps: float | None = None,
    norm_eps: float = 1e-5,
) -> torch.Tensor:
    """Logits [b, s, vocab] of the AttnRes GPT for tokens [b, s] (``attn_res_eps`` None: ``norm_eps``)."""
    attn_res_eps = norm_eps if attn_res_eps is None else attn_res_eps
    embedding = weights["embedding.word_embeddings.weight"][tokens].transpose(0, 1)
    blocks, partial = [embedding], None
    for sublayer in range(2 * num_layers):
        if sublayer > 0 and sublayer % sublayers_per_block == 0:
            blocks, partial = blocks + [partial], None
        layer, is_mlp = divmod(sublayer, 2)
        prefix = f"decoder.layers.{layer}"
        mixer = f"{prefix}.attn_res_{'mlp' if is_mlp else 'attention'}"
        sources = blocks + ([partial] if partial is not None else [])
        x = depth_mix(sources, weights[f"{mixer}.pseudo_query"], weights[f"{mixer}.key_gain"], attn_res_eps)
        out = (
            swiglu_mlp(weights, prefix, x, norm_eps)
            if is_mlp
            else attention(weights, prefix, x, heads, norm_eps)
        )
        partial = out if partial is None else partial + out
    final = depth_mix(
        blocks + [partial],
        weights["decoder.attn_res_final.pseudo_query"],
        weights["decoder.attn_res_final.key_gain"],
        attn_res_eps,
    )
    hidden = rms_norm(final, weights["decoder.final_layernorm.weight"], norm_eps)
    return (hidden @ weights["output_layer.weight"].T).transpose(0, 1)

"""Tensor names and layouts between attnres-megatron's GPT and its Hugging Face export (pure torch).

Megatron-Core fuses the query/key/value projections into ``linear_qkv`` (per key/value group: the
group's query heads, then its key head, then its value head) and the SwiGLU gate and up
projections into ``linear_fc1`` (gate first). The Hugging Face names are Llama's, split per
projection; the AttnRes names are the inference engines' convention (Megatron-Core -> Hugging Face;
per layer ``decoder.layers.{i}.`` -> ``model.layers.{i}.``; ``.bias`` beside ``.weight`` where the
model has biases):

* ``embedding.word_embeddings`` -> ``model.embed_tokens``; ``embedding.position_embeddings``
  (learned positions) -> ``model.embed_positions``
* ``input_layernorm`` -> ``input_layernorm``; ``pre_mlp_layernorm`` -> ``post_attention_layernorm``
* ``self_attention.linear_qkv`` -> ``self_attn.q_proj``, ``self_attn.k_proj``, ``self_attn.v_proj``
* ``self_attention.q_layernorm`` / ``k_layernorm`` -> ``self_attn.q_norm`` / ``k_norm``
* ``self_attention.linear_proj`` -> ``self_attn.o_proj``
* ``mlp.linear_fc1`` -> ``mlp.gate_proj`` and ``mlp.up_proj`` (SwiGLU), or ``mlp.up_proj`` (GeLU)
* ``mlp.linear_fc2`` -> ``mlp.down_proj``
* ``attn_res_attention.key_gain`` [h] -> ``self_attention_res_norm.weight`` [h]
* ``attn_res_attention.pseudo_query`` [h] -> ``self_attention_res_proj.weight`` [1, h]
* ``attn_res_mlp.key_gain`` / ``pseudo_query`` -> ``mlp_res_norm.weight`` / ``mlp_res_proj.weight``
* ``decoder.final_layernorm`` -> ``model.norm``
* ``decoder.attn_res_final.key_gain`` / ``pseudo_query`` -> ``model.output_attn_res_norm.weight`` /
  ``model.output_attn_res_proj.weight``
* ``output_layer.weight`` (untied only) -> ``lm_head.weight``

Every conversion only slices, concatenates or reshapes, so values and dtypes are kept bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Shapes:
    """What splitting the fused tensors needs: heads, key/value groups, head size, gated MLP."""

    num_heads: int
    num_groups: int
    head_dim: int
    gated_mlp: bool

    @classmethod
    def of(cls, config: Mapping) -> Shapes:
        """From a Hugging Face config (``AttnResConfig`` fields as a dict)."""
        heads = config["num_attention_heads"]
        return cls(
            num_heads=heads,
            num_groups=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            gated_mlp=bool(config.get("gated_mlp")),
        )


Split = Callable[[Tensor, Shapes], list[Tensor]]
Merge = Callable[[list[Tensor], Shapes], Tensor]


def _qkv_sizes(shapes: Shapes) -> list[int]:
    """Rows of one key/value group in ``linear_qkv``: its query heads, its key head, its value head."""
    per_group = shapes.num_heads // shapes.num_groups
    return [per_group * shapes.head_dim, shapes.head_dim, shapes.head_dim]


def split_qkv(fused: Tensor, shapes: Shapes) -> list[Tensor]:
    """``linear_qkv`` rows (group-interleaved) -> query, key and value rows."""
    grouped = fused.reshape(shapes.num_groups, -1, *fused.shape[1:])
    parts = grouped.split(_qkv_sizes(shapes), dim=1)
    return [part.reshape(-1, *fused.shape[1:]) for part in parts]


def merge_qkv(parts: list[Tensor], shapes: Shapes) -> Tensor:
    """Query, key and value rows -> ``linear_qkv`` rows (group-interleaved)."""
    grouped = [part.reshape(shapes.num_groups, -1, *part.shape[1:]) for part in parts]
    fused = torch.cat(grouped, dim=1)
    return fused.reshape(-1, *fused.shape[2:])


def split_fc1(fused: Tensor, shapes: Shapes) -> list[Tensor]:
    """``linear_fc1`` -> gate and up rows (SwiGLU), or the up rows alone."""
    return list(fused.chunk(2, dim=0)) if shapes.gated_mlp else [fused]


def merge_fc1(parts: list[Tensor], shapes: Shapes) -> Tensor:
    """Gate and up rows (or the up rows alone) -> ``linear_fc1``."""
    return torch.cat(parts, dim=0) if shapes.gated_mlp else parts[0]


def _same(tensor: Tensor, shapes: Shapes) -> list[Tensor]:
    """The tensor as it is (a one-to-one rename)."""
    return [tensor]


def _first(parts: list[Tensor], shapes: Shapes) -> Tensor:
    """The one part as it is (a one-to-one rename)."""
    return parts[0]


def _as_row(tensor: Tensor, shapes: Shapes) -> list[Tensor]:
    """A pseudo-query ``[h]`` as the weight ``[1, h]`` of a bias-free ``Linear(h, 1)``."""
    return [tensor.reshape(1, -1)]


def _as_vector(parts: list[Tensor], shapes: Shapes) -> Tensor:
    """A ``Linear(h, 1)`` weight ``[1, h]`` as the pseudo-query ``[h]``."""
    return parts[0].reshape(-1)


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor, the names of the Hugging Face tensor(s) it becomes, and both directions."""

    megatron: str
    hf: Callable[[Shapes], tuple[str, ...]]
    split: Split = _same
    merge: Merge = _first


def _fixed(*names: str) -> Callable[[Shapes], tuple[str, ...]]:
    """Names that do not depend on the shapes."""
    return lambda shapes: names


def _renamed(megatron: str, hf: str) -> list[Rule]:
    """``.weight`` and ``.bias`` of a module renamed as a whole."""
    return [Rule(f"{megatron}.{kind}", _fixed(f"{hf}.{kind}")) for kind in ("weight", "bias")]


def _fc1_names(kind: str) -> Callable[[Shapes], tuple[str, ...]]:
    """``mlp.gate_proj`` and ``mlp.up_proj`` (SwiGLU) or ``mlp.up_proj`` alone."""
    return lambda shapes: tuple(
        f"mlp.{proj}.{kind}" for proj in (("gate_proj", "up_proj") if shapes.gated_mlp else ("up_proj",))
    )


LAYER_RULES: tuple[Rule, ...] = (
    *_renamed("input_layernorm", "input_layernorm"),
    *[
        Rule(
            f"self_attention.linear_qkv.{kind}",
            _fixed(*(f"self_attn.{p}_proj.{kind}" for p in "qkv")),
            split_qkv,
            merge_qkv,
        )
        for kind in ("weight", "bias")
    ],
    *_renamed("self_attention.q_layernorm", "self_attn.q_norm"),
    *_renamed("self_attention.k_layernorm", "self_attn.k_norm"),
    *_renamed("self_attention.linear_proj", "self_attn.o_proj"),
    *_renamed("pre_mlp_layernorm", "post_attention_layernorm"),
    *[Rule(f"mlp.linear_fc1.{kind}", _fc1_names(kind), split_fc1, merge_fc1) for kind in ("weight", "bias")],
    *_renamed("mlp.linear_fc2", "mlp.down_proj"),
    Rule("attn_res_attention.key_gain", _fixed("self_attention_res_norm.weight")),
    Rule("attn_res_attention.pseudo_query", _fixed("self_attention_res_proj.weight"), _as_row, _as_vector),
    Rule("attn_res_mlp.key_gain", _fixed("mlp_res_norm.weight")),
    Rule("attn_res_mlp.pseudo_query", _fixed("mlp_res_proj.weight"), _as_row, _as_vector),
)
MODEL_RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", _fixed("model.embed_tokens.weight")),
    Rule("embedding.position_embeddings.weight", _fixed("model.embed_positions.weight")),
    *_renamed("decoder.final_layernorm", "model.norm"),
    Rule("decoder.attn_res_final.key_gain", _fixed("model.output_attn_res_norm.weight")),
    Rule(
        "decoder.attn_res_final.pseudo_query",
        _fixed("model.output_attn_res_proj.weight"),
        _as_row,
        _as_vector,
    ),
    Rule("output_layer.weight", _fixed("lm_head.weight")),
)
MODEL_BY_MEGATRON = {rule.megatron: rule for rule in MODEL_RULES}
LAYER_BY_MEGATRON = {rule.megatron: rule for rule in LAYER_RULES}
MEGATRON_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class MappingError(ValueError):
    """Tensors without a counterpart in the other convention (named in the message)."""


def to_hf(state: Mapping[str, Tensor], shapes: Shapes) -> dict[str, Tensor]:
    """Megatron-Core tensors (a whole, unsplit GPT) -> Hugging Face tensors, each its own copy."""
    out: dict[str, Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        match = MEGATRON_LAYER.match(name)
        rule = LAYER_BY_MEGATRON.get(match.group(2)) if match else MODEL_BY_MEGATRON.get(name)
        if rule is None:
            unknown.append(name)
            continue
        prefix = f"model.layers.{match.group(1)}." if match else ""
        for hf_name, part in zip(rule.hf(shapes), rule.split(tensor, shapes), strict=True):
            out[prefix + hf_name] = part.detach().clone().contiguous()
    if unknown:
        raise MappingError(
            f"no Hugging Face name for {len(unknown)} tensor(s): {', '.join(sorted(unknown)[:6])}"
        )
    return out


def to_megatron(tensors: Mapping[str, Tensor], shapes: Shapes) -> dict[str, Tensor]:
    """Hugging Face tensors -> Megatron-Core tensors (the inverse of :func:`to_hf`): every tensor is
    used, and a fused tensor needs all its parts."""
    left = dict(tensors)
    layers = sorted({int(match.group(1)) for match in map(HF_LAYER.match, tensors) if match})
    candidates = [(rule, rule.megatron, "") for rule in MODEL_RULES] + [
        (rule, f"decoder.layers.{i}.{rule.megatron}", f"model.layers.{i}.")
        for i in layers
        for rule in LAYER_RULES
    ]
    out: dict[str, Tensor] = {}
    for rule, megatron_name, prefix in candidates:
        names = [prefix + name for name in rule.hf(shapes)]
        missing = [name for name in names if name not in left]
        if len(missing) == len(names):
            continue
        if missing:
            raise MappingError(f"{megatron_name} needs {', '.join(names)}; missing {', '.join(missing)}")
        out[megatron_name] = rule.merge([left.pop(name) for name in names], shapes).contiguous()
    if left:
        raise MappingError(f"no Megatron-Core name for {len(left)} tensor(s): {', '.join(sorted(left)[:6])}")
    return out

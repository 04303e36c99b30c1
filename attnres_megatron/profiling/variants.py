"""Per-variant arguments: the same model with standard residuals, Block or Full AttnRes."""

from __future__ import annotations

import argparse
import copy

from attnres_megatron.models.families import model_family

BLOCK_SIZE_FLAGS = ("attn_res_block_size", "attn_res_layers_per_block", "attn_res_num_blocks")


def variant_args(args: argparse.Namespace, variant: str) -> argparse.Namespace:
    """A copy of ``args`` with the depth-mixing options of ``variant`` ('none', 'block', 'full').

    Block keeps the block-size flag the user gave; without one a Kimi Linear preset keeps its
    own S and a GPT gets ``--attn-res-num-blocks min(8, layers)``.
    """
    out = copy.copy(args)
    given = {name: getattr(args, name) for name in BLOCK_SIZE_FLAGS if getattr(args, name) is not None}
    for name in BLOCK_SIZE_FLAGS:
        setattr(out, name, None)
    if variant == "block":
        if given:
            out.__dict__.update(given)
        elif not model_family(args.model).shape_from_flags:
            out.attention_residuals = None  # the preset's own Block AttnRes
            return out
        else:
            out.attn_res_num_blocks = min(8, args.num_layers)
    out.attention_residuals = variant
    return out

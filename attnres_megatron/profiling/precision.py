"""Requested vs used precision: FP8 through Transformer Engine, or bf16/fp32.

FP8 runs Megatron's TE layer spec with ``TransformerConfig.fp8`` (format) and
``fp8_recipe`` set; ``AttnResTransformerBlock`` opens Megatron's ``fp8_autocast`` context
around its layers. ``fp8_autocast`` only changes how TE modules run their GEMMs: the AttnRes
aggregation is plain PyTorch (``ops.aggregate``), computes its logits, softmax and weighted
sum in fp32 and never goes through a TE GEMM, so its statistics stay fp32 under FP8.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from megatron.core.enums import Fp8Recipe

from attnres_megatron.models.specs import transformer_engine_available
from attnres_megatron.ops.reference import compute_dtype

FP8_FORMATS = ("hybrid", "e4m3")
# 'custom' needs a quantizer factory import path; the profiler offers Megatron's built-in recipes.
FP8_RECIPES = tuple(recipe.value for recipe in Fp8Recipe if recipe is not Fp8Recipe.custom)


@dataclass
class PrecisionPlan:
    """What the user asked for, what the profile runs in, and why they differ."""

    requested: str
    used: str
    fp8_format: Optional[str] = None
    fp8_recipe: Optional[str] = None
    fallback_reason: Optional[str] = None
    attn_res_statistics_dtype: str = "float32"

    @property
    def fp8(self) -> bool:
        """Whether the profile runs with FP8 GEMMs."""
        return self.used.startswith("fp8")

    def config_fields(self) -> dict:
        """``TransformerConfig`` fields that switch FP8 on (empty unless FP8 is used)."""
        return dict(fp8=self.fp8_format, fp8_recipe=self.fp8_recipe) if self.fp8 else {}

    def as_dict(self) -> dict:
        """The JSON form for the report."""
        return asdict(self)


def fp8_blockers(device: str, transformer_impl: str, recipe: str) -> list[str]:
    """Everything missing for FP8 on this machine (empty when FP8 can run)."""
    missing = []
    if not transformer_engine_available():
        missing.append("Transformer Engine is not installed")
    if device != "cuda" or not torch.cuda.is_available():
        missing.append("no CUDA GPU is in use (FP8 GEMMs run on GPUs only)")
    elif recipe == Fp8Recipe.mxfp8.value and torch.cuda.get_device_capability()[0] < 10:
        missing.append("--fp8-recipe mxfp8 needs a Blackwell GPU (compute capability 10.x)")
    if transformer_impl == "local":
        missing.append("--transformer-impl local has no FP8 GEMMs")
    return missing


def fp8_name(fp8_format: str, recipe: str) -> str:
    """Short label such as ``fp8-hybrid/delayed``."""
    return f"fp8-{fp8_format}/{recipe}"


def resolve_precision(args: argparse.Namespace, device: str) -> PrecisionPlan:
    """Decide the precision; FP8 that cannot run stops with what is missing and the fix,
    unless ``--fallback-bf16`` (then bf16, recorded). Sets ``args.bf16`` for FP8 and fallback."""
    base = "bf16" if args.bf16 else "fp32"
    if args.fp8_format is None:
        return PrecisionPlan(requested=base, used=base, attn_res_statistics_dtype=_stats_dtype(args.bf16))
    requested = fp8_name(args.fp8_format, args.fp8_recipe)
    missing = fp8_blockers(device, args.transformer_impl, args.fp8_recipe)
    args.bf16 = True  # Megatron runs TE FP8 GEMMs from bf16 parameters
    if not missing:
        return PrecisionPlan(
            requested=requested,
            used=requested,
            fp8_format=args.fp8_format,
            fp8_recipe=args.fp8_recipe,
            attn_res_statistics_dtype=_stats_dtype(True),
        )
    reason = "; ".join(missing)
    if not args.fallback_bf16:
        raise SystemExit(
            f"error: --fp8-format {args.fp8_format} --fp8-recipe {args.fp8_recipe} needs Transformer Engine "
            f"FP8 GEMMs on a CUDA GPU, but {reason}. Fix: on a GPU machine install Transformer Engine "
            "(pip install 'attnres-megatron[te]') and use --transformer-impl transformer_engine (or auto) "
            "with --device cuda; or pass --fallback-bf16 to profile in bf16 instead."
        )
    return PrecisionPlan(
        requested=requested,
        used="bf16",
        fallback_reason=reason,
        attn_res_statistics_dtype=_stats_dtype(True),
    )


def _stats_dtype(bf16: bool) -> str:
    """dtype of the AttnRes logits/softmax/accumulation for bf16 or fp32 activations."""
    return str(compute_dtype(torch.bfloat16 if bf16 else torch.float32)).replace("torch.", "")

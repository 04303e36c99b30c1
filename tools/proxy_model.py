"""The dense GPT proxy the step-time and memory benchmarks share (not a command).

Variants are the same model with standard residuals (``baseline``), Block AttnRes with
``N`` blocks (``block``) or Full AttnRes (``full``); ``impl`` picks the aggregation and
``recompute`` one of :data:`RECOMPUTE` (all variants get Megatron's own settings; AttnRes
variants add their ``attn_res`` module under ``selective``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnres_megatron import AttnResTransformerConfig
from attnres_megatron.models.builder import build_gpt_model

VOCAB = 32000
RECOMPUTE = {
    "none": {},
    "selective": dict(recompute_granularity="selective", recompute_modules=["attn_res"]),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ProxyShape:
    """Model and batch sizes of the proxy."""

    layers: int = 16
    hidden: int = 512
    heads: int = 8
    seq: int = 512
    batch: int = 1
    blocks: int = 8

    @property
    def ffn(self) -> int:
        return 4 * self.hidden

    def stream_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one ``[s, b, h]`` tensor."""
        return self.seq * self.batch * self.hidden * torch.empty(0, dtype=dtype).element_size()


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    """The proxy's shape flags (defaults: the 16-layer proxy)."""
    defaults = ProxyShape()
    for name in ("layers", "hidden", "heads", "seq", "batch"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    parser.add_argument("--blocks", type=int, default=defaults.blocks, help="N for the Block variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="write the results as JSON to this path")


def add_variant_args(parser: argparse.ArgumentParser) -> None:
    """``--dtype`` and ``--variants`` (the AttnRes variants run besides the baseline)."""
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=("block", "full"),
        default=["block", "full"],
        help="besides the baseline",
    )


def run_info(device: str) -> dict[str, Any]:
    """Device name, threads, torch version and platform of a benchmark run (its JSON ``meta``)."""
    import platform

    name = device if not device.startswith("cuda") else torch.cuda.get_device_name()
    return {
        "device": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def shape_from_args(args: argparse.Namespace) -> ProxyShape:
    return ProxyShape(args.layers, args.hidden, args.heads, args.seq, args.batch, args.blocks)


def residual_fields(variant: str, shape: ProxyShape) -> dict[str, Any]:
    if variant == "baseline":
        return dict(attention_residuals="none")
    if variant == "block":
        return dict(attention_residuals="block", attn_res_num_blocks=shape.blocks)
    if variant == "full":
        return dict(attention_residuals="full")
    raise ValueError(f"unknown variant {variant!r}; use baseline, block or full.")


def recompute_fields(variant: str, recompute: str) -> dict[str, Any]:
    fields = dict(RECOMPUTE[recompute])
    if variant == "baseline" and recompute == "selective":
        fields["recompute_modules"] = ["layernorm"]  # the nearest standard-residual equivalent
    return fields


def proxy_config(
    variant: str, shape: ProxyShape, impl: str = "torch", recompute: str = "none", dtype: str = "fp32"
) -> AttnResTransformerConfig:
    """Config of one benchmark variant."""
    attn_res = residual_fields(variant, shape)
    if variant != "baseline":
        attn_res["attn_res_impl"] = impl
    params_dtype = DTYPES[dtype]
    return AttnResTransformerConfig(
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        num_attention_heads=shape.heads,
        ffn_hidden_size=shape.ffn,
        normalization="RMSNorm",
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        **attn_res,
        **recompute_fields(variant, recompute),
    )


def build_proxy(config: AttnResTransformerConfig, shape: ProxyShape, device: str) -> torch.nn.Module:
    """The proxy GPT on ``device`` in the config's parameter dtype, in training mode."""
    model = build_gpt_model(config, VOCAB, shape.seq, transformer_impl="local")
    return model.to(device=device, dtype=config.params_dtype).train()


def proxy_batch(
    shape: ProxyShape, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, position ids and next-token labels ``[b, s]``."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (shape.batch, shape.seq + 1), generator=generator)
    positions = torch.arange(shape.seq).unsqueeze(0).expand(shape.batch, -1)
    return tokens[:, :-1].to(device), positions.to(device), tokens[:, 1:].to(device)


def init_single_process(device: str, seed: int = 1234) -> None:
    """One-process Megatron world (gloo and the CPU backend on CPU, NCCL on GPU)."""
    from megatron.core import parallel_state

    from attnres_megatron.training.distributed import initialize_parallel

    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel(device, seed)


def write_json(path: str | None, result: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")

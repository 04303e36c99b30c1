"""Count Kimi Linear parameters (total and active per token) by component, without allocating them.

The model is built on PyTorch's ``meta`` device (``use_cpu_initialization=True``,
``perform_initialization=False``, under ``with torch.device('meta')``) in a 1-process gloo
world with Megatron's parallel state and the repo's CPU backend, so even the 49B release
shape builds in seconds. A few small tensors that modules place on the CPU explicitly
(KDA gates and norms, router expert bias) are real; they are counted all the same.

Active per token: every parameter except the routed experts counts fully (embedding and
output head included); routed experts count ``moe_router_topk / num_moe_experts`` of their
total. The router's aux-loss-free ``expert_bias`` is a persistent buffer (a checkpoint
tensor, not a trainable parameter) and is reported separately.

Example: ``python tools/count_parameters.py kimi-linear-48b-a3b --no-attention-residuals``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from attnres_megatron.models.kimi.kda_attention import KimiDeltaAttention  # noqa: E402
from attnres_megatron.models.kimi.presets import (  # noqa: E402
    PRESETS,
    KimiLinearConfig,
    build_kimi_linear_model,
    kimi_linear_config,
)

COMPONENTS = (
    "embedding",
    "head",
    "attention_kda",
    "attention_mla",
    "dense_mlp",
    "routed_experts",
    "shared_experts",
    "routers",
    "norms",
    "attn_res",
    "other",
)


def ensure_parallel_state() -> None:
    """A 1-process world with Megatron's parallel state (TP=PP=1) if none is up."""
    from attnres_megatron.training.distributed import start_single_process

    start_single_process("cuda" if torch.cuda.is_available() else "cpu")


def build_on_meta(config: KimiLinearConfig) -> torch.nn.Module:
    """The whole model (one pipeline stage) with parameters on the meta device."""
    ensure_parallel_state()
    config = copy.copy(config)
    config.use_cpu_initialization = True
    config.perform_initialization = False
    with torch.device("meta"):
        return build_kimi_linear_model(config)


def _component(model: torch.nn.Module, name: str) -> str:
    """Component of a parameter, from its qualified name and its layer's token mixer."""
    if name.startswith("embedding."):
        return "embedding"
    if name.startswith("output_layer."):
        return "head"
    if name.startswith("decoder.final_layernorm."):
        return "norms"
    if name.startswith("decoder.attn_res"):
        return "attn_res"
    parts = name.split(".")
    if parts[:2] != ["decoder", "layers"]:
        return "other"
    layer, rest = model.decoder.layers[int(parts[2])], parts[3:]
    if rest[0].startswith("attn_res"):
        return "attn_res"
    if rest[0] in ("input_layernorm", "pre_mlp_layernorm"):
        return "norms"
    if rest[0] == "self_attention":
        return "attention_kda" if isinstance(layer.self_attention, KimiDeltaAttention) else "attention_mla"
    if rest[0] == "mlp":
        if not getattr(layer, "is_moe_layer", False):
            return "dense_mlp"
        return {"experts": "routed_experts", "shared_experts": "shared_experts", "router": "routers"}.get(
            rest[1], "other"
        )
    return "other"


def count_model(model: torch.nn.Module, config: KimiLinearConfig) -> dict[str, Any]:
    """Totals and active-per-token counts of a built model, by component."""
    total = dict.fromkeys(COMPONENTS, 0)
    for name, param in model.named_parameters():
        total[_component(model, name)] += param.numel()
    active = dict(total)
    if config.num_moe_experts:
        routed = total["routed_experts"] * config.moe_router_topk
        if routed % config.num_moe_experts:
            raise ValueError("routed-expert parameters do not split evenly over the experts")
        active["routed_experts"] = routed // config.num_moe_experts
    parameters = dict(model.named_parameters())
    buffers = {
        name: tensor.numel()
        for name, tensor in model.state_dict().items()
        if isinstance(tensor, torch.Tensor) and name not in parameters and not name.endswith("_extra_state")
    }
    pattern = config.attention_pattern()
    return {
        "attention_residuals": config.attention_residuals,
        "attn_res_sublayers_per_block": config.attn_res_sublayers_per_block,
        "num_layers": config.num_layers,
        "mla_layers": [i + 1 for i, mixer in enumerate(pattern) if mixer == "mla"],
        "moe_layers": [i + 1 for i, moe in enumerate(config.moe_layer_freq or []) if moe],
        "total_by_component": total,
        "active_by_component": active,
        "total": sum(total.values()),
        "active": sum(active.values()),
        "total_without_embedding_and_head": sum(total.values()) - total["embedding"] - total["head"],
        "active_without_embedding_and_head": sum(active.values()) - active["embedding"] - active["head"],
        "buffers": sum(buffers.values()),
        "total_with_buffers": sum(total.values()) + sum(buffers.values()),
        "buffer_names": sorted({name.rsplit(".", 1)[-1] for name in buffers}),
    }


def count_parameters(config: KimiLinearConfig) -> dict[str, Any]:
    """Build ``config``'s model on the meta device and count its parameters (see :func:`count_model`)."""
    return count_model(build_on_meta(config), config)


def _table(name: str, counts: dict[str, Any]) -> str:
    """Human-readable table of one count."""
    mode = counts["attention_residuals"]
    if counts["attn_res_sublayers_per_block"]:
        mode += f" (S={counts['attn_res_sublayers_per_block']})"
    lines = [
        f"{name}  attention_residuals={mode}  layers={counts['num_layers']}  "
        f"MLA at {counts['mla_layers']}  MoE layers: {len(counts['moe_layers'])}",
        f"  {'component':<18}{'total':>18}{'active/token':>18}",
    ]
    for component in COMPONENTS:
        total, active = counts["total_by_component"][component], counts["active_by_component"][component]
        if total:
            lines.append(f"  {component:<18}{total:>18,}{active:>18,}")
    lines += [
        f"  {'TOTAL':<18}{counts['total']:>18,}{counts['active']:>18,}",
        f"  {'w/o emb+head':<18}{counts['total_without_embedding_and_head']:>18,}"
        f"{counts['active_without_embedding_and_head']:>18,}",
        f"  buffers ({', '.join(counts['buffer_names']) or 'none'}): {counts['buffers']:,}; "
        f"total with buffers {counts['total_with_buffers']:,}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: presets to count, AttnRes on/off, optional JSON output."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("presets", nargs="*", default=sorted(PRESETS), help="preset names (default: all)")
    parser.add_argument(
        "--no-attention-residuals",
        action="store_true",
        help="count the model with standard residuals (attention_residuals='none')",
    )
    parser.add_argument("--both", action="store_true", help="count with and without attention residuals")
    parser.add_argument("--output", type=Path, help="write the counts as JSON to this file")
    args = parser.parse_args(argv)
    unknown = [name for name in args.presets if name not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
    modes = [True, False] if args.both else [not args.no_attention_residuals]
    results: dict[str, Any] = {}
    for name in args.presets:
        for attn_res in modes:
            overrides = {} if attn_res else {"attention_residuals": "none"}
            counts = count_parameters(kimi_linear_config(name, **overrides))
            key = name if len(modes) == 1 else f"{name}{'' if attn_res else ' (no attnres)'}"
            results[key] = counts
            print(_table(key, counts), flush=True)
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

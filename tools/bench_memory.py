#!/usr/bin/env python
"""Bytes saved for backward per layer: baseline vs Block vs Full AttnRes, with and without recompute.

Measured with saved-tensor hooks during one training forward pass of the dense proxy
(``attnres_megatron.diagnostics.saved_activations``); the backward is then run so every
recompute path executes. Recompute modes: ``none``; ``selective`` (AttnRes: the ``attn_res``
module, i.e. the depth mix and the pre-norm reading it are rebuilt in backward; baseline:
Megatron's ``layernorm`` module, the nearest equivalent); ``full`` (uniform, one layer).

Target checked in the output: Block with ``selective`` recompute saves no more than the
baseline without recompute plus one ``[s, b, h]`` tensor per block boundary on the stage.

Example::

    python tools/bench_memory.py --output memory.json
"""

from __future__ import annotations

import argparse
import platform
from typing import Any, Optional

import torch
from proxy_model import (
    RECOMPUTE,
    ProxyShape,
    add_shape_args,
    build_proxy,
    init_single_process,
    proxy_batch,
    proxy_config,
    shape_from_args,
    write_json,
)

from attnres_megatron.diagnostics.saved_activations import OUTSIDE_LAYERS, measure_saved_activations

VARIANTS = ("baseline", "block", "full")


def measure(variant: str, recompute: str, shape: ProxyShape, impl: str, device: str) -> dict[str, Any]:
    config = proxy_config(variant, shape, impl=impl, recompute=recompute)
    model = build_proxy(config, shape, device)
    tokens, positions, labels = proxy_batch(shape, device)
    with measure_saved_activations(model) as saved:
        loss = model(tokens, positions, None, labels=labels).float().mean()
    loss.backward()
    unit = shape.stream_bytes(config.params_dtype)
    layers = saved.layers()
    return {
        "variant": variant,
        "recompute": recompute,
        "total_bytes": saved.total,
        "outside_layers_bytes": saved.per_owner.get(OUTSIDE_LAYERS, 0),
        "per_layer_bytes": layers,
        "mean_layer_bytes": sum(layers.values()) / max(len(layers), 1),
        "total_in_stream_tensors": saved.total / unit,
    }


def markdown(rows: list[dict[str, Any]], unit: int) -> str:
    lines = [
        "| variant | recompute | saved total (MiB) | per layer (MiB) | in [s,b,h] tensors |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['recompute']} | {row['total_bytes'] / 2**20:.2f} | "
            f"{row['mean_layer_bytes'] / 2**20:.2f} | {row['total_bytes'] / unit:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_args(parser)
    parser.add_argument("--impl", default="torch", help="--attn-res-impl of the AttnRes variants")
    args = parser.parse_args(argv)

    shape = shape_from_args(args)
    init_single_process(args.device)
    rows = []
    for variant in VARIANTS:
        for recompute in RECOMPUTE:
            rows.append(measure(variant, recompute, shape, args.impl, args.device))
            print(f"{variant:8s} {recompute:9s} saved {rows[-1]['total_bytes'] / 2**20:9.2f} MiB", flush=True)
    unit = shape.stream_bytes(torch.float32)
    by_key = {(row["variant"], row["recompute"]): row for row in rows}
    # Sources at the output are b0 plus every block; the boundaries sit between the blocks.
    boundaries = proxy_config("block", shape).attn_res_num_sources_at_output() - 2
    allowed = by_key["baseline", "none"]["total_bytes"] + boundaries * unit
    target = {
        "block_selective_bytes": by_key["block", "selective"]["total_bytes"],
        "baseline_bytes": by_key["baseline", "none"]["total_bytes"],
        "block_boundaries": boundaries,
        "allowed_bytes": allowed,
        "met": by_key["block", "selective"]["total_bytes"] <= allowed,
    }
    result = {
        "meta": {
            "shape": vars(args) | {"stream_tensor_bytes": unit},
            "device": args.device,
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "rows": rows,
        "target": target,
    }
    print()
    print(markdown(rows, unit))
    print(
        f"\nBlock + selective recompute: {target['block_selective_bytes'] / 2**20:.2f} MiB; allowed "
        f"(baseline + {boundaries} boundary tensors): {allowed / 2**20:.2f} MiB -> "
        + ("met" if target["met"] else "NOT met")
    )
    write_json(args.output, result)
    return result


if __name__ == "__main__":
    main()

"""Pipeline parity worker, launched by tests with ``torchrun``.

Per scenario: every rank computes the single-rank oracle (loss and gradients over all
micro-batches, fp64); then the pipeline model chunks of this rank are built with the
oracle's weights and trained through Megatron-Core's real schedule (1F1B, or interleaved
1F1B with virtual stages) with several micro-batches in flight. Each rank writes its
gradient comparison, its loss (last stage), the bytes its chunks sent across each
boundary, and the cache's deposit/drain counts to ``OUT/<scenario>.rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from functools import partial
from pathlib import Path

import torch
from worker_models import build_local, fp64_next_token_loss, kimi_tiny_config, small_gpt_config

warnings.filterwarnings("ignore")

VOCAB, SEQ, MICRO_BATCH, HIDDEN = 64, 8, 2, 32
TOLERANCE = dict(rtol=1e-9, atol=1e-11)

# name: pipeline size, virtual size, layers, mode/block size, micro-batches, layer split
SCENARIOS = {
    "pp2_block_aligned": dict(pp=2, layers=4, block=4, micro_batches=4),
    "pp2_block_unaligned": dict(pp=2, layers=4, block=3, micro_batches=3),
    "pp2_full": dict(pp=2, layers=4, mode="full", micro_batches=3),
    "pp4_block_unaligned": dict(pp=4, layers=4, block=3, micro_batches=4),
    "pp4_full": dict(pp=4, layers=4, mode="full", micro_batches=4),
    "pp2_vpp2_block_aligned": dict(pp=2, vpp=2, layers=4, block=2, micro_batches=4),
    "pp2_vpp2_block_unaligned": dict(pp=2, vpp=2, layers=4, block=3, micro_batches=4),
    "pp2_vpp2_full": dict(pp=2, vpp=2, layers=4, mode="full", micro_batches=4),
    "pp4_vpp2_block_unaligned": dict(pp=4, vpp=2, layers=8, block=3, micro_batches=4),
    "pp4_vpp2_full": dict(pp=4, vpp=2, layers=8, mode="full", micro_batches=4),
    "pp2_uneven_block": dict(pp=2, layers=5, block=4, micro_batches=3, first=2),
    "pp4_uneven_first_last": dict(pp=4, layers=8, block=3, micro_batches=4, first=1, last=3),
    "pp2_layout_1_3": dict(pp=2, layers=4, block=3, micro_batches=3, layout="Et|t*3L", split=[1, 3]),
    "kimi_tiny_pp2_uneven": dict(pp=2, layers=5, block=4, micro_batches=3, first=2, kimi=True, hidden=64),
    "pp2_vpp2_full_recompute_two_phase": dict(
        pp=2,
        vpp=2,
        layers=4,
        block=3,
        micro_batches=4,
        extra=dict(
            recompute_granularity="full",
            recompute_method="uniform",
            recompute_num_layers=1,
            attn_res_impl="two-phase",
        ),
    ),
    "pp2_vpp2_selective_attn_res": dict(
        pp=2,
        vpp=2,
        layers=4,
        block=3,
        micro_batches=4,
        extra=dict(recompute_granularity="selective", recompute_modules=["attn_res"]),
    ),
    "pp2_vpp2_dropped_deposit": dict(pp=2, vpp=2, layers=4, block=2, micro_batches=4, drop_deposit=True),
}


def make_config(spec: dict, parallel: bool):
    pipeline = {}
    if parallel:
        pipeline = dict(
            pipeline_model_parallel_size=spec["pp"],
            virtual_pipeline_model_parallel_size=spec.get("vpp"),
            num_layers_in_first_pipeline_stage=spec.get("first"),
            num_layers_in_last_pipeline_stage=spec.get("last"),
            pipeline_model_parallel_layout=spec.get("layout"),
            pipeline_dtype=torch.float64,
            **spec.get("extra", {}),
        )
    if spec.get("kimi"):
        return kimi_tiny_config(**pipeline)
    mode = spec.get("mode", "block")
    return small_gpt_config(
        num_layers=spec["layers"],
        hidden_size=HIDDEN,
        attention_residuals=mode,
        **({"attn_res_block_size": spec["block"]} if mode == "block" else {}),
        **pipeline,
    )


def batches(spec: dict) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(17)
    return [
        torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator) for _ in range(spec["micro_batches"])
    ]


fp64_loss = fp64_next_token_loss


def build(config, **stage):
    return build_local(config, VOCAB, SEQ, **stage)


def positions_like(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(SEQ).unsqueeze(0).expand_as(tokens)


def oracle(spec: dict) -> tuple[float, dict]:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(5)
    model_parallel_cuda_manual_seed(5)
    model = build(make_config(spec, False)).double()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "attn_res" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    data = batches(spec)
    loss = sum(fp64_loss(model(t, positions_like(t), None), t) for t in data) / len(data)
    loss.backward()
    return loss.item(), {n: (p.detach(), p.grad) for n, p in model.named_parameters()}


def oracle_name(name: str, chunk) -> str:
    """Parameter name in the single-rank model (local layer index -> global layer)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


ORIGINAL_COLLECT = None


def inject_dropped_deposit(cache) -> None:
    """Fault injection: lose the first deposited gradient this rank would hand back."""
    global ORIGINAL_COLLECT
    cls = type(cache)
    ORIGINAL_COLLECT = cls._collect
    dropped = []

    def collect_and_drop(self, entry):
        grad = ORIGINAL_COLLECT(self, entry)
        if grad is not None and not dropped:
            dropped.append(entry.describe())
            return None
        return grad

    cls._collect = collect_and_drop


def run_scenario(name: str, spec: dict, out_dir: Path) -> None:
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from attnres_megatron.pipeline.cache import SourceCache, get_source_cache
    from attnres_megatron.pipeline.schedule import get_forward_backward_func

    global ORIGINAL_COLLECT
    ORIGINAL_COLLECT = SourceCache._collect
    from attnres_megatron.pipeline.ledger import get_byte_ledger

    oracle_loss, full = oracle(spec)
    parallel_state.destroy_model_parallel()
    virtual = spec.get("vpp")
    parallel_state.initialize_model_parallel(1, spec["pp"], virtual_pipeline_model_parallel_size=virtual)
    model_parallel_cuda_manual_seed(5)
    config = make_config(spec, True)
    chunks = []
    for vp_stage in range(virtual or 1):
        vp = vp_stage if virtual else None
        chunk = build(
            config,
            vp_stage=vp,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
        ).double()
        with torch.no_grad():
            for param_name, param in chunk.named_parameters():
                param.copy_(full[oracle_name(param_name, chunk)][0])
        chunks.append(chunk)
    ddp = [
        DistributedDataParallel(config, DistributedDataParallelConfig(), chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    data = batches(spec)

    def forward_step(iterator, model):
        tokens = next(iterator)
        output = model(tokens, positions_like(tokens), None)
        return output, partial(
            lambda t, logits: (fp64_loss(logits, t), {"loss": fp64_loss(logits, t)}), tokens
        )

    get_byte_ledger().reset()
    for model in ddp:
        model.zero_grad_buffer()
    if spec.get("drop_deposit"):
        inject_dropped_deposit(get_source_cache())
    accounting_error = None
    try:
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(data) for _ in ddp] if virtual else iter(data),
            model=ddp if virtual else ddp[0],
            num_microbatches=len(data),
            seq_length=SEQ,
            micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )
    except Exception as error:  # recorded for the test to inspect
        accounting_error, outputs = f"{type(error).__name__}: {error}", []
    finally:
        type(get_source_cache())._collect = ORIGINAL_COLLECT
    finalize_model_grads(ddp)
    cache_counts = get_source_cache().last_counts

    mismatches, checked = [], 0
    for chunk in chunks:
        for param_name, param in chunk.named_parameters():
            expected = full[oracle_name(param_name, chunk)][1]
            if not torch.allclose(param.main_grad, expected, **TOLERANCE):
                err = (param.main_grad - expected).abs().max().item()
                mismatches.append(f"{oracle_name(param_name, chunk)}: max abs err {err:.3e}")
            checked += 1
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    loss = (sum(out["loss"].item() for out in outputs) / len(data)) if last_stage and outputs else None
    result = {
        "scenario": name,
        "rank": torch.distributed.get_rank(),
        "loss": loss,
        "oracle_loss": oracle_loss,
        "grads_checked": checked,
        "grad_mismatches": mismatches,
        "ledger": {str(k): v for k, v in get_byte_ledger().summary().items()},
        "cache": cache_counts,
        "accounting_error": accounting_error,
        "layer_numbers": [[layer.layer_number for layer in c.decoder.layers] for c in chunks],
    }
    (out_dir / f"{name}.rank{torch.distributed.get_rank()}.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    args = parser.parse_args()
    from attnres_megatron.compat.cpu_backend import enable_cpu_backend

    enable_cpu_backend()
    torch.distributed.init_process_group("gloo")
    world = torch.distributed.get_world_size()
    for name in args.scenarios:
        if SCENARIOS[name]["pp"] == world:
            run_scenario(name, SCENARIOS[name], Path(args.out))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

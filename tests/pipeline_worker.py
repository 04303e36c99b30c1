"""Pipeline parity worker, launched by tests with ``torchrun``.

Per scenario: every rank computes the single-rank oracle (loss and gradients over all
micro-batches, fp64); then the pipeline model chunks of this rank are built with the
oracle's weights and trained through Megatron-Core's real schedule (1F1B, or interleaved
1F1B with virtual stages) with several micro-batches in flight. Each rank writes its
gradient comparison, its loss (last stage), the bytes its chunks sent across each
boundary, and the cache's deposit/drain counts to ``OUT/<scenario>.rank<r>.json``.
``bitwise`` scenarios add two fp32 runs, with the value cache and without it (every hop
carries every block its receiver reads), and the bits in which their gradients differ.
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

# name: pipeline size, virtual size, layers, mode/block size, micro-batches, layer split;
# bitwise: also two fp32 runs, with and without the value cache, compared bit for bit
SCENARIOS = {
    "pp2_block_aligned": dict(pp=2, layers=4, block=4, micro_batches=4),
    "pp2_block_unaligned": dict(pp=2, layers=4, block=3, micro_batches=3),
    "pp2_full": dict(pp=2, layers=4, mode="full", micro_batches=3),
    "pp4_block_unaligned": dict(pp=4, layers=4, block=3, micro_batches=4),
    "pp4_full": dict(pp=4, layers=4, mode="full", micro_batches=4),
    "pp2_vpp2_block_aligned": dict(pp=2, vpp=2, layers=4, block=2, micro_batches=4, bitwise=True),
    "pp2_vpp2_block_unaligned": dict(pp=2, vpp=2, layers=4, block=3, micro_batches=4),
    "pp2_vpp2_full": dict(pp=2, vpp=2, layers=4, mode="full", micro_batches=4, bitwise=True),
    "pp2_vpp3_block_aligned": dict(pp=2, vpp=3, layers=6, block=2, micro_batches=4, bitwise=True),
    "pp4_vpp2_block_unaligned": dict(pp=4, vpp=2, layers=8, block=3, micro_batches=4, bitwise=True),
    "pp4_vpp2_full": dict(pp=4, vpp=2, layers=8, mode="full", micro_batches=4, bitwise=True),
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
    # attnres-pretrain's own main() on the ranks of this launch (after the scenarios above: it ends
    # the process group), with an uneven interleaved layout from its flag
    "pretrain_pp2_layout_vpp2": dict(
        pp=2, vpp=2, layers=5, block=3, split=[1, 2, 1, 1], layout="Et|t*2|t|tL", pretrain=True
    ),
}


def make_config(spec: dict, parallel: bool, dtype: torch.dtype = torch.float64):
    pipeline = {}
    if parallel:
        pipeline = dict(
            pipeline_model_parallel_size=spec["pp"],
            virtual_pipeline_model_parallel_size=spec.get("vpp"),
            num_layers_in_first_pipeline_stage=spec.get("first"),
            num_layers_in_last_pipeline_stage=spec.get("last"),
            pipeline_model_parallel_layout=spec.get("layout"),
            pipeline_dtype=dtype,
            **spec.get("extra", {}),
        )
    if dtype != torch.float64:
        pipeline["params_dtype"] = dtype
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


def train_once(spec: dict, full: dict, dtype: torch.dtype = torch.float64, cached: bool = True) -> dict:
    """One forward-backward call through the AttnRes schedule on this rank's chunks, built
    with the oracle's weights (cast to ``dtype``); with or without the value cache."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from attnres_megatron.pipeline.cache import get_source_cache
    from attnres_megatron.pipeline.ledger import get_byte_ledger
    from attnres_megatron.pipeline.schedule import get_forward_backward_func

    virtual = spec.get("vpp")
    model_parallel_cuda_manual_seed(5)
    config = make_config(spec, True, dtype)
    config.attn_res_pipeline_cache = cached
    chunks = []
    for vp_stage in range(virtual or 1):
        vp = vp_stage if virtual else None
        chunk = build(
            config,
            vp_stage=vp,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
        ).to(dtype)
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
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    losses = [out["loss"].item() for out in outputs] if last_stage else []
    return {
        "grads": {
            oracle_name(name, chunk): param.main_grad.detach().clone()
            for chunk in chunks
            for name, param in chunk.named_parameters()
        },
        "losses": losses,
        "loss": sum(losses) / len(data) if losses else None,
        "ledger": {str(k): v for k, v in get_byte_ledger().summary().items()},
        "cache": get_source_cache().last_counts,
        "accounting_error": accounting_error,
        "layer_numbers": [[layer.layer_number for layer in c.decoder.layers] for c in chunks],
    }


def bitwise_mismatches(first: dict, second: dict) -> list[str]:
    """Gradients (and per-micro-batch losses) that differ in any bit."""
    found = []
    for name, grad in first["grads"].items():
        other = second["grads"][name]
        bits = torch.int64 if grad.dtype == torch.float64 else torch.int32
        if grad.shape != other.shape or not torch.equal(grad.view(bits), other.view(bits)):
            found.append(f"{name}: max abs diff {(grad - other).abs().max().item():.3e}")
    if [x.hex() for x in first["losses"]] != [x.hex() for x in second["losses"]]:
        found.append(f"losses {first['losses']} vs {second['losses']}")
    return found


def summary_of(run: dict) -> dict:
    return {key: run[key] for key in ("losses", "ledger", "cache", "accounting_error")}


def run_scenario(name: str, spec: dict, out_dir: Path) -> None:
    from megatron.core import parallel_state

    from attnres_megatron.pipeline.cache import SourceCache

    global ORIGINAL_COLLECT
    ORIGINAL_COLLECT = SourceCache._collect

    oracle_loss, full = oracle(spec)
    parallel_state.destroy_model_parallel()
    virtual = spec.get("vpp")
    parallel_state.initialize_model_parallel(1, spec["pp"], virtual_pipeline_model_parallel_size=virtual)
    run = train_once(spec, full)
    mismatches = []
    for param_name, grad in run["grads"].items():
        expected = full[param_name][1]
        if not torch.allclose(grad, expected, **TOLERANCE):
            mismatches.append(f"{param_name}: max abs err {(grad - expected).abs().max().item():.3e}")
    result = {
        "scenario": name,
        "rank": torch.distributed.get_rank(),
        "oracle_loss": oracle_loss,
        "grads_checked": len(run["grads"]),
        "grad_mismatches": mismatches,
        **{key: run[key] for key in ("loss", "ledger", "cache", "accounting_error", "layer_numbers")},
    }
    if spec.get("bitwise"):
        # fp32, with and without the value cache: every bit of every gradient and loss agrees.
        cached, uncached = (train_once(spec, full, torch.float32, cached=flag) for flag in (True, False))
        result["bitwise"] = {
            "cached": summary_of(cached),
            "uncached": summary_of(uncached),
            "compared": len(cached["grads"]),
            "mismatches": bitwise_mismatches(cached, uncached),
        }
    (out_dir / f"{name}.rank{torch.distributed.get_rank()}.json").write_text(json.dumps(result, indent=1))


def pretrain_argv(spec: dict, summary: Path) -> list[str]:
    """attnres-pretrain flags of a ``pretrain`` scenario: a tiny GPT, the layout from its flag."""
    from attnres_defaults import PRE_MEGATRON_DEFAULTS, old_ffn

    hidden = 64
    return [
        *PRE_MEGATRON_DEFAULTS,
        *old_ffn(hidden),
        *("--device", "cpu", "--num-layers", str(spec["layers"]), "--hidden-size", str(hidden)),
        *("--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2"),
        *("--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "2", "--train-iters", "8"),
        *("--log-interval", "4", "--corpus-bytes", "300000", "--attention-residuals", "block"),
        *("--attn-res-block-size", str(spec["block"]), "--pipeline-model-parallel-size", str(spec["pp"])),
        *("--pipeline-model-parallel-layout", spec["layout"], "--summary-json", str(summary)),
    ]


def run_pretrain(name: str, spec: dict, out_dir: Path) -> None:
    """attnres-pretrain's main() on this launch's ranks; it shuts the process group down."""
    from megatron.core import parallel_state

    from attnres_megatron.training import pretrain

    parallel_state.destroy_model_parallel()
    pretrain.main(pretrain_argv(spec, out_dir / f"{name}.summary.json"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    args = parser.parse_args()
    from attnres_megatron.compat.cpu_backend import enable_cpu_backend

    enable_cpu_backend()
    torch.distributed.init_process_group("gloo")
    world = torch.distributed.get_world_size()
    mine = [name for name in args.scenarios if SCENARIOS[name]["pp"] == world]
    for name in mine:
        if not SCENARIOS[name].get("pretrain"):
            run_scenario(name, SCENARIOS[name], Path(args.out))
    runs = [name for name in mine if SCENARIOS[name].get("pretrain")]
    assert len(runs) <= 1, f"one attnres-pretrain run per launch (it ends the process group): {runs}"
    for name in runs:
        run_pretrain(name, SCENARIOS[name], Path(args.out))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

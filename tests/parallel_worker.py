"""Multi-process parity worker, launched by tests with ``torchrun``.

For each scenario: every rank builds the single-rank model (TP=EP=1) with fixed weights
and computes the loss and gradients of the whole global batch locally (the oracle);
then Megatron's parallel state is rebuilt with the scenario's sizes, the parallel model
is loaded with the matching shards of the same weights, trained one micro-batch per
data-parallel rank through Megatron's DDP and ``finalize_model_grads``, and every
gradient shard is compared with the oracle's. Results go to ``OUT/<scenario>.rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path

import torch
from worker_models import build_local, fp64_next_token_loss, kimi_tiny_config, small_gpt_config

warnings.filterwarnings("ignore")

SCENARIOS = {
    "tp2": dict(tp=2),
    "tp2_sp": dict(tp=2, sp=True),
    "tp2_sp_full": dict(tp=2, sp=True, mode="full"),
    "tp2_sp_moe": dict(tp=2, sp=True, moe="alltoall"),
    "dp2": dict(),
    "ep2_alltoall": dict(ep=2, moe="alltoall"),
    "ep2_allgather": dict(ep=2, moe="allgather"),
    "kimi_tiny_tp2_sp": dict(tp=2, sp=True, kimi=True),
    "kimi_tiny_ep2": dict(ep=2, kimi=True),
}
VOCAB, SEQ, MICRO_BATCH, GLOBAL_MICRO_BATCHES = 64, 8, 2, 2
TOLERANCE = dict(rtol=1e-9, atol=1e-11)  # fp64 throughout


def make_config(spec: dict, tp: int = 1, ep: int = 1):
    parallel = dict(
        tensor_model_parallel_size=tp,
        sequence_parallel=spec.get("sp", False) and tp > 1,
        expert_model_parallel_size=ep,
    )
    if spec.get("kimi"):
        return kimi_tiny_config(**parallel)
    mode = spec.get("mode", "block")
    moe = {}
    if spec.get("moe"):
        moe = dict(
            num_moe_experts=4,
            moe_router_topk=2,
            moe_ffn_hidden_size=16,
            moe_shared_expert_intermediate_size=16,
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_load_balancing_type="none",
            moe_token_dispatcher_type=spec["moe"],
            moe_router_dtype="fp64",
        )
    return small_gpt_config(
        num_layers=3,
        attention_residuals=mode,
        **({"attn_res_block_size": 3} if mode == "block" else {}),
        **parallel,
        **moe,
    )


def build(config):
    return build_local(config, VOCAB, SEQ).double()


def global_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(11)
    return torch.randint(0, VOCAB, (GLOBAL_MICRO_BATCHES * MICRO_BATCH, SEQ), generator=generator)


def forward_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token loss in fp64 (Megatron's vocab-parallel cross-entropy runs in fp32)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    return fp64_next_token_loss(
        gather_from_tensor_model_parallel_region(model(tokens, positions, None)), tokens
    )


def reference_name(name: str, config) -> str:
    """Name of a parallel model's parameter in the single-rank model (global expert ids)."""
    from megatron.core import parallel_state

    match = re.search(r"local_experts\.(\d+)\.", name)
    if not match:
        return name
    local_experts = config.num_moe_experts // parallel_state.get_expert_model_parallel_world_size()
    global_id = parallel_state.get_expert_model_parallel_rank() * local_experts + int(match.group(1))
    return name.replace(f"local_experts.{match.group(1)}.", f"local_experts.{global_id}.")


def shard(full: torch.Tensor, param: torch.nn.Parameter, name: str) -> torch.Tensor:
    """The slice of a full (single-rank) tensor that this rank's ``param`` holds."""
    if full.shape == param.shape:
        return full
    dim = param.partition_dim
    parts = full.shape[dim] // param.shape[dim]
    rank = next(r for r in range(parts) if _rank_in(param, r, parts))
    if name.endswith("linear_fc1.weight"):  # gated MLP: [gate; up], each split across ranks
        return torch.cat([half.chunk(parts, dim)[rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(parts, dim)[rank]


def _rank_in(param, rank: int, parts: int) -> bool:
    from megatron.core import parallel_state

    expert = not getattr(param, "allreduce", True)
    own = (
        parallel_state.get_expert_tensor_parallel_rank()
        if expert
        else parallel_state.get_tensor_model_parallel_rank()
    )
    return own == rank


def run_scenario(name: str, spec: dict, out_dir: Path) -> None:
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    tp, ep = spec.get("tp", 1), spec.get("ep", 1)
    tokens = global_batch()

    # Oracle: the single-rank model on the whole global batch.
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(5)
    model_parallel_cuda_manual_seed(5)
    oracle_config = make_config(spec)
    oracle = build(oracle_config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param_name, param in oracle.named_parameters():
            if "attn_res" in param_name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    oracle_loss = forward_loss(oracle, tokens)
    oracle_loss.backward()
    full = {n: (p.detach(), p.grad) for n, p in oracle.named_parameters()}

    # The parallel run.
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(5)
    config = make_config(spec, tp=tp, ep=ep)
    model = build(config)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            param.copy_(shard(full[reference_name(param_name, config)][0], param, param_name))
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    local = tokens.chunk(dp_size)[dp_rank]
    ddp.zero_grad_buffer()
    loss = forward_loss(ddp, local)
    loss.backward()
    unreduced = {n: p.main_grad.clone() for n, p in model.named_parameters() if "attn_res" in n}
    finalize_model_grads([ddp])
    mean_loss = loss.detach().clone()
    torch.distributed.all_reduce(mean_loss, group=parallel_state.get_data_parallel_group())
    mean_loss /= dp_size

    mismatches, checked = [], 0
    for param_name, param in model.named_parameters():
        expected = shard(full[reference_name(param_name, config)][1], param, param_name)
        if not torch.allclose(param.main_grad, expected, **TOLERANCE):
            err = (param.main_grad - expected).abs().max().item()
            mismatches.append(f"{param_name}: max abs err {err:.3e}")
        checked += 1
    result = {
        "scenario": name,
        "rank": torch.distributed.get_rank(),
        "loss": mean_loss.item(),
        "oracle_loss": oracle_loss.item(),
        "loss_matches": torch.allclose(mean_loss, oracle_loss.detach(), **TOLERANCE),
        "grads_checked": checked,
        "grad_mismatches": mismatches,
    }
    if config.sequence_parallel:
        result.update(sequence_parallel_checks(model, ddp, config, unreduced))
    path = out_dir / f"{name}.rank{torch.distributed.get_rank()}.json"
    path.write_text(json.dumps(result, indent=1))


def gathered_equal(tensor: torch.Tensor, group) -> bool:
    """Whether ``tensor`` is bitwise identical on every rank of ``group``."""
    copies = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(copies, tensor.contiguous(), group=group)
    return all(torch.equal(copies[0], c) for c in copies[1:])


def sequence_parallel_checks(model, ddp, config, unreduced: dict) -> dict:
    """AttnRes grads identical across TP after the SP all-reduce, and values after steps."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    tp_group = parallel_state.get_tensor_model_parallel_group()
    attn_res = {n: p for n, p in model.named_parameters() if "attn_res" in n}
    checks = {
        "attn_res_params": len(attn_res),
        "attn_res_tagged": all(getattr(p, "sequence_parallel", False) for p in attn_res.values()),
        "unreduced_grads_differ": not all(gathered_equal(g, tp_group) for g in unreduced.values()),
        "grads_identical": all(gathered_equal(p.main_grad, tp_group) for p in attn_res.values()),
    }
    optimizer = get_megatron_optimizer(
        OptimizerConfig(lr=1e-2, params_dtype=torch.float64, weight_decay=0.0, clip_grad=0.0), [ddp]
    )
    generator = torch.Generator().manual_seed(99)
    for _ in range(3):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator)
        forward_loss(ddp, tokens).backward()
        finalize_model_grads([ddp])
        optimizer.step()
    checks["values_identical_after_steps"] = all(
        gathered_equal(p.detach(), tp_group) for p in attn_res.values()
    )
    checks["values_moved"] = any(p.detach().abs().sum() > 0 for p in attn_res.values())
    return checks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    args = parser.parse_args()
    from attnres_megatron.compat.cpu_backend import enable_cpu_backend

    enable_cpu_backend()
    torch.distributed.init_process_group("gloo")
    out_dir = Path(args.out)
    for name in args.scenarios:
        run_scenario(name, SCENARIOS[name], out_dir)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

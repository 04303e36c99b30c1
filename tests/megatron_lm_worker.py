"""Megatron-LM-shaped arguments for the tests, and a pipeline worker launched with ``torchrun``.

``megatron_lm_args`` parses with Megatron-LM's flag names, defaults and destinations (the
subset these tests use) plus the plugin's ``extra_args_provider``, then fills in what
Megatron-LM's ``validate_args`` derives. The worker builds, on each pipeline rank, every
model chunk the way Megatron-LM's ``get_model`` calls a model provider and the way
``attnres-pretrain`` builds it, and writes both parameter lists to ``OUT/<scenario>.rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

VOCAB = 256
# Megatron-LM flags that spell attnres-pretrain's fixed choices (SwiGLU, no biases, RMSNorm, RoPE,
# untied embeddings, no dropout) and what Megatron-LM derives from its tokenizer.
GPT_AS_ATTNRES_PRETRAIN = (
    "--swiglu --disable-bias-linear --normalization RMSNorm --position-embedding-type rope "
    "--untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0 "
    "--transformer-impl local --use-cpu-initialization --no-rope-fusion --seq-length 16"
).split()
KIMI_TINY_AS_MEGATRON_LM = (
    "--model kimi-linear-tiny --num-layers 5 --hidden-size 64 --num-attention-heads 4 --num-experts 8 "
    "--position-embedding-type none --untie-embeddings-and-output-weights --hidden-dropout 0 "
    "--attention-dropout 0 --transformer-impl local --use-cpu-initialization --seq-length 16"
).split()
TINY_GPT = "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128".split()

# name: (flags shared by both parsers, Megatron-LM flags, attnres-pretrain flags); attnres-pretrain
# takes Megatron-LM's model flags with Megatron-LM's meaning, so both get the same ones.
SCENARIOS = {
    "gpt_pp2_vpp2_block": (
        [*TINY_GPT, "--attention-residuals", "block", "--attn-res-block-size", "3"]
        + "--pipeline-model-parallel-size 2 --num-virtual-stages-per-pipeline-rank 2".split(),
        GPT_AS_ATTNRES_PRETRAIN,
        GPT_AS_ATTNRES_PRETRAIN,
    ),
    "kimi_tiny_pp2_uneven": (
        "--pipeline-model-parallel-size 2 --decoder-first-pipeline-num-layers 2".split(),
        KIMI_TINY_AS_MEGATRON_LM,
        KIMI_TINY_AS_MEGATRON_LM,
    ),
}


def megatron_lm_parser() -> argparse.ArgumentParser:
    """Megatron-LM's flags used here (its names, defaults, dests) and the plugin's."""
    from attnres_megatron.megatron_lm import extra_args_provider

    parser = argparse.ArgumentParser(prog="pretrain_gpt.py", allow_abbrev=False)
    add = parser.add_argument
    for flag in (
        "--num-layers",
        "--hidden-size",
        "--ffn-hidden-size",
        "--num-attention-heads",
        "--kv-channels",
        "--num-query-groups",
        "--max-position-embeddings",
        "--seq-length",
        "--vocab-size",
        "--num-experts",
        "--moe-ffn-hidden-size",
        "--moe-shared-expert-intermediate-size",
        "--decoder-first-pipeline-num-layers",
        "--decoder-last-pipeline-num-layers",
        "--num-virtual-stages-per-pipeline-rank",
        "--expert-tensor-parallel-size",
        "--q-lora-rank",
        "--mtp-num-layers",
    ):
        add(flag, type=int, default=None)
    for flag in (
        "--tensor-model-parallel-size",
        "--pipeline-model-parallel-size",
        "--context-parallel-size",
        "--expert-model-parallel-size",
    ):
        add(flag, type=int, default=1)
    add("--moe-router-topk", type=int, default=2)
    add("--kv-lora-rank", type=int, default=32)
    add("--qk-head-dim", type=int, default=128)
    add("--qk-pos-emb-head-dim", type=int, default=64)
    add("--v-head-dim", type=int, default=128)
    add("--seed", type=int, default=1234)
    add("--rotary-base", type=int, default=10000)
    add("--rotary-percent", type=float, default=1.0)
    add("--hidden-dropout", type=float, default=0.1)
    add("--attention-dropout", type=float, default=0.1)
    add("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    add(
        "--position-embedding-type",
        choices=("learned_absolute", "rope", "mrope", "relative", "none"),
        default="learned_absolute",
    )
    add(
        "--transformer-impl",
        choices=("local", "transformer_engine", "inference_optimized"),
        default="transformer_engine",
    )
    add("--moe-router-score-function", choices=("softmax", "sigmoid"), default="softmax")
    add("--moe-token-dispatcher-type", choices=("allgather", "alltoall", "flex"), default="allgather")
    add("--spec", nargs="*", default=None)
    add("--recompute-modules", nargs="*", default=None)
    for flag in (
        "--swiglu",
        "--group-query-attention",
        "--untie-embeddings-and-output-weights",
        "--sequence-parallel",
        "--use-cpu-initialization",
        "--bf16",
        "--multi-latent-attention",
        "--moe-router-enable-expert-bias",
        "--moe-grouped-gemm",
        "--use-rope-scaling",
        "--fp16-lm-cross-entropy",
        "--use-legacy-models",
        "--no-persist-layer-norm",
    ):
        add(flag, action="store_true")
    add("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    add("--no-rope-fusion", action="store_false", dest="apply_rope_fusion")
    return extra_args_provider(parser)


def megatron_lm_args(argv: list[str]) -> argparse.Namespace:
    """Parse like Megatron-LM's ``parse_args`` and derive what its ``validate_args`` sets."""
    args = megatron_lm_parser().parse_args(argv)
    args.params_dtype = torch.bfloat16 if args.bf16 else torch.float32
    virtual = args.num_virtual_stages_per_pipeline_rank
    args.virtual_pipeline_model_parallel_size = virtual if virtual and virtual > 1 else None
    if args.kv_channels is None:
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.expert_tensor_parallel_size is None:
        args.expert_tensor_parallel_size = args.tensor_model_parallel_size
    args.padded_vocab_size = args.vocab_size or VOCAB
    return args


def attnres_pretrain_chunks(argv: list[str]) -> list[torch.nn.Module]:
    """The model chunks ``attnres-pretrain`` builds on this rank for these flags."""
    from attnres_megatron.training.arguments import parse_args
    from attnres_megatron.training.model_setup import config_from_args, setup_training

    args = parse_args([*argv, "--device", "cpu"])
    return setup_training(args, config_from_args(args, "cpu"), VOCAB, "cpu").unwrapped()


def megatron_lm_chunks(args: argparse.Namespace) -> list[torch.nn.Module]:
    """The chunks Megatron-LM's ``get_model`` builds on this rank through the plugin's provider."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.utils import (
        is_pp_first_stage,
        is_pp_last_stage,
        is_vp_first_stage,
        is_vp_last_stage,
    )
    from megatron.core.process_groups_config import ProcessGroupCollection

    from attnres_megatron.megatron_lm import model_provider_or

    def stock(**kwargs):
        raise AssertionError("the stock provider was called for an AttnRes run")

    provider = model_provider_or(stock)
    pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    pp = parallel_state.get_pipeline_model_parallel_group()
    vp_size = args.virtual_pipeline_model_parallel_size
    if args.pipeline_model_parallel_size > 1 and vp_size is not None:
        return [
            provider(
                pre_process=is_pp_first_stage(pp) and is_vp_first_stage(vp_stage=i, vp_size=vp_size),
                post_process=is_pp_last_stage(pp) and is_vp_last_stage(vp_stage=i, vp_size=vp_size),
                vp_stage=i,
                config=None,
                pg_collection=pg_collection,
                args=args,
            )
            for i in range(vp_size)
        ]
    return [
        provider(
            pre_process=is_pp_first_stage(pp),
            post_process=is_pp_last_stage(pp),
            config=None,
            pg_collection=pg_collection,
            args=args,
        )
    ]


def describe(chunks: list[torch.nn.Module]) -> list[list]:
    return [[[name, list(param.shape)] for name, param in chunk.named_parameters()] for chunk in chunks]


def run_scenario(name: str, out: Path) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from attnres_megatron.training.distributed import initialize_parallel

    shared, megatron_only, attnres_only = SCENARIOS[name]
    args = megatron_lm_args([*shared, *megatron_only])
    initialize_parallel(
        "cpu",
        seed=7,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
    )
    rank = parallel_state.get_pipeline_model_parallel_rank()
    built = {}
    for label, build in (
        ("megatron_lm", lambda: megatron_lm_chunks(args)),
        ("attnres_pretrain", lambda: attnres_pretrain_chunks([*shared, *attnres_only])),
    ):
        torch.manual_seed(11)
        model_parallel_cuda_manual_seed(11)
        built[label] = build()
    same_values = [
        all(torch.equal(a, b) for a, b in zip(mine.parameters(), theirs.parameters()))
        for mine, theirs in zip(built["megatron_lm"], built["attnres_pretrain"])
    ]
    result = {label: describe(chunks) for label, chunks in built.items()}
    result.update(scenario=name, rank=rank, same_values=same_values)
    (out / f"{name}.rank{rank}.json").write_text(json.dumps(result))
    parallel_state.destroy_model_parallel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    options = parser.parse_args()
    from attnres_megatron.compat.cpu_backend import enable_cpu_backend

    enable_cpu_backend()
    torch.distributed.init_process_group("gloo")
    for name in options.scenarios:
        run_scenario(name, Path(options.out))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

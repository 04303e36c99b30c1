"""From parsed arguments to a Megatron config, a wrapped model, optimizer and scheduler."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Union

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import (
    OptimizerConfig,
    ParamKey,
    ParamPredicate,
    ParamWithNamePredicate,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride
from megatron.core.transformer.module import Float16Module

from attnres_megatron.config import AttnResTransformerConfig
from attnres_megatron.layers.depth_attention import DepthAttention
from attnres_megatron.models.families import chunk_inputs, model_family
from attnres_megatron.training.arguments import scheduler_settings, validate_args
from attnres_megatron.training.distributed import initialize_parallel, resolve_device
from attnres_megatron.training.launch_env import LaunchEnv, LaunchEnvError, discover_launch_env


def attn_res_overrides(args: argparse.Namespace) -> dict:
    """AttnRes fields given on the command line (a preset keeps its own otherwise)."""
    fields = dict(attn_res_eps=args.attn_res_eps, attn_res_impl=args.attn_res_impl)
    if args.attention_residuals is not None:
        fields.update(
            attention_residuals=args.attention_residuals,
            attn_res_block_size=args.attn_res_block_size,
            attn_res_layers_per_block=args.attn_res_layers_per_block,
            attn_res_num_blocks=args.attn_res_num_blocks,
        )
    return fields


def parallel_fields(args: argparse.Namespace, device: str) -> dict:
    """Parallelism, precision and initialisation fields shared by every model."""
    return dict(
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_cpu_initialization=bool(args.use_cpu_initialization) or device == "cpu",
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_stages(args),
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
        pipeline_model_parallel_layout=args.pipeline_model_parallel_layout,
        pipeline_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        sequence_parallel=args.sequence_parallel,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        recompute_modules=args.recompute_modules,
    )


def config_from_args(args: argparse.Namespace, device: str) -> AttnResTransformerConfig:
    """The Megatron config for these arguments; ``ValueError`` names a bad option."""
    family = model_family(args.model)
    args.attention_residuals = family.mode_flag(args.attention_residuals)
    config = family.make_config(
        **family.flag_fields(args), **parallel_fields(args, device), **attn_res_overrides(args)
    )
    args.attn_res_eps = config.attn_res_eps  # the resolved value, saved with the run's arguments
    return config


def gpt_model_kwargs(args: argparse.Namespace) -> dict:
    """``build_gpt_model`` arguments of the GPT flags: positions, their number, tied output weights."""
    inputs = chunk_inputs(args, vocab_size=0)
    return dict(
        max_sequence_length=inputs.max_sequence_length,
        position_embedding_type=inputs.position_embedding_type,
        share_embeddings_and_output_weights=inputs.share_embeddings_and_output_weights,
    )


def virtual_stages(args: argparse.Namespace):
    """Megatron's virtual pipeline size (None unless interleaving)."""
    vpp = args.num_virtual_stages_per_pipeline_rank
    return vpp if vpp and vpp > 1 else None


def validated_launch(args: argparse.Namespace) -> tuple[LaunchEnv, str]:
    """The launcher's environment and the resolved device for ``args``, after validating them
    against the world size (a clear exit, before any process group starts)."""
    try:
        launch = discover_launch_env()
    except LaunchEnvError as error:
        raise SystemExit(f"error: {error}") from None
    validate_args(args, launch.world_size)
    return launch, resolve_device(args.device)


def initialize_parallel_from_args(args: argparse.Namespace, device: str, launch: LaunchEnv) -> None:
    """Process groups, Megatron's parallel state and RNG for these arguments."""
    initialize_parallel(
        device,
        args.seed,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_stages(args),
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        launch_env=launch,
        backend=args.distributed_backend if device == "cuda" else "gloo",
        timeout_minutes=args.distributed_timeout_minutes,
    )


def run_schedule(
    schedule,
    setup: TrainingSetup,
    args: argparse.Namespace,
    batches: list,
    forward_step,
    forward_only: bool = False,
) -> list:
    """One forward-backward (forward only for evaluation) over ``batches`` with a Megatron
    schedule on every model chunk."""
    return schedule(
        forward_step_func=forward_step,
        data_iterator=[iter(batches) for _ in setup.chunks],
        model=setup.chunks,
        num_microbatches=len(batches),
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=forward_only,
    )


WeightDecaySetting = Union[str, float]


def attn_res_parameter_ids(chunks: Iterable[torch.nn.Module]) -> frozenset[int]:
    """Ids of the AttnRes vectors (``pseudo_query``, ``key_gain`` of every ``DepthAttention``)."""
    return frozenset(
        id(param)
        for chunk in chunks
        for module in chunk.modules()
        if isinstance(module, DepthAttention)
        for param in module.parameters()
    )


def _outside(key: ParamKey, excluded: frozenset[int], param: torch.nn.Parameter, name: str) -> bool:
    """``key`` matches ``param`` and ``param`` is not one of ``excluded``."""
    return id(param) not in excluded and key.matches(param, name)


def attn_res_weight_decay_overrides(
    config: OptimizerConfig, chunks: Iterable[torch.nn.Module], setting: WeightDecaySetting
) -> dict[ParamKey, ParamGroupOverride]:
    """Megatron's standard param-group overrides (no decay for biases and 1-D params) with the
    AttnRes vectors decayed as ``setting`` asks: ``"none"`` (no decay), ``"default"`` (the
    global weight decay) or a coefficient, expressed as a ``wd_mult`` of the global one.

    Each choice gives the AttnRes vectors a ``wd_mult`` no other group has (or none of their
    own), because Megatron matches checkpointed param groups by ``wd_mult``."""
    attn_res = attn_res_parameter_ids(chunks)
    standard = get_standard_config_overrides(config)
    key = ParamKey(predicate=ParamPredicate(name="attn_res_vectors", fn=lambda param: id(param) in attn_res))
    if setting == "none" or setting == 0.0:
        return {**standard, key: ParamGroupOverride(wd_mult=0.0)}
    overrides = {}
    for index, (standard_key, override) in enumerate(standard.items()):
        if "wd_mult" in override:  # leave the AttnRes vectors out of Megatron's no-decay rule
            predicate = ParamWithNamePredicate(
                name=f"{index}_not_attn_res", fn=lambda p, n, k=standard_key: _outside(k, attn_res, p, n)
            )
            standard_key = ParamKey(with_name_predicate=predicate)
        overrides[standard_key] = override
    if setting != "default" and setting != config.weight_decay:
        if not config.weight_decay > 0:
            raise ValueError(
                f"--attn-res-weight-decay {setting} needs --weight-decay > 0 (it is applied as a "
                f"multiple of it); got --weight-decay {config.weight_decay}."
            )
        overrides[key] = ParamGroupOverride(wd_mult=setting / config.weight_decay)
    return overrides


@dataclass
class TrainingSetup:
    """Everything the loop needs: the DDP-wrapped model chunks, optimizer and scheduler."""

    config: AttnResTransformerConfig
    chunks: list[DistributedDataParallel]
    optimizer: torch.optim.Optimizer
    scheduler: OptimizerParamScheduler

    def unwrapped(self) -> list[torch.nn.Module]:
        """The AttnRes GPT chunks inside the DDP (and bf16) wrappers."""
        modules = [chunk.module for chunk in self.chunks]
        return [m.module if isinstance(m, Float16Module) else m for m in modules]


def setup_training(
    args: argparse.Namespace, config: AttnResTransformerConfig, vocab_size: int, device: str
) -> TrainingSetup:
    """Build this rank's model chunks on ``device`` (one per virtual pipeline stage), wrap
    them for bf16 and data parallelism, and create Megatron's optimizer (norms and biases are
    not weight-decayed; AttnRes vectors as ``--attn-res-weight-decay`` says) and scheduler."""
    from megatron.core import parallel_state

    virtual = virtual_stages(args)
    family = model_family(args.model)
    inputs = chunk_inputs(args, vocab_size, device)  # the tokenizer's vocabulary, padded (not a preset's)
    ddp = []
    for vp_stage in range(virtual or 1):
        vp = vp_stage if virtual else None
        stage = dict(
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            vp_stage=vp,
        )
        model = family.build_chunk(config, inputs, **stage)
        model = model.to(device)
        if args.bf16:
            model = Float16Module(config, model)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=args.bf16, use_distributed_optimizer=args.use_distributed_optimizer
        )
        ddp.append(DistributedDataParallel(config, ddp_config, model, disable_bucketing=vp_stage > 0))
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    overrides = attn_res_weight_decay_overrides(
        optimizer_config, ddp, getattr(args, "attn_res_weight_decay", "none")
    )
    optimizer = get_megatron_optimizer(optimizer_config, ddp, config_overrides=overrides)
    scheduler = OptimizerParamScheduler(optimizer, **scheduler_settings(args))
    config.finalize_model_grads_func = finalize_model_grads
    no_sync = [chunk.no_sync for chunk in ddp]
    config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
    return TrainingSetup(config, ddp, optimizer, scheduler)

"""Command-line arguments of ``attnres-pretrain``, spelled like Megatron-LM's."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Optional, Union

from attnres_megatron.config import ATTN_RES_IMPLS, ATTN_RES_MODES
from attnres_megatron.models.kimi.presets import PRESETS as KIMI_PRESETS
from attnres_megatron.models.specs import (
    CONTEXT_PARALLEL_NEEDS_TE,
    TRANSFORMER_IMPLS,
    resolve_transformer_impl,
)
from attnres_megatron.training.quiet import add_verbose_warnings_arg

MODEL_CHOICES = ("gpt", *sorted(KIMI_PRESETS))
ATTN_RES_WEIGHT_DECAY_WORDS = ("none", "default")


def attn_res_weight_decay(text: str) -> Union[str, float]:
    """``--attn-res-weight-decay``: ``none``, ``default`` or a finite coefficient >= 0."""
    if text in ATTN_RES_WEIGHT_DECAY_WORDS:
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected none, default or a weight decay >= 0; got {text!r}.")
    return value


def add_attn_res_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the AttnRes flags (also used by the Megatron-LM integration)."""
    group = parser.add_argument_group("attention residuals")
    group.add_argument(
        "--attention-residuals",
        choices=ATTN_RES_MODES,
        default=None,
        help="Depth mixing: none (standard residuals), block (Block AttnRes) or full "
        "(default: none for gpt, the preset's choice for Kimi Linear).",
    )
    size = group.add_mutually_exclusive_group()
    size.add_argument(
        "--attn-res-block-size",
        type=int,
        default=None,
        help="Sublayers per depth block S (attention and MLP count one each).",
    )
    size.add_argument(
        "--attn-res-layers-per-block",
        type=int,
        default=None,
        help="Transformer layers per depth block (S = 2 x this).",
    )
    size.add_argument(
        "--attn-res-num-blocks",
        type=int,
        default=None,
        help="Number of depth blocks N over the model (S = ceil(2L / N)).",
    )
    group.add_argument(
        "--attn-res-eps", type=float, default=1e-6, help="Epsilon of the RMS normalisation of depth keys."
    )
    group.add_argument(
        "--attn-res-impl", choices=ATTN_RES_IMPLS, default="torch", help="Aggregation implementation."
    )
    return parser


def add_recompute_args(parser: argparse.ArgumentParser) -> None:
    """Megatron's activation-recompute flags; ``attn_res`` joins the selective modules."""
    recompute = parser.add_argument_group("activation recompute")
    recompute.add_argument(
        "--recompute-granularity",
        choices=("full", "selective"),
        default=None,
        help="Recompute whole layers (full) or chosen modules (selective) in backward.",
    )
    recompute.add_argument(
        "--recompute-method",
        choices=("uniform", "block"),
        default=None,
        help="Full recompute: checkpoint groups of --recompute-num-layers layers (uniform), "
        "or only the first --recompute-num-layers layers of each stage (block).",
    )
    recompute.add_argument("--recompute-num-layers", type=int, default=None)
    recompute.add_argument(
        "--recompute-modules",
        nargs="*",
        default=None,
        help="Selective recompute modules: Megatron's (core_attn, layernorm, mlp, moe, moe_act, "
        "mla_up_proj, shared_experts) and attn_res (the depth mix and the pre-norm reading it).",
    )


def add_model_arg(group: argparse._ActionsContainer) -> None:
    """Add ``--model`` (gpt or a Kimi Linear preset; also used by the Megatron-LM integration)."""
    group.add_argument(
        "--model",
        choices=MODEL_CHOICES,
        default="gpt",
        help="gpt (shape from the model flags) or a Kimi Linear preset (KDA + NoPE "
        "MLA + MoE; the preset fixes the shape, Block AttnRes S=6 by default).",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnres-pretrain",
        description="Pretrain a GPT with Attention Residuals on Megatron-Core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    add_model_arg(model)
    model.add_argument("--num-layers", type=int, default=4)
    model.add_argument("--hidden-size", type=int, default=128)
    model.add_argument(
        "--ffn-hidden-size", type=int, default=None, help="MLP width (default 4 x hidden size)."
    )
    model.add_argument("--num-attention-heads", type=int, default=4)
    model.add_argument("--num-query-groups", type=int, default=None)
    model.add_argument("--normalization", choices=("RMSNorm", "LayerNorm"), default="RMSNorm")
    model.add_argument(
        "--position-embedding-type", choices=("rope", "learned_absolute", "none"), default="rope"
    )
    model.add_argument("--hidden-dropout", type=float, default=0.0)
    model.add_argument("--attention-dropout", type=float, default=0.0)
    model.add_argument(
        "--transformer-impl",
        choices=TRANSFORMER_IMPLS,
        default="auto",
        help="Layer spec: Transformer Engine, local (runs on CPU) or auto.",
    )
    add_attn_res_args(parser)

    train = parser.add_argument_group("training")
    train.add_argument("--seq-length", type=int, default=128)
    train.add_argument("--micro-batch-size", type=int, default=4)
    train.add_argument("--train-iters", type=int, default=100)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--min-lr", type=float, default=3e-4)
    train.add_argument("--lr-warmup-iters", type=int, default=10)
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument(
        "--attn-res-weight-decay",
        type=attn_res_weight_decay,
        default="none",
        metavar="{none,default,FLOAT}",
        help="Weight decay of the AttnRes vectors (pseudo-queries, key gains): none, default "
        "(--weight-decay, like the weight matrices) or this coefficient (applied as Megatron's "
        "wd_mult relative to --weight-decay, which must then be > 0).",
    )
    train.add_argument("--clip-grad", type=float, default=1.0)
    train.add_argument("--adam-beta1", type=float, default=0.9)
    train.add_argument("--adam-beta2", type=float, default=0.95)
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument(
        "--corpus-bytes",
        type=int,
        default=8 << 20,
        help="Bytes of the built-in corpus (Python standard library sources), built once into an "
        "indexed dataset in the cache ($ATTNRES_CACHE_DIR).",
    )
    train.add_argument(
        "--data-path",
        nargs="+",
        default=None,
        help="Megatron indexed dataset prefix(es), optionally weighted: '0.3 PREFIX_A 0.7 PREFIX_B' "
        "(see tools/preprocess_data.py).",
    )
    train.add_argument("--split", default="969,30,1", help="Train,valid,test split weights.")
    train.add_argument(
        "--tokenizer",
        default="byte",
        help="byte, or a local tokenizers JSON / tiktoken file (must match the data).",
    )

    train.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="Samples per iteration over all data-parallel ranks "
        "(default: micro batch x data-parallel size); larger values accumulate.",
    )
    train.add_argument(
        "--lr-decay-style",
        choices=("cosine", "linear", "constant", "WSD"),
        default="cosine",
        help="Learning-rate decay after warmup (WSD: warmup-stable-decay).",
    )
    train.add_argument(
        "--lr-wsd-decay-iters",
        type=int,
        default=None,
        help="WSD: iterations of the final decay phase (default: 10%% of --train-iters).",
    )
    train.add_argument(
        "--lr-wsd-decay-style",
        choices=("exponential", "linear", "cosine", "minus_sqrt"),
        default="linear",
        help="WSD: shape of the final decay.",
    )
    train.add_argument("--bf16", action="store_true", help="bf16 parameters and activations.")
    train.add_argument(
        "--use-distributed-optimizer",
        action="store_true",
        help="Shard optimizer state across data-parallel ranks.",
    )
    add_recompute_args(parser)

    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parallel.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parallel.add_argument(
        "--num-virtual-stages-per-pipeline-rank",
        type=int,
        default=None,
        help="Interleaved 1F1B: model chunks per pipeline rank (cross-stage "
        "caching of AttnRes blocks applies).",
    )
    parallel.add_argument(
        "--decoder-first-pipeline-num-layers",
        type=int,
        default=None,
        help="Layers on the first pipeline stage (uneven split).",
    )
    parallel.add_argument(
        "--decoder-last-pipeline-num-layers",
        type=int,
        default=None,
        help="Layers on the last pipeline stage (uneven split).",
    )
    parallel.add_argument(
        "--pipeline-model-parallel-layout",
        default=None,
        help="Megatron layout string, e.g. 'Et*3|t*3|t*2L' (overrides the counts).",
    )
    parallel.add_argument("--sequence-parallel", action="store_true")
    parallel.add_argument("--context-parallel-size", type=int, default=1)
    parallel.add_argument("--expert-model-parallel-size", type=int, default=1)
    parallel.add_argument(
        "--expert-tensor-parallel-size",
        type=int,
        default=None,
        help="Tensor parallelism inside experts (default: the TP size).",
    )

    moe = parser.add_argument_group("mixture of experts")
    moe.add_argument("--num-experts", type=int, default=None, help="Routed experts per MoE layer.")
    moe.add_argument("--moe-router-topk", type=int, default=2)
    moe.add_argument(
        "--moe-ffn-hidden-size",
        type=int,
        default=None,
        help="Width of each routed expert (default: --ffn-hidden-size).",
    )
    moe.add_argument(
        "--moe-shared-expert-intermediate-size",
        type=int,
        default=None,
        help="Width of the shared expert (none when unset).",
    )
    moe.add_argument("--moe-router-score-function", choices=("softmax", "sigmoid"), default="softmax")
    moe.add_argument(
        "--moe-router-enable-expert-bias",
        action="store_true",
        help="Aux-loss-free load balancing: a per-expert bias used for top-k selection.",
    )
    moe.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    moe.add_argument("--moe-router-topk-scaling-factor", type=float, default=None)
    moe.add_argument(
        "--moe-router-load-balancing-type", choices=("aux_loss", "seq_aux_loss", "none"), default="aux_loss"
    )
    moe.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    moe.add_argument("--moe-token-dispatcher-type", choices=("allgather", "alltoall"), default="alltoall")
    moe.add_argument(
        "--moe-grouped-gemm",
        action="store_true",
        help="Grouped GEMM experts (GPU); CPU runs use sequential experts.",
    )

    run_logging = parser.add_argument_group("logging")
    run_logging.add_argument(
        "--tensorboard-dir",
        default=None,
        help="TensorBoard logs: loss, lr, grad norm, tokens/s, per-layer output RMS "
        "and gradient norms, depth-attention heatmaps (needs the tensorboard extra).",
    )
    run_logging.add_argument(
        "--no-progress-bar",
        action="store_true",
        help="No progress bar (one is drawn on the logging rank when stdout is a terminal and tqdm "
        "is installed).",
    )
    add_verbose_warnings_arg(run_logging)

    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument("--save", default=None, help="Directory for distributed checkpoints.")
    ckpt.add_argument("--save-interval", type=int, default=None, help="Iterations between saves.")
    ckpt.add_argument(
        "--load",
        default=None,
        help="Resume from the latest checkpoint here (a baseline checkpoint warm-starts an AttnRes model).",
    )
    ckpt.add_argument(
        "--exit-interval",
        type=int,
        default=None,
        help="Stop (after saving, with --save) when the iteration is a multiple of this.",
    )
    ckpt.add_argument(
        "--no-load-optim",
        action="store_true",
        help="Load model weights only (e.g. under another TP/PP layout).",
    )
    ckpt.add_argument(
        "--skip-nonfinite-steps",
        action="store_true",
        help="Skip an iteration whose loss or gradients are NaN/Inf instead of stopping.",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="cpu enables the CPU/gloo backend; auto picks cuda when available.",
    )
    run.add_argument("--log-interval", type=int, default=10)
    run.add_argument(
        "--summary-json", default=None, help="Write the final summary (losses, tokens/s) to this JSON file."
    )
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Reject bad values with the flag's name before any work starts."""
    positive = (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "seq_length",
        "micro_batch_size",
        "train_iters",
        "log_interval",
    )
    for name in positive:
        value = getattr(args, name)
        if value is None or value < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1; got {value}.")
    if args.hidden_size % args.num_attention_heads:
        raise SystemExit(
            f"error: --hidden-size {args.hidden_size} must be divisible by "
            f"--num-attention-heads {args.num_attention_heads}."
        )
    if not args.lr > 0:
        _fail(f"--lr must be > 0; got {args.lr}.")
    if not 0 <= args.lr_warmup_iters < args.train_iters:
        _fail(f"--lr-warmup-iters {args.lr_warmup_iters} must be in [0, --train-iters {args.train_iters}).")
    if not 0 <= args.min_lr <= args.lr:
        _fail(f"--min-lr {args.min_lr} must be in [0, --lr {args.lr}].")
    validate_weight_decay(args)
    if args.save_interval is not None and (args.save_interval < 1 or not args.save):
        _fail("--save-interval needs --save and a value >= 1.")
    if args.load:
        from attnres_megatron.training.checkpointing import CheckpointError, latest_iteration

        try:
            latest_iteration(args.load)
        except CheckpointError as error:
            _fail(str(error))
    validate_parallel_args(args, world_size)


def validate_weight_decay(args: argparse.Namespace) -> None:
    """``--weight-decay`` and ``--attn-res-weight-decay`` fit together."""
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        _fail(f"--weight-decay must be >= 0; got {args.weight_decay}.")
    setting = args.attn_res_weight_decay
    if isinstance(setting, float) and setting not in (0.0, args.weight_decay) and args.weight_decay == 0:
        _fail(
            f"--attn-res-weight-decay {setting} needs --weight-decay > 0 (it is applied as a "
            "multiple of it); use a positive --weight-decay or --attn-res-weight-decay none."
        )


def validate_parallel_args(args: argparse.Namespace, world_size: int) -> None:
    """Parallel sizes, MoE and batch options against the world size."""
    sizes = (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "context_parallel_size",
        "expert_model_parallel_size",
    )
    for name in sizes:
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}.")
    tp, pp, cp = (
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.context_parallel_size,
    )
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        _fail(
            f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} x "
            f"--context-parallel-size {cp} = {model_parallel} does not divide the world size "
            f"{world_size}; launch a multiple of {model_parallel} processes or change the sizes."
        )
    if cp > 1 and resolve_transformer_impl(args.transformer_impl) == "local":
        _fail(CONTEXT_PARALLEL_NEEDS_TE)
    if args.sequence_parallel and tp == 1:
        _fail("--sequence-parallel needs --tensor-model-parallel-size > 1; drop the flag or raise TP.")
    if args.num_attention_heads % tp:
        _fail(
            f"--num-attention-heads {args.num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size {tp}."
        )
    ep = args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size or tp
    preset = KIMI_PRESETS.get(args.model, {})
    num_experts = preset.get("num_moe_experts", args.num_experts)
    topk = preset.get("moe_router_topk", args.moe_router_topk)
    num_layers = preset.get("num_layers", args.num_layers)
    uneven = args.decoder_first_pipeline_num_layers or args.decoder_last_pipeline_num_layers
    stages = pp * (args.num_virtual_stages_per_pipeline_rank or 1)
    if pp > 1 and not uneven and not args.pipeline_model_parallel_layout and num_layers % stages:
        _fail(
            f"{num_layers} layers do not split evenly into {stages} pipeline chunks; pass "
            "--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers (e.g. from "
            "tools/plan_pipeline_stages.py) or change the pipeline sizes."
        )
    if num_experts is None:
        if ep > 1:
            _fail("--expert-model-parallel-size > 1 needs --num-experts.")
    else:
        if num_experts < 1:
            _fail(f"--num-experts must be >= 1; got {num_experts}.")
        if num_experts % ep:
            _fail(f"--num-experts {num_experts} is not divisible by --expert-model-parallel-size {ep}.")
        if not 1 <= topk <= num_experts:
            _fail(f"--moe-router-topk must be in [1, --num-experts]; got {topk}.")
        if (world_size // pp) % (ep * etp):
            _fail(
                f"--expert-model-parallel-size {ep} x expert tensor parallel {etp} does not divide "
                f"the {world_size // pp} ranks of a pipeline stage."
            )
        if not preset and args.moe_router_enable_expert_bias and args.moe_router_score_function != "sigmoid":
            _fail("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid.")
    vpp = args.num_virtual_stages_per_pipeline_rank
    if vpp is not None and (vpp < 1 or pp == 1):
        _fail(
            "--num-virtual-stages-per-pipeline-rank needs --pipeline-model-parallel-size > 1 and "
            "a value >= 1."
        )
    if pp == 1 and (args.decoder_first_pipeline_num_layers or args.decoder_last_pipeline_num_layers):
        _fail("--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1.")
    data_parallel = world_size // model_parallel
    per_step = args.micro_batch_size * data_parallel
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.global_batch_size % per_step:
        _fail(
            f"--global-batch-size {args.global_batch_size} must be a multiple of --micro-batch-size "
            f"x data-parallel size = {per_step}."
        )

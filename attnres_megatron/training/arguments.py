"""Command-line arguments of ``attnres-pretrain``, spelled like Megatron-LM's."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any, Optional, Union

from attnres_megatron.config import ATTN_RES_MODES
from attnres_megatron.models.families import MODEL_FAMILIES, ffn_hidden_size, model_family
from attnres_megatron.models.specs import (
    CONTEXT_PARALLEL_NEEDS_TE,
    TRANSFORMER_IMPLS,
    resolve_transformer_impl,
)
from attnres_megatron.ops.dispatch import ATTN_RES_IMPLS
from attnres_megatron.training.early_checks import (
    validate_numbers,
    validate_optional_packages,
    validate_outputs,
    validate_pipeline_layout,
    validate_recompute,
)
from attnres_megatron.training.megatron_lm_flags import flag_name, unrecognized_message
from attnres_megatron.training.quiet import add_verbose_warnings_arg
from attnres_megatron.training.tokenizers import add_tokenizer_args

MODEL_CHOICES = tuple(MODEL_FAMILIES)
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


DEVICE_CHOICES = ("auto", "cpu", "cuda")


def add_device_arg(group: Any, help: str) -> None:
    """``--device`` (attnres-pretrain's, attnres-profile's and the Megatron-LM routes')."""
    group.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help=help)


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
        "--attn-res-eps",
        type=float,
        default=None,
        help="Epsilon of the RMS normalisation of depth keys (default: the model's norm epsilon, "
        "--norm-epsilon or a preset's; attnres-pretrain --load keeps the checkpoint's own).",
    )
    group.add_argument(
        "--attn-res-impl",
        choices=ATTN_RES_IMPLS,
        default="auto",
        help="Aggregation implementation: auto (default: the fastest for the device, the log names "
        "it), torch, fused, two-phase or reference.",
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
    recompute.add_argument(
        "--recompute-num-layers",
        type=int,
        default=None,
        help="Full recompute: layers per checkpointed group (uniform) or checkpointed layers (block).",
    )
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


OWN_DEFAULT = "attnres-pretrain's default for a tiny CPU run; Megatron-LM has none and requires it"
NO_OP = "Accepted for Megatron-LM command lines; a no-op here"


def add_model_shape_args(group: argparse._ActionsContainer) -> None:
    """Megatron-LM's GPT shape flags with its defaults (a tiny shape where it requires a value)."""
    group.add_argument("--num-layers", type=int, default=4, help=f"Transformer layers ({OWN_DEFAULT}).")
    group.add_argument("--hidden-size", type=int, default=128, help=f"Hidden size ({OWN_DEFAULT}).")
    group.add_argument(
        "--ffn-hidden-size",
        type=int,
        default=None,
        help="MLP width (default, as in Megatron-LM: 4 x hidden size; with --swiglu "
        "int(8 x hidden size / 3 / 64) x 64).",
    )
    group.add_argument("--num-attention-heads", type=int, default=4, help=f"Attention heads ({OWN_DEFAULT}).")
    group.add_argument(
        "--kv-channels", type=int, default=None, help="Size of each attention head (default hidden / heads)."
    )
    group.add_argument(
        "--group-query-attention",
        action="store_true",
        help="Grouped-query attention with --num-query-groups key/value heads.",
    )
    group.add_argument(
        "--num-query-groups",
        type=int,
        default=1,
        help="Key/value head groups; needs --group-query-attention (without it every head has its own).",
    )
    group.add_argument(
        "--max-position-embeddings",
        type=int,
        default=None,
        help="Positions of the model (size of the learned position embedding; default --seq-length, "
        "which must not exceed it).",
    )
    group.add_argument(
        "--position-embedding-type",
        choices=("learned_absolute", "rope", "none"),
        default="learned_absolute",
        help="Position embedding (gpt; a Kimi preset has none).",
    )
    group.add_argument(
        "--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm", help="Norm type (gpt)."
    )
    group.add_argument("--norm-epsilon", type=float, default=1e-5, help="Epsilon of the norms (gpt).")
    group.add_argument(
        "--swiglu", action="store_true", help="SwiGLU MLP (gated linear unit with SiLU) instead of GeLU."
    )
    group.add_argument(
        "--disable-bias-linear",
        action="store_false",
        dest="add_bias_linear",
        help="No biases in the linear layers (the default shown is add_bias_linear's: biases on).",
    )
    group.add_argument(
        "--add-qkv-bias",
        action="store_true",
        help="Biases in the query/key/value projection only (implied unless --disable-bias-linear).",
    )
    group.add_argument("--qk-layernorm", action="store_true", help="Normalise queries and keys per head.")
    group.add_argument(
        "--untie-embeddings-and-output-weights",
        action="store_true",
        help="Give the output layer its own weights instead of the input embedding's.",
    )
    group.add_argument(
        "--init-method-std", type=float, default=0.02, help="Std of the normal weight initialisation."
    )
    group.add_argument("--hidden-dropout", type=float, default=0.1, help="Dropout after each sublayer.")
    group.add_argument(
        "--attention-dropout", type=float, default=0.1, help="Dropout of the attention probabilities."
    )
    group.add_argument(
        "--transformer-impl",
        choices=TRANSFORMER_IMPLS,
        default="auto",
        help="Layer spec: transformer_engine, local (runs on CPU) or auto (attnres-pretrain's default: "
        "transformer_engine, Megatron-LM's default, when it imports and the device is CUDA, else local; the "
        "same rule for every --model).",
    )
    group.add_argument(
        "--attention-backend",
        choices=("auto",),
        default="auto",
        help="Attention kernels: chosen by Transformer Engine or PyTorch SDPA.",
    )
    group.add_argument(
        "--use-cpu-initialization",
        action="store_true",
        default=None,
        help="Initialise the weights on the CPU (always the case with --device cpu).",
    )
    group.add_argument(
        "--use-mcore-models",
        action="store_true",
        dest="deprecated_use_mcore_models",
        help=f"{NO_OP}: the models are always Megatron-Core's.",
    )


# Megatron-LM's kernel-fusion switches: (flag, destination, action).
FUSION_FLAGS = (
    ("--no-masked-softmax-fusion", "masked_softmax_fusion", "store_false"),
    ("--no-bias-gelu-fusion", "bias_gelu_fusion", "store_false"),
    ("--no-bias-swiglu-fusion", "bias_swiglu_fusion", "store_false"),
    ("--no-bias-dropout-fusion", "bias_dropout_fusion", "store_false"),
    ("--no-rope-fusion", "apply_rope_fusion", "store_false"),
    ("--no-gradient-accumulation-fusion", "gradient_accumulation_fusion", "store_false"),
    ("--no-persist-layer-norm", "no_persist_layer_norm", "store_true"),
)


def add_fusion_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's fusion switches, accepted without effect (attnres-pretrain uses none of them)."""
    group = parser.add_argument_group(
        "kernel fusions",
        f"{NO_OP}: attnres-pretrain builds its layers without these fused kernels (CPU runs have "
        "none), so they change nothing.",
    )
    for flag, dest, action in FUSION_FLAGS:
        group.add_argument(flag, action=action, dest=dest, help=f"{NO_OP} (the default shown is {dest}'s).")


def add_run_length_args(group: argparse._ActionsContainer) -> None:
    """Sequence length, micro batch, run length and learning rate."""
    group.add_argument("--seq-length", type=int, default=128, help=f"Tokens per sample ({OWN_DEFAULT}).")
    group.add_argument(
        "--micro-batch-size", type=int, default=4, help=f"Samples per micro-batch and rank ({OWN_DEFAULT})."
    )
    group.add_argument("--train-iters", type=int, default=100, help=f"Training iterations ({OWN_DEFAULT}).")
    group.add_argument("--lr", type=float, default=3e-3, help=f"Peak learning rate ({OWN_DEFAULT}).")


def add_optimizer_args(group: argparse._ActionsContainer) -> None:
    """Megatron-LM's Adam (decoupled weight decay) flags with its defaults."""
    group.add_argument(
        "--optimizer",
        choices=("adam",),
        default="adam",
        help="Adam with decoupled weight decay (AdamW), Megatron-Core's optimizer.",
    )
    group.add_argument(
        "--weight-decay",
        type=float,
        default=0.01,
        help="Weight decay of the weight matrices (biases and norms are not decayed).",
    )
    group.add_argument("--clip-grad", type=float, default=1.0, help="Gradient-norm clipping (0: off).")
    group.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1.")
    group.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2.")
    group.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon.")


def add_lr_schedule_args(group: argparse._ActionsContainer) -> None:
    """Megatron-LM's learning-rate schedule flags (warmup, then decay to --min-lr)."""
    group.add_argument("--min-lr", type=float, default=0.0, help="Learning rate at the end of the decay.")
    group.add_argument(
        "--lr-decay-style",
        choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"),
        default="linear",
        help="Learning-rate decay after warmup (WSD: warmup-stable-decay).",
    )
    group.add_argument(
        "--lr-decay-iters",
        type=int,
        default=None,
        help="Iterations over which the learning rate decays (default --train-iters).",
    )
    group.add_argument(
        "--lr-warmup-iters", type=int, default=0, help="Iterations of linear warmup from --lr-warmup-init."
    )
    group.add_argument(
        "--lr-warmup-fraction",
        type=float,
        default=None,
        help="Warmup as a fraction of --lr-decay-iters (instead of --lr-warmup-iters).",
    )
    group.add_argument(
        "--lr-warmup-init", type=float, default=0.0, help="Learning rate at the start of the warmup."
    )
    group.add_argument(
        "--lr-wsd-decay-iters",
        type=int,
        default=None,
        help="WSD: iterations of the final decay phase (attnres-pretrain's default: 10%% of "
        "--lr-decay-iters; Megatron-LM requires it with WSD).",
    )
    group.add_argument(
        "--lr-wsd-decay-style",
        choices=("exponential", "linear", "cosine", "minus_sqrt"),
        default="exponential",
        help="WSD: shape of the final decay.",
    )


def timeout_minutes(text: str) -> float:
    """A positive, finite number of minutes (fractions allowed)."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of minutes, got {text}")
    return value


def add_megatron_lm_run_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM run flags that keep their meaning here (backend, checkpoint format, no-ops)."""
    group = parser.add_argument_group("Megatron-LM run options")
    group.add_argument(
        "--distributed-backend",
        choices=("nccl", "gloo"),
        default="nccl",
        help="torch.distributed backend of CUDA runs (--device cpu always uses gloo).",
    )
    group.add_argument(
        "--distributed-timeout-minutes",
        type=timeout_minutes,
        default=10,
        help="Timeout of torch.distributed operations (gloo and NCCL, every Megatron group): a rank "
        "blocked this long in a collective exits with an error naming it. Fractions allowed (tests "
        "use 0.1).",
    )
    group.add_argument(
        "--ckpt-format",
        choices=("torch_dist",),
        default="torch_dist",
        help="Checkpoint format: Megatron-Core distributed checkpoints.",
    )
    group.add_argument(
        "--exit-signal-handler",
        action="store_true",
        help=f"{NO_OP}: SIGTERM always finishes the iteration, saves (with --save) and exits.",
    )
    group.add_argument(
        "--no-create-attention-mask-in-dataloader",
        action="store_false",
        dest="create_attention_mask_in_dataloader",
        help=f"{NO_OP}: batches never carry an attention mask (attention is causal; the default shown "
        "is create_attention_mask_in_dataloader's).",
    )


class PretrainArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose unknown-flag error names the equivalent of Megatron-LM flags."""

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> argparse.Namespace:
        """Parse like argparse; an unknown Megatron-LM flag's error also says what to use instead."""
        argv = list(sys.argv[1:] if args is None else args)
        parsed, extras = self.parse_known_args(argv, namespace)
        if extras:
            self.error(unrecognized_message(extras))
        if any(flag_name(token) == "--num-query-groups" for token in argv) and not getattr(
            parsed, "group_query_attention", True
        ):
            self.error(
                "--num-query-groups needs --group-query-attention (Megatron-LM ignores it without); "
                "add --group-query-attention or drop --num-query-groups."
            )
        return parsed


def build_parser() -> argparse.ArgumentParser:
    """The ``attnres-pretrain`` parser: Megatron-LM's flag names, meanings and defaults."""
    parser = PretrainArgumentParser(
        prog="attnres-pretrain",
        usage="%(prog)s [options]   (--help lists every option with its default)",
        description="Pretrain a GPT with Attention Residuals on Megatron-Core. The flags are "
        "Megatron-LM's, with its meanings and defaults; Megatron-LM flags without a counterpart "
        "are refused with the one to use instead.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    add_model_arg(model)
    add_model_shape_args(model)
    add_attn_res_args(parser)

    train = parser.add_argument_group("training")
    add_run_length_args(train)
    add_optimizer_args(train)
    train.add_argument(
        "--attn-res-weight-decay",
        type=attn_res_weight_decay,
        default="none",
        metavar="{none,default,FLOAT}",
        help="Weight decay of the AttnRes vectors (pseudo-queries, key gains): none, default "
        "(--weight-decay, like the weight matrices) or this coefficient (applied as Megatron's "
        "wd_mult relative to --weight-decay, which must then be > 0).",
    )
    train.add_argument("--seed", type=int, default=1234, help="Random seed (Megatron-LM's seeding).")
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
    train.add_argument(
        "--split",
        default="969,30,1",
        help="Train,valid,test split weights of each --data-path prefix (Megatron-LM's parser "
        "default is none, which it turns into 969,30,1 when --data-path is given).",
    )
    train.add_argument(
        "--mock-data",
        action="store_true",
        help="No data files: Megatron-Core's MockGPTDataset (ids from the tokenizer's vocabulary); "
        "not with --data-path.",
    )
    train.add_argument(
        "--eval-interval",
        type=int,
        default=None,
        help="Iterations between evaluations on the validation set (none: only the final "
        "validation and test evaluation, as Megatron-LM).",
    )
    train.add_argument(
        "--eval-iters",
        type=int,
        default=100,
        help="Iterations (global batches) per evaluation; 0 disables evaluation.",
    )

    train.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="Samples per iteration over all data-parallel ranks "
        "(default: micro batch x data-parallel size); larger values accumulate.",
    )
    add_lr_schedule_args(train)
    train.add_argument("--bf16", action="store_true", help="bf16 parameters and activations.")
    train.add_argument(
        "--use-distributed-optimizer",
        action="store_true",
        help="Shard optimizer state across data-parallel ranks.",
    )
    add_recompute_args(parser)
    add_fusion_args(parser)

    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument(
        "--tensor-model-parallel-size", type=int, default=1, help="Tensor-parallel ranks per model replica."
    )
    parallel.add_argument(
        "--pipeline-model-parallel-size", type=int, default=1, help="Pipeline stages per model replica."
    )
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
        help="Megatron-Core's layer layout, stages in chunk order separated by '|' (E embedding, t "
        "transformer layer, L loss; 't*3', '(t*2|)*4' repeat), e.g. 'Et*3|t*3|t*2L'; its stage count / "
        "--pipeline-model-parallel-size sets the virtual stages. tools/plan_pipeline_stages.py "
        "--print-layout gives the AttnRes-balanced one. Not with --decoder-first/last-pipeline-num-layers.",
    )
    parallel.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="Split norms, dropout and the AttnRes mixes along the sequence across TP ranks (needs TP > 1).",
    )
    parallel.add_argument(
        "--context-parallel-size",
        type=int,
        default=1,
        help="Context-parallel ranks (needs Transformer Engine attention).",
    )
    parallel.add_argument(
        "--expert-model-parallel-size", type=int, default=1, help="Ranks the routed experts are spread over."
    )
    parallel.add_argument(
        "--expert-tensor-parallel-size",
        type=int,
        default=None,
        help="Tensor parallelism inside experts (default: the TP size).",
    )

    moe = parser.add_argument_group("mixture of experts")
    moe.add_argument("--num-experts", type=int, default=None, help="Routed experts per MoE layer.")
    moe.add_argument("--moe-router-topk", type=int, default=2, help="Experts per token.")
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
    moe.add_argument(
        "--moe-router-score-function",
        choices=("softmax", "sigmoid"),
        default="softmax",
        help="Router score function.",
    )
    moe.add_argument(
        "--moe-router-enable-expert-bias",
        action="store_true",
        help="Aux-loss-free load balancing: a per-expert bias used for top-k selection.",
    )
    moe.add_argument(
        "--moe-router-bias-update-rate",
        type=float,
        default=1e-3,
        help="Update rate of the expert bias (--moe-router-enable-expert-bias).",
    )
    moe.add_argument(
        "--moe-router-topk-scaling-factor",
        type=float,
        default=None,
        help="Scale of the top-k routing weights (none: unscaled).",
    )
    moe.add_argument(
        "--moe-router-load-balancing-type",
        choices=("aux_loss", "seq_aux_loss", "none"),
        default="aux_loss",
        help="Load-balancing loss (weighted by --moe-aux-loss-coeff).",
    )
    moe.add_argument(
        "--moe-aux-loss-coeff", type=float, default=0.0, help="Weight of the load-balancing loss."
    )
    moe.add_argument(
        "--moe-token-dispatcher-type",
        choices=("allgather", "alltoall"),
        default="allgather",
        help="How tokens reach their experts across expert-parallel ranks.",
    )
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
        default=None,
        help="Load model weights only (e.g. under another TP/PP layout).",
    )
    schedule = ckpt.add_mutually_exclusive_group()
    schedule.add_argument(
        "--override-opt_param-scheduler",
        "--override-opt-param-scheduler",
        action="store_true",
        help="On --load, use this run's learning-rate schedule flags (--lr, --min-lr, warmup, decay, "
        "--train-iters) instead of the checkpoint's; without either flag a change is an error.",
    )
    schedule.add_argument(
        "--use-checkpoint-opt_param-scheduler",
        "--use-checkpoint-opt-param-scheduler",
        action="store_true",
        help="On --load, keep the checkpoint's learning-rate schedule and ignore this run's flags.",
    )
    ckpt.add_argument(
        "--overwrite-checkpoints",
        action="store_true",
        help="Let --save replace checkpoints of another run in its directory (refused otherwise).",
    )
    ckpt.add_argument(
        "--no-verify-checkpoint",
        action="store_true",
        help="On --load, skip checking the files against the checkpoint's sha256 manifest.",
    )
    ckpt.add_argument(
        "--skip-nonfinite-steps",
        action="store_true",
        help="Skip an iteration whose loss or gradients are NaN/Inf instead of stopping.",
    )
    ckpt.add_argument(
        "--max-skipped-nonfinite-steps",
        type=int,
        default=10,
        help="With --skip-nonfinite-steps: stop with an error once more than this many iterations of the "
        "run were skipped (a diverging run).",
    )

    run = parser.add_argument_group("run")
    add_device_arg(run, "cpu enables the CPU/gloo backend; auto picks cuda when available.")
    run.add_argument("--log-interval", type=int, default=100, help="Iterations between log lines.")
    run.add_argument(
        "--summary-json", default=None, help="Write the final summary (losses, tokens/s) to this JSON file."
    )
    add_megatron_lm_run_args(parser)
    add_tokenizer_args(parser)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``attnres-pretrain``'s command line (``sys.argv`` when ``argv`` is None)."""
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
    if args.kv_channels is None and args.hidden_size % args.num_attention_heads:
        raise SystemExit(
            f"error: --hidden-size {args.hidden_size} must be divisible by "
            f"--num-attention-heads {args.num_attention_heads} (or pass --kv-channels)."
        )
    validate_numbers(args)
    validate_model_shape(args)
    validate_lr_schedule(args)
    validate_weight_decay(args)
    num_layers = model_family(args.model).shape("num_layers", args.num_layers)
    validate_pipeline_layout(args, num_layers)
    validate_recompute(args, num_layers)
    validate_optional_packages(args)
    validate_outputs(args)
    if args.mock_data and args.data_path:
        _fail("--mock-data generates its data; drop it or --data-path.")
    if args.save_interval is not None and (args.save_interval < 1 or not args.save):
        _fail("--save-interval needs --save and a value >= 1.")
    if args.load:
        from attnres_megatron.training.checkpointing import CheckpointError, latest_iteration

        try:
            latest_iteration(args.load)
        except CheckpointError as error:
            _fail(str(error))
    validate_parallel_args(args, world_size)


def lr_decay_iters(args: argparse.Namespace) -> int:
    """Iterations the learning rate decays over: ``--lr-decay-iters``, else ``--train-iters``."""
    return args.lr_decay_iters if args.lr_decay_iters is not None else args.train_iters


def lr_warmup_iters(args: argparse.Namespace) -> float:
    """Warmup iterations: ``--lr-warmup-fraction`` of the decay iterations (as Megatron-LM), else
    ``--lr-warmup-iters``."""
    if args.lr_warmup_fraction is not None:
        return args.lr_warmup_fraction * lr_decay_iters(args)
    return args.lr_warmup_iters


def lr_wsd_decay_iters(args: argparse.Namespace) -> int:
    """WSD: iterations of the final decay, ``--lr-wsd-decay-iters`` or 10% of the decay iterations."""
    return args.lr_wsd_decay_iters or max(1, lr_decay_iters(args) // 10)


def scheduler_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments of Megatron-Core's ``OptimizerParamScheduler`` that these flags give."""
    wsd = args.lr_decay_style == "WSD"
    return dict(
        init_lr=args.lr_warmup_init,
        max_lr=float(args.lr),
        min_lr=args.min_lr,
        lr_warmup_steps=lr_warmup_iters(args),
        lr_decay_steps=lr_decay_iters(args),
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=lr_wsd_decay_iters(args) if wsd else None,
        lr_wsd_decay_style=args.lr_wsd_decay_style if wsd else None,
    )


def validate_model_shape(args: argparse.Namespace) -> None:
    """The GPT shape flags fit together (a Kimi preset fixes its own shape)."""
    if not model_family(args.model).shape_from_flags:
        return
    for name in ("kv_channels", "ffn_hidden_size", "max_position_embeddings"):
        value = getattr(args, name)
        if value is not None and value < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1; got {value}.")
    if ffn_hidden_size(args) < 1:
        _fail(
            f"--swiglu with --hidden-size {args.hidden_size} gives Megatron-LM's default MLP width "
            "int(8 x hidden / 3 / 64) x 64 = 0; pass --ffn-hidden-size."
        )
    if args.group_query_attention:
        groups, heads = args.num_query_groups, args.num_attention_heads
        if groups < 1 or heads % groups:
            _fail(f"--num-query-groups {groups} must divide --num-attention-heads {heads}.")
    positions = args.max_position_embeddings
    if positions is not None and positions < args.seq_length:
        _fail(
            f"--max-position-embeddings {positions} must be >= --seq-length {args.seq_length}; "
            "raise it or drop it (it defaults to --seq-length)."
        )
    if not args.init_method_std > 0:
        _fail(f"--init-method-std must be > 0; got {args.init_method_std}.")


def validate_lr_schedule(args: argparse.Namespace) -> None:
    """Learning rate, warmup and decay lengths as Megatron-LM's scheduler needs them."""
    if not args.lr > 0:
        _fail(f"--lr must be > 0; got {args.lr}.")
    if not 0 <= args.min_lr <= args.lr:
        _fail(f"--min-lr {args.min_lr} must be in [0, --lr {args.lr}].")
    if not 0 <= args.lr_warmup_init <= args.lr:
        _fail(f"--lr-warmup-init {args.lr_warmup_init} must be in [0, --lr {args.lr}].")
    if args.lr_decay_iters is not None and args.lr_decay_iters < 1:
        _fail(f"--lr-decay-iters must be >= 1; got {args.lr_decay_iters}.")
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters:
            _fail("--lr-warmup-fraction and --lr-warmup-iters both set the warmup; pass only one.")
        if not 0 <= args.lr_warmup_fraction < 1:
            _fail(f"--lr-warmup-fraction must be in [0, 1); got {args.lr_warmup_fraction}.")
    decay = lr_decay_iters(args)
    if not 0 <= lr_warmup_iters(args) < decay:
        _fail(
            f"--lr-warmup-iters {args.lr_warmup_iters} must be in [0, {decay}), the iterations the "
            "learning rate decays over (--lr-decay-iters, default --train-iters); lower it or raise "
            "--lr-decay-iters."
        )
    if args.lr_wsd_decay_iters is not None and args.lr_wsd_decay_iters < 1:
        _fail(f"--lr-wsd-decay-iters must be >= 1; got {args.lr_wsd_decay_iters}.")


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
    family = model_family(args.model)
    local = resolve_transformer_impl(args.transformer_impl, args.device) == "local"
    if cp > 1 and local:
        _fail(CONTEXT_PARALLEL_NEEDS_TE)
    if args.sequence_parallel and tp == 1:
        _fail("--sequence-parallel needs --tensor-model-parallel-size > 1; drop the flag or raise TP.")
    layer_norm = family.shape("normalization", args.normalization) == "LayerNorm"
    if args.sequence_parallel and local and layer_norm:
        _fail(
            "--sequence-parallel with the local layer spec needs --normalization RMSNorm (PyTorch's "
            "LayerNorm has no sequence-parallel form); pass it, or --transformer-impl transformer_engine."
        )
    if family.shape_from_flags and args.group_query_attention and args.num_query_groups % tp:
        _fail(
            f"--num-query-groups {args.num_query_groups} is not divisible by "
            f"--tensor-model-parallel-size {tp}."
        )
    if args.num_attention_heads % tp:
        _fail(
            f"--num-attention-heads {args.num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size {tp}."
        )
    ep = args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size or tp
    num_experts = family.shape("num_moe_experts", args.num_experts)
    topk = family.shape("moe_router_topk", args.moe_router_topk)
    num_layers = family.shape("num_layers", args.num_layers)
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
        flags = family.shape_from_flags
        if flags and args.moe_router_enable_expert_bias and args.moe_router_score_function != "sigmoid":
            _fail("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid.")
        if flags and args.add_bias_linear and not args.moe_grouped_gemm:
            _fail(
                "--num-experts with linear biases (Megatron-LM's default) fails in Megatron-Core 0.16's "
                "sequential experts (an in-place bias add on a tensor-parallel view in backward); pass "
                "--disable-bias-linear, as MoE models do, or --moe-grouped-gemm on GPU."
            )
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

"""Checks ``validate_args`` runs before any work: number ranges, the recompute and pipeline-layout
flags, the output paths and the optional packages the flags need. Each failure exits with
``error: ...`` naming the flag and the fix, instead of a traceback (or a wrong run) later."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from pathlib import Path
from typing import NoReturn, Optional

from attnres_megatron.config import ATTN_RES_RECOMPUTE_MODULE

# Megatron-Core's selective-recompute modules (TransformerConfig.__post_init__'s list).
MEGATRON_RECOMPUTE_MODULES = (
    "core_attn",
    "moe_act",
    "layernorm",
    "mla_up_proj",
    "mlp",
    "moe",
    "shared_experts",
)
RECOMPUTE_MODULES = (*MEGATRON_RECOMPUTE_MODULES, ATTN_RES_RECOMPUTE_MODULE)
LAYOUT_SYNTAX = (
    "Megatron's layout syntax: stages separated by '|', E the embedding (once, first), t a "
    "transformer layer, L the loss (once, last), x*n repeats, e.g. 'Et*3|t*3|t*2L'"
)
# (flag destination, low, high, whether low and high are allowed, what the value is).
RANGES = (
    ("hidden_dropout", 0.0, 1.0, (True, True), "a dropout probability"),
    ("attention_dropout", 0.0, 1.0, (True, True), "a dropout probability"),
    ("adam_beta1", 0.0, 1.0, (True, False), "Adam's decay rate"),
    ("adam_beta2", 0.0, 1.0, (True, False), "Adam's decay rate"),
    ("adam_eps", 0.0, math.inf, (False, False), "added to Adam's denominator"),
    ("clip_grad", 0.0, math.inf, (True, False), "the gradient-norm bound; 0 turns clipping off"),
    ("norm_epsilon", 0.0, math.inf, (False, False), "the norms' epsilon"),
    ("attn_res_eps", 0.0, math.inf, (False, False), "the key RMS epsilon"),
    ("moe_aux_loss_coeff", 0.0, math.inf, (True, False), "a loss weight"),
    ("moe_router_bias_update_rate", 0.0, math.inf, (True, False), "an update rate"),
    ("moe_router_topk_scaling_factor", 0.0, math.inf, (False, False), "a scale"),
)
# (flag destination, smallest value) of integer flags that may be unset.
MINIMA = (
    ("exit_interval", 1),
    ("eval_interval", 1),
    ("eval_iters", 0),
    ("corpus_bytes", 1),
    ("max_skipped_nonfinite_steps", 0),
    ("recompute_num_layers", 1),
)


def fail(message: str) -> NoReturn:
    """Stop before any work with ``error: message``."""
    raise SystemExit(f"error: {message}")


def flag(name: str) -> str:
    """The command-line spelling of an argument destination."""
    return "--" + name.replace("_", "-")


def _interval(low: float, high: float, closed: tuple[bool, bool]) -> str:
    """``[0, 1)`` style text of an interval."""
    return f"{'[' if closed[0] else '('}{low:g}, {high:g}{']' if closed[1] else ')'}"


def validate_numbers(args: argparse.Namespace) -> None:
    """Every float flag finite; probabilities, Adam's betas and epsilons, clipping and the interval
    flags inside their ranges."""
    for name, value in sorted(vars(args).items()):
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"{flag(name)} must be a finite number; got {value}.")
    for name, low, high, closed, meaning in RANGES:
        value = getattr(args, name, None)
        if value is None:
            continue
        above = value >= low if closed[0] else value > low
        below = value <= high if closed[1] else value < high
        if not (above and below):
            fail(f"{flag(name)} must be in {_interval(low, high, closed)} ({meaning}); got {value}.")
    for name, smallest in MINIMA:
        value = getattr(args, name, None)
        if value is not None and value < smallest:
            fail(f"{flag(name)} must be >= {smallest}; got {value} (leave it out for the default).")


def stock_layers(args: argparse.Namespace) -> bool:
    """Whether the model uses Megatron's own transformer block (no attention residuals)."""
    from attnres_megatron.models.families import model_family

    return model_family(args.model).attention_residuals(args.attention_residuals) == "none"


def validate_recompute(args: argparse.Namespace, num_layers: int) -> None:
    """Megatron's recompute flags: the granularity each needs, known module names, and a
    ``--recompute-num-layers`` within the layers of a pipeline rank."""
    granularity, method, count = args.recompute_granularity, args.recompute_method, args.recompute_num_layers
    if granularity != "full" and (method is not None or count is not None):
        fail(
            "--recompute-method and --recompute-num-layers apply to --recompute-granularity full only; "
            "add it or drop them."
        )
    modules = args.recompute_modules
    if modules is not None and granularity != "selective":
        fail("--recompute-modules applies to --recompute-granularity selective only; add it or drop them.")
    unknown = sorted(set(modules or ()) - set(RECOMPUTE_MODULES))
    if unknown:
        fail(f"--recompute-modules {' '.join(unknown)}: unknown; choose from {', '.join(RECOMPUTE_MODULES)}.")
    if granularity != "full":
        return
    if method is None or count is None:
        fail(
            "--recompute-granularity full needs --recompute-method {uniform,block} and "
            "--recompute-num-layers K."
        )
    pp = args.pipeline_model_parallel_size
    per_rank = max(1, num_layers // pp)
    if count > per_rank:
        fail(
            f"--recompute-num-layers {count} exceeds the {per_rank} layers of a pipeline rank "
            f"({num_layers} layers / --pipeline-model-parallel-size {pp}); use 1 to {per_rank}."
        )
    chunks = pp * (args.num_virtual_stages_per_pipeline_rank or 1)
    uneven = args.decoder_first_pipeline_num_layers or args.decoder_last_pipeline_num_layers
    even_chunk = not uneven and not args.pipeline_model_parallel_layout and num_layers % chunks == 0
    if method == "uniform" and stock_layers(args) and even_chunk and (num_layers // chunks) % count:
        fail(
            f"--recompute-method uniform with --recompute-num-layers {count}: Megatron's transformer "
            f"block (no attention residuals) needs it to divide the {num_layers // chunks} layers of each "
            "pipeline chunk; pick a divisor or --recompute-method block."
        )


def validate_pipeline_layout(args: argparse.Namespace, num_layers: int) -> None:
    """``--pipeline-model-parallel-layout`` parses, fits the pipeline sizes and places every layer once;
    its stages set the virtual pipeline size as in Megatron-LM."""
    layout = args.pipeline_model_parallel_layout
    if layout is None:
        return
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    name = f"--pipeline-model-parallel-layout {layout!r}"
    if args.decoder_first_pipeline_num_layers or args.decoder_last_pipeline_num_layers:
        fail(f"{name} sets the split itself; drop --decoder-first/last-pipeline-num-layers.")
    try:
        stages = PipelineParallelLayerLayout.get_num_stages_from_str(layout)
    except (AssertionError, ValueError) as error:
        fail(f"{name}: {error}. {LAYOUT_SYNTAX}.")
    pp = args.pipeline_model_parallel_size
    if stages % pp or (pp == 1 and stages > 1):
        fail(
            f"{name} has {stages} stages, which --pipeline-model-parallel-size {pp} cannot run: the stage "
            "count must be the pipeline size times the virtual stages per rank (with a pipeline size > 1 "
            "when there is more than one stage)."
        )
    virtual = args.num_virtual_stages_per_pipeline_rank
    if virtual is not None and virtual != stages // pp:
        fail(
            f"{name} has {stages} stages = {pp} pipeline ranks x {stages // pp} virtual stages, but "
            f"--num-virtual-stages-per-pipeline-rank is {virtual}; drop that flag or make them agree."
        )
    if stages // pp > 1:
        args.num_virtual_stages_per_pipeline_rank = stages // pp  # Megatron-LM derives it the same way
    try:
        parsed = PipelineParallelLayerLayout(layout, pp)
        parsed.validate_layer_layout(num_layers=num_layers, mtp_num_layers=None)
    except (AssertionError, ValueError, NotImplementedError) as error:
        fail(f"{name}: {error}; the model has {num_layers} transformer layers (t). {LAYOUT_SYNTAX}.")
    if hasattr(args, "model") and not stock_layers(args):
        from megatron.core.transformer.enums import LayerType

        for index in range(stages):
            vp_stage, pp_rank = divmod(index, pp)
            if LayerType.decoder not in parsed.layout[pp_rank][vp_stage]:
                fail(
                    f"{name}: stage {index} (pipeline rank {pp_rank}, virtual stage {vp_stage}) has no "
                    "transformer layer; attention residuals need at least one per stage (a chunk "
                    "passes its depth state on). Move a layer there, e.g. from "
                    "tools/plan_pipeline_stages.py --print-layout."
                )


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def directory_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be used (or created) as a writable directory; None when it can."""
    target = Path(path).expanduser().absolute()
    existing = _existing_ancestor(target)
    if not existing.is_dir():
        reason = "is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = "is not writable"
    else:
        return None
    if existing == target:
        return reason + (", not a directory" if reason == "is a file" else "")
    return f"cannot be created: {existing} {reason}"


def file_problem(path: str) -> Optional[str]:
    """Why the file ``path`` cannot be written (its directory must exist); None when it can."""
    target = Path(path).expanduser().absolute()
    if target.is_dir():
        return "is a directory; give a file name"
    if not target.parent.is_dir():
        return f"cannot be written: its directory {target.parent} does not exist; create it or pick another"
    writable = os.access(target.parent, os.W_OK | os.X_OK)
    if not writable or (target.exists() and not os.access(target, os.W_OK)):
        return "is not writable"
    return None


def validate_outputs(args: argparse.Namespace) -> None:
    """``--save`` and ``--tensorboard-dir`` are (or can become) writable directories and
    ``--summary-json`` a writable file, so a run never fails on them after training."""
    for name in ("save", "tensorboard_dir"):
        path = getattr(args, name, None)
        problem = directory_problem(path) if path else None
        if problem:
            fail(f"{flag(name)} {path} {problem}; pass a writable directory.")
    problem = file_problem(args.summary_json) if args.summary_json else None
    if problem:
        fail(f"--summary-json {args.summary_json} {problem}.")


def validate_optional_packages(args: argparse.Namespace) -> None:
    """The packages the flags need import: tensorboard and matplotlib for ``--tensorboard-dir``,
    Transformer Engine for ``--transformer-impl transformer_engine``, Triton for the fused
    aggregation on CUDA."""
    if args.tensorboard_dir:
        missing = [name for name in ("tensorboard", "matplotlib") if importlib.util.find_spec(name) is None]
        if missing:
            fail(
                f"--tensorboard-dir needs {' and '.join(missing)}: pip install "
                "'attnres-megatron[tensorboard]', or drop --tensorboard-dir."
            )
    from attnres_megatron.models.specs import resolve_transformer_impl

    try:
        resolve_transformer_impl(args.transformer_impl, args.device)
    except ValueError as error:
        fail(str(error))
    if args.attn_res_impl == "fused" and args.device != "cpu":
        import torch

        if torch.cuda.is_available():  # CPU tensors run the C++ kernels instead
            from attnres_megatron.ops.dispatch import backend_for

            try:
                backend_for("fused", "cuda", torch.float32)
            except ImportError as error:
                fail(f"{error}; or pick another --attn-res-impl (auto, torch, two-phase).")

"""TensorBoard logging for training runs: Megatron-LM's scalars, AttnRes depth diagnostics.

Training and evaluation scalars carry Megatron-LM's tag names (``megatron/training/training.py``:
``training_log`` and ``evaluate_and_print_results``), so runs of ``attnres-pretrain`` overlay
with Megatron-LM runs in one TensorBoard: each value at the iteration, and as ``<tag> vs
samples`` at the consumed training samples where Megatron-LM writes that variant. The AttnRes
depth diagnostics live under their own prefix, ``attn_res/``.

Which rank logs is the caller's decision: construct ``TrainingLogger(log_dir,
enabled=is_the_reporting_rank)``. The loss is usually known on the last pipeline stage;
depth statistics and gradient norms are per rank (each pipeline stage owns its layers), so a
caller either logs from each stage into its own directory or gathers the dictionaries to
one rank first. A disabled logger (or one without a log directory) does nothing and never
imports TensorBoard.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union

import numpy as np

from attnres_megatron.diagnostics.depth import (
    depth_partial_mask,
    depth_weight_matrix,
    render_heatmap,
)

TENSORBOARD_MISSING = "--tensorboard-dir needs tensorboard: pip install 'attnres-megatron[tensorboard]'"
VS_SAMPLES = " vs samples"
TRAINING_TAGS = ("learning-rate", "batch-size", "lm loss", "loss-scale", "grad-norm")
"""Megatron-LM's per-iteration tags, each also written as ``<tag> vs samples``."""
TIMING_TAGS = ("iteration-time", "tokens-per-second")
"""Per log interval, at the iteration only (Megatron-LM writes ``iteration-time``, in
seconds, with ``--log-timers-to-tensorboard``; ``tokens-per-second`` is this trainer's)."""
DEPTH_PREFIX = "attn_res"


def evaluation_tags(split: str = "validation") -> tuple[str, str]:
    """Megatron-LM's tags of an evaluation's loss and perplexity (``lm loss validation``,
    ``lm loss validation ppl``); each is also written as ``<tag> vs samples``."""
    return f"lm loss {split}", f"lm loss {split} ppl"


def _tag_suffix(key: Union[str, int]) -> str:
    """``3`` -> ``L3``; names such as ``L3`` or ``L3.attn`` are kept."""
    return f"L{key}" if isinstance(key, int) or str(key).isdigit() else str(key)


class TrainingLogger:
    """A thin wrapper over ``torch.utils.tensorboard.SummaryWriter``.

    Scalars (Megatron-LM's names): ``learning-rate``, ``batch-size``, ``lm loss``,
    ``loss-scale``, ``grad-norm`` (each also ``... vs samples``), ``iteration-time``,
    ``tokens-per-second``, ``lm loss validation`` and ``lm loss validation ppl`` (and ``lm
    loss test ...``, each also ``... vs samples``). Depth diagnostics:
    ``attn_res/output_rms/<sublayer>``, ``attn_res/grad_norm/L<n>``, and the images
    ``attn_res/depth_attention_weights`` and ``attn_res/layer_stats``.
    """

    def __init__(self, log_dir: Optional[str], enabled: bool = True, flush_secs: int = 30):
        self.log_dir = log_dir
        self.enabled = bool(enabled and log_dir)
        self.writer: Any = None
        if self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(TENSORBOARD_MISSING) from err
            self.writer = SummaryWriter(log_dir=log_dir, flush_secs=flush_secs)

    def log_scalar(
        self, tag: str, value: Optional[float], iteration: int, consumed_samples: Optional[int] = None
    ) -> None:
        """``tag`` at ``iteration``, and ``<tag> vs samples`` at ``consumed_samples`` when given;
        ``None`` values are skipped."""
        if not self.enabled or value is None:
            return
        self.writer.add_scalar(tag, float(value), iteration)
        if consumed_samples is not None:
            self.writer.add_scalar(tag + VS_SAMPLES, float(value), consumed_samples)

    def log_training(
        self,
        iteration: int,
        consumed_samples: int,
        learning_rate: Optional[float],
        batch_size: int,
        loss: Optional[float],
        loss_scale: Optional[float],
        grad_norm: Optional[float],
    ) -> None:
        """One iteration's scalars as Megatron-LM's ``training_log`` writes them (every
        iteration, each also against the consumed samples); ``None`` values are skipped."""
        values = (learning_rate, batch_size, loss, loss_scale, grad_norm)
        for tag, value in zip(TRAINING_TAGS, values):
            self.log_scalar(tag, value, iteration, consumed_samples)

    def log_timing(self, iteration: int, seconds_per_iteration: float, tokens_per_second: float) -> None:
        """Time per iteration (seconds, Megatron-LM's ``iteration-time``) and tokens/s of a log interval."""
        for tag, value in zip(TIMING_TAGS, (seconds_per_iteration, tokens_per_second)):
            self.log_scalar(tag, value, iteration)

    def log_evaluation(
        self, iteration: int, consumed_samples: int, loss: float, perplexity: float, split: str = "validation"
    ) -> None:
        """An evaluation's loss and perplexity on ``split``, at the iteration and the consumed samples."""
        loss_tag, ppl_tag = evaluation_tags(split)
        self.log_scalar(loss_tag, loss, iteration, consumed_samples)
        self.log_scalar(ppl_tag, perplexity, iteration, consumed_samples)

    def log_layer_stats(
        self,
        step: int,
        output_rms: Mapping[Union[str, int], float],
        grad_norms: Mapping[Union[str, int], float],
        image: bool = False,
    ) -> None:
        """Per-sublayer mix RMS (from :func:`~attnres_megatron.diagnostics.depth.output_rms`)
        and per-layer gradient norms (from
        :func:`~attnres_megatron.diagnostics.depth.layer_gradient_norms`) as scalars; with
        ``image=True`` also a two-panel bar chart (needs matplotlib)."""
        if not self.enabled:
            return
        for key, value in output_rms.items():
            self.writer.add_scalar(f"{DEPTH_PREFIX}/output_rms/{_tag_suffix(key)}", float(value), step)
        for key, value in grad_norms.items():
            self.writer.add_scalar(f"{DEPTH_PREFIX}/grad_norm/{_tag_suffix(key)}", float(value), step)
        if image and (output_rms or grad_norms):
            self.writer.add_image(
                f"{DEPTH_PREFIX}/layer_stats",
                render_layer_stats(output_rms, grad_norms),
                step,
                dataformats="HWC",
            )

    def log_depth_heatmap(
        self,
        step: int,
        snapshot: Mapping[str, Mapping[str, Any]],
        tag: str = f"{DEPTH_PREFIX}/depth_attention_weights",
    ) -> None:
        """The depth-weight heatmap of a recorder snapshot as an image (HWC, uint8)."""
        if not self.enabled or not snapshot:
            return
        matrix, rows, cols = depth_weight_matrix(dict(snapshot))
        picture = render_heatmap(
            matrix,
            rows,
            cols,
            title=f"AttnRes depth attention, step {step}",
            partial=depth_partial_mask(dict(snapshot)),
        )
        self.writer.add_image(tag, picture, step, dataformats="HWC")

    def flush(self) -> None:
        """Write pending events to disk."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the writer (safe to call twice)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.enabled = False

    def __enter__(self) -> TrainingLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def render_layer_stats(
    output_rms: Mapping[Union[str, int], float], grad_norms: Mapping[Union[str, int], float]
) -> np.ndarray:
    """Bar charts of mix RMS per sublayer and gradient norm per layer, as ``[H, W, 3]`` uint8."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "layer-stat images need matplotlib: pip install 'attnres-megatron[tensorboard]'"
        ) from err
    panels = [
        (output_rms, "sublayer input RMS (depth mix output)"),
        (grad_norms, "gradient L2 norm per layer"),
    ]
    panels = [(values, title) for values, title in panels if values]
    count = max(len(values) for values, _ in panels)
    figure = Figure(figsize=(min(max(6.0, 0.3 * count + 2.0), 24.0), 2.6 * len(panels)), dpi=100)
    canvas = FigureCanvasAgg(figure)
    for index, (values, title) in enumerate(panels, start=1):
        axes = figure.add_subplot(len(panels), 1, index)
        labels = [_tag_suffix(key) for key in values]
        axes.bar(range(len(labels)), [float(v) for v in values.values()], color="#3b75af")
        axes.set_xticks(range(len(labels)))
        axes.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()

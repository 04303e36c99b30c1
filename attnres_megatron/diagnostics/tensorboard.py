"""TensorBoard logging for training runs: scalars, per-layer depth statistics, depth heatmaps.

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


def _tag_suffix(key: Union[str, int]) -> str:
    """``3`` -> ``L3``; names such as ``L3`` or ``L3.attn`` are kept."""
    return f"L{key}" if isinstance(key, int) or str(key).isdigit() else str(key)


class TrainingLogger:
    """A thin wrapper over ``torch.utils.tensorboard.SummaryWriter``.

    Tags: ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_second``
    (plus ``train/<name>`` for extra keywords), ``depth/output_rms/<sublayer>``,
    ``depth/grad_norm/L<n>``, and the images ``depth/attention_weights`` and
    ``depth/layer_stats``.
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

    def log_scalars(
        self,
        step: int,
        loss: Optional[float] = None,
        lr: Optional[float] = None,
        grad_norm: Optional[float] = None,
        tokens_per_second: Optional[float] = None,
        **extra: Optional[float],
    ) -> None:
        """Training scalars at ``step``; ``None`` values are skipped."""
        if not self.enabled:
            return
        values = dict(loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_second=tokens_per_second, **extra)
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"train/{name}", float(value), step)

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
            self.writer.add_scalar(f"depth/output_rms/{_tag_suffix(key)}", float(value), step)
        for key, value in grad_norms.items():
            self.writer.add_scalar(f"depth/grad_norm/{_tag_suffix(key)}", float(value), step)
        if image and (output_rms or grad_norms):
            self.writer.add_image(
                "depth/layer_stats", render_layer_stats(output_rms, grad_norms), step, dataformats="HWC"
            )

    def log_depth_heatmap(
        self, step: int, snapshot: Mapping[str, Mapping[str, Any]], tag: str = "depth/attention_weights"
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

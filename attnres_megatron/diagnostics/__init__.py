"""Diagnostics for AttnRes models: depth-attention weights, per-layer statistics, TensorBoard.

Nothing here runs unless asked: :class:`DepthAttentionRecorder` installs forward hooks only
while it is attached, and :class:`TrainingLogger` imports TensorBoard only when a log
directory is given.
"""

from attnres_megatron.diagnostics.depth import (
    DepthAttentionRecorder,
    depth_partial_mask,
    depth_weight_matrix,
    find_depth_mixers,
    format_matrix,
    layer_gradient_norms,
    output_rms,
    render_heatmap,
)
from attnres_megatron.diagnostics.tensorboard import TrainingLogger

__all__ = [
    "DepthAttentionRecorder",
    "TrainingLogger",
    "depth_partial_mask",
    "depth_weight_matrix",
    "find_depth_mixers",
    "format_matrix",
    "layer_gradient_norms",
    "output_rms",
    "render_heatmap",
]

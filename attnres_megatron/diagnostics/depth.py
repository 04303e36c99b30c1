"""What each AttnRes depth mixer attends to, and how big each layer's output and gradient are.

Sublayers are named by their global position, so names agree across pipeline stages:
``L{n}.attn`` and ``L{n}.mlp`` for the attention and MLP sublayers of (1-based, global)
layer ``n``, at global sublayer indices ``2(n-1)`` and ``2(n-1)+1``, and ``final`` for
the mix after the last layer (index ``2 * num_layers``).

Sources of a mixer are ``b0`` (the embedding), the completed blocks ``b1, b2, ..`` and,
when a block is in progress, its partial sum. Source ``i`` is therefore always block ``i``
(complete, or partial when it is the last source of a mixer that sees a partial sum), so
one matrix row per block index lines every mixer up.

Statistics are local to the calling rank: with sequence parallelism each tensor-parallel
rank sees its own slice of the tokens, and under pipeline parallelism each rank sees only
its own layers. The caller decides which rank reports (or gathers the snapshots).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Optional, Union

import numpy as np
import torch
from megatron.core.transformer.transformer_layer import BaseTransformerLayer
from torch import Tensor

from attnres_megatron.layers.depth_attention import DepthAttention

ModelChunks = Union[torch.nn.Module, Sequence[torch.nn.Module]]

MATPLOTLIB_MISSING = "render_heatmap needs matplotlib: pip install 'attnres-megatron[tensorboard]'"
FINAL_NAME = "final"
_NAME_PATTERN = re.compile(r"^L(\d+)\.(attn|mlp)$")


def _chunks(model_chunks: ModelChunks) -> list[torch.nn.Module]:
    """A model or a list of model chunks (virtual pipeline stages), as a list."""
    if isinstance(model_chunks, torch.nn.Module):
        return [model_chunks]
    return list(model_chunks)


def _is_layer(module: torch.nn.Module) -> bool:
    return isinstance(module, BaseTransformerLayer) and isinstance(getattr(module, "layer_number", None), int)


@dataclass(frozen=True)
class MixerInfo:
    """One depth mixer and where it sits in the whole (unsplit) model."""

    name: str
    """Global sublayer name: ``L{n}.attn``, ``L{n}.mlp`` or ``final``."""
    sublayer: int
    """Global 0-based sublayer index (``final`` is ``2 * num_layers``)."""
    layer: Optional[int]
    """Global 1-based layer number (``None`` for ``final``)."""
    module_path: str
    """Qualified module name inside its chunk (local layer index, wrapper prefixes kept)."""
    module: DepthAttention = field(compare=False, repr=False)

    @property
    def has_partial(self) -> bool:
        """Whether the last source of this mixer is the partial sum of the block in progress."""
        per_block = getattr(self.module.config, "attn_res_sublayers_per_block", None) or 1
        if self.layer is None:  # the final mix reads the state as the last layer left it
            return self.sublayer > 0
        return self.sublayer % per_block != 0


def find_depth_mixers(model_chunks: ModelChunks) -> list[MixerInfo]:
    """Every :class:`DepthAttention` of this rank's chunks, ordered by global sublayer index."""
    found: dict[int, MixerInfo] = {}
    for chunk in _chunks(model_chunks):
        for path, module in chunk.named_modules():
            if _is_layer(module):
                layer = module.layer_number
                for offset, attr, kind in ((0, "attn_res_attention", "attn"), (1, "attn_res_mlp", "mlp")):
                    mixer = getattr(module, attr, None)
                    if isinstance(mixer, DepthAttention):
                        sublayer = 2 * (layer - 1) + offset
                        found[sublayer] = MixerInfo(
                            f"L{layer}.{kind}", sublayer, layer, f"{path}.{attr}".lstrip("."), mixer
                        )
            final = getattr(module, "attn_res_final", None)
            if isinstance(final, DepthAttention):
                sublayer = 2 * final.config.num_layers
                found[sublayer] = MixerInfo(
                    FINAL_NAME, sublayer, None, f"{path}.attn_res_final".lstrip("."), final
                )
    return [found[key] for key in sorted(found)]


def depth_softmax_weights(sources: Sequence[Tensor], query: Tensor, gain: Tensor, eps: float) -> Tensor:
    """Per-token softmax weights ``[n, ...]`` of a depth mix, in fp32 (fp64 for fp64 sources).

    ``alpha_i = softmax_i(query . (gain * v_i / sqrt(mean(v_i^2) + eps)))``; computed source by
    source so no ``[n, ..., h]`` stack is materialised.
    """
    dtype = torch.float64 if sources[0].dtype == torch.float64 else torch.float32
    weighted_query = query.detach().to(dtype) * gain.detach().to(dtype)
    logits = []
    for source in sources:
        value = source.detach().to(dtype)
        logits.append((value @ weighted_query) * torch.rsqrt(value.pow(2).mean(-1) + eps))
    return torch.softmax(torch.stack(logits), dim=0)


class _Accumulator:
    """Running sums of one mixer, kept on the mixer's device (no host sync in the hook)."""

    def __init__(self) -> None:
        self.weight_sum: Optional[Tensor] = None
        self.tokens = 0
        self.square_sum: Optional[Tensor] = None
        self.elements = 0
        self.calls = 0

    def add(self, alpha: Tensor, output: Tensor) -> None:
        n = alpha.shape[0]
        weight_sum = alpha.reshape(n, -1).sum(-1, dtype=torch.float64)
        square_sum = torch.linalg.vector_norm(output.detach(), dtype=torch.float32).double().square()
        if self.weight_sum is None or self.weight_sum.shape[0] != n:
            self.weight_sum, self.tokens = weight_sum, 0
            self.square_sum, self.elements = square_sum, 0
        else:
            self.weight_sum = self.weight_sum + weight_sum
            self.square_sum = self.square_sum + square_sum
        self.tokens += alpha[0].numel()
        self.elements += output.numel()
        self.calls += 1


class DepthAttentionRecorder:
    """Record what every depth mixer of ``model_chunks`` attends to.

    While attached (inside ``with recorder:`` or between :meth:`attach` and :meth:`detach`),
    a forward hook on each :class:`DepthAttention` recomputes, under ``torch.no_grad``, the
    softmax weights from the module's inputs and accumulates their mean over tokens and
    micro-batches, plus the RMS of the mix output (the "PreNorm dilution" picture: how big
    the input to each sublayer is). Detached, no hook is installed, so it costs nothing.

    Example::

        recorder = DepthAttentionRecorder(model_chunks)
        with recorder:          # e.g. only on logging steps
            run_forward_backward(...)
        snapshot = recorder.snapshot()
        recorder.reset()
    """

    def __init__(self, model_chunks: ModelChunks, enabled: bool = True):
        self.mixers = find_depth_mixers(model_chunks)
        self.enabled = enabled
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._stats: dict[str, _Accumulator] = {}

    @property
    def attached(self) -> bool:
        """Whether the hooks are installed."""
        return bool(self._handles)

    def attach(self) -> DepthAttentionRecorder:
        """Install the forward hooks (no-op when disabled or already attached)."""
        if self.enabled and not self._handles:
            for info in self.mixers:
                self._handles.append(info.module.register_forward_hook(self._hook(info), with_kwargs=True))
        return self

    def detach(self) -> None:
        """Remove the hooks; recorded statistics are kept until :meth:`reset`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> DepthAttentionRecorder:
        return self.attach()

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.detach()

    def reset(self) -> None:
        """Forget what was recorded (call once per logged step)."""
        self._stats.clear()

    def _hook(self, info: MixerInfo):
        def hook(module: DepthAttention, args: tuple, kwargs: dict, output: Tensor) -> None:
            sources = args[0] if args else kwargs["sources"]
            with torch.no_grad():
                alpha = depth_softmax_weights(sources, module.pseudo_query, module.key_gain, module.eps)
                self._stats.setdefault(info.name, _Accumulator()).add(alpha, output)

        return hook

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """What was recorded since the last :meth:`reset`, by global sublayer name.

        Each entry: ``weights`` (mean softmax weight per source, fp32 values as floats;
        they sum to 1), ``sources`` (number of sources), ``rms`` (RMS of the mix output),
        ``sublayer`` (global index), ``layer`` (global layer number or ``None``),
        ``partial`` (whether the last source is a partial block sum), ``tokens`` (tokens
        averaged over) and ``module`` (module path in its chunk). Entries are in sublayer
        order; mixers that did not run are absent. One host sync per mixer.
        """
        result: dict[str, dict[str, Any]] = {}
        for info in self.mixers:
            stats = self._stats.get(info.name)
            if stats is None or stats.weight_sum is None or stats.square_sum is None:
                continue
            weights = (stats.weight_sum / stats.tokens).float().cpu()
            result[info.name] = {
                "weights": weights.tolist(),
                "sources": int(weights.numel()),
                "rms": math.sqrt(float(stats.square_sum) / max(stats.elements, 1)),
                "sublayer": info.sublayer,
                "layer": info.layer,
                "partial": info.has_partial,
                "tokens": stats.tokens,
                "calls": stats.calls,
                "module": info.module_path,
            }
        return result


def output_rms(snapshot: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{sublayer name: RMS of the mix output}`` from a :meth:`DepthAttentionRecorder.snapshot`."""
    return {name: float(entry["rms"]) for name, entry in _ordered(snapshot)}


def layer_gradient_norms(model_chunks: ModelChunks) -> dict[str, float]:
    """L2 norm of each transformer layer's parameter gradients, keyed ``L{global layer number}``.

    Uses ``param.main_grad`` (Megatron DDP's fp32 buffer) when present, else ``param.grad``;
    parameters without either are skipped (a layer with none reports 0.0). Norms cover this
    rank's shards only (tensor-parallel shards are not gathered). Call after the backward
    pass and before the optimizer zeroes the gradients.
    """
    norms: dict[int, Tensor] = {}
    for chunk in _chunks(model_chunks):
        for module in chunk.modules():
            if not _is_layer(module):
                continue
            total = norms.get(module.layer_number)
            for param in module.parameters():
                grad = getattr(param, "main_grad", None)
                if grad is None:
                    grad = param.grad
                if grad is None:
                    continue
                square = torch.linalg.vector_norm(grad.detach(), dtype=torch.float32).double().square()
                total = square if total is None else total + square.to(total.device)
            norms[module.layer_number] = total if total is not None else torch.zeros((), dtype=torch.float64)
    return {f"L{layer}": math.sqrt(float(norms[layer])) for layer in sorted(norms)}


def _sublayer_of(name: str, entry: dict[str, Any]) -> float:
    """Global sublayer index of a snapshot entry (from the entry, else from its name)."""
    if entry.get("sublayer") is not None:
        return float(entry["sublayer"])
    match = _NAME_PATTERN.match(name)
    if match:
        return 2.0 * (int(match.group(1)) - 1) + (match.group(2) == "mlp")
    if name == FINAL_NAME:
        return math.inf
    raise ValueError(f"cannot place sublayer {name!r}: expected L<n>.attn, L<n>.mlp or {FINAL_NAME!r}.")


def _ordered(snapshot: dict[str, dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    return iter(sorted(snapshot.items(), key=lambda item: _sublayer_of(*item)))


def source_labels(count: int) -> list[str]:
    """Row labels for ``count`` sources: ``b0 (embedding)``, ``b1``, ``b2``, .."""
    return ["b0 (embedding)"] + [f"b{i}" for i in range(1, count)]


def depth_weight_matrix(
    snapshot: dict[str, dict[str, Any]],
) -> tuple[np.ndarray, list[str], list[str]]:
    """Mean depth weights as a ``[max_sources, n_sublayers]`` matrix, NaN where a mixer has no
    such source, with row labels (sources) and column labels (sublayers, global order)."""
    ordered = list(_ordered(snapshot))
    rows = max((len(entry["weights"]) for _, entry in ordered), default=0)
    matrix = np.full((rows, len(ordered)), np.nan, dtype=np.float64)
    for column, (_, entry) in enumerate(ordered):
        weights = np.asarray(entry["weights"], dtype=np.float64)
        matrix[: weights.size, column] = weights
    return matrix, source_labels(rows), [name for name, _ in ordered]


def depth_partial_mask(snapshot: dict[str, dict[str, Any]]) -> np.ndarray:
    """Boolean matrix shaped like :func:`depth_weight_matrix`'s: True at each mixer's
    partial-sum source (the block still in progress)."""
    matrix, _, _ = depth_weight_matrix(snapshot)
    mask = np.zeros(matrix.shape, dtype=bool)
    for column, (_, entry) in enumerate(_ordered(snapshot)):
        if entry.get("partial"):
            mask[len(entry["weights"]) - 1, column] = True
    return mask


def format_matrix(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], digits: int = 3) -> str:
    """The matrix as an aligned text table (``-`` for absent sources)."""
    width = max([digits + 3] + [len(c) for c in cols])
    label = max([len(r) for r in rows] + [6])
    lines = [" " * label + " " + " ".join(c.rjust(width) for c in cols)]
    for name, values in zip(rows, matrix):
        cells = ["-".rjust(width) if np.isnan(v) else f"{v:.{digits}f}".rjust(width) for v in values]
        lines.append(name.ljust(label) + " " + " ".join(cells))
    return "\n".join(lines)


def render_heatmap(
    matrix: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    path: Optional[str] = None,
    title: str = "AttnRes depth attention: mean softmax weight per source",
    partial: Optional[np.ndarray] = None,
    vmax: float = 1.0,
) -> np.ndarray:
    """Draw sources (y) against sublayers (x) and return the picture as ``[H, W, 3]`` uint8.

    Absent sources are grey; cells hold their value when the matrix is small enough to read;
    ``partial`` (see :func:`depth_partial_mask`) outlines partial-sum cells. Writes a PNG to
    ``path`` when given. Needs matplotlib (Agg canvas; pyplot's global state is not used).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as err:
        raise ImportError(MATPLOTLIB_MISSING) from err
    import matplotlib as mpl

    matrix = np.asarray(matrix, dtype=np.float64)
    n_rows, n_cols = matrix.shape
    width = min(max(6.0, 0.55 * n_cols + 3.0), 30.0)
    height = min(max(3.2, 0.45 * n_rows + 2.0), 20.0)
    figure = Figure(figsize=(width, height), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    cmap = mpl.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = axes.imshow(
        np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest"
    )
    step = max(1, math.ceil(n_cols / 60))
    axes.set_xticks(range(0, n_cols, step))
    axes.set_xticklabels(list(cols)[::step], rotation=60, ha="right", fontsize=8)
    axes.set_yticks(range(n_rows))
    axes.set_yticklabels(list(rows), fontsize=8)
    axes.set_xlabel("sublayer (global order)")
    axes.set_ylabel("source (depth block)")
    axes.set_title(title, fontsize=10)
    if n_rows * n_cols <= 600 and n_cols <= 40:
        for r in range(n_rows):
            for c in range(n_cols):
                value = matrix[r, c]
                if not np.isnan(value):
                    color = "black" if value > 0.6 * vmax else "white"
                    axes.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=6.5, color=color)
    if partial is not None:
        for r, c in zip(*np.nonzero(np.asarray(partial, dtype=bool))):
            axes.add_patch(
                Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="#ff7f0e", linewidth=1.5)
            )
        if np.any(partial):
            axes.set_title(f"{title}\n(orange outline: partial sum of the block in progress)", fontsize=10)
    colorbar = figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02)
    colorbar.set_label("mean weight", fontsize=8)
    figure.tight_layout()
    canvas.draw()
    picture = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    if path is not None:
        figure.savefig(path, dpi=100)
    return picture

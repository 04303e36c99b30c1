"""Depth-attention recorder, per-layer statistics, heatmaps, TensorBoard logger and plot tool."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import forked_cli
import numpy as np
import pytest
import torch
from attnres_defaults import PRE_MEGATRON_DEFAULTS, old_ffn
from worker_models import small_gpt_config

from attnres_megatron import DepthAttention
from attnres_megatron.diagnostics import (
    DepthAttentionRecorder,
    TrainingLogger,
    depth_partial_mask,
    depth_weight_matrix,
    format_matrix,
    layer_gradient_norms,
    output_rms,
    render_heatmap,
)
from attnres_megatron.models.builder import build_gpt_model

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, BATCH = 64, 8, 2
SOURCES_S2_3_LAYERS = [1, 2, 2, 3, 3, 4, 4]
NAMES_3_LAYERS = ["L1.attn", "L1.mlp", "L2.attn", "L2.mlp", "L3.attn", "L3.mlp", "final"]


def tiny_model(reseed, randomize: bool) -> torch.nn.Module:
    config = small_gpt_config(
        num_layers=3, params_dtype=torch.float32, attention_residuals="block", attn_res_block_size=2
    )
    reseed()
    model = build_gpt_model(config, VOCAB, SEQ, transformer_impl="local")
    if randomize:
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "attn_res" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 2)
    return model


def forward(model: torch.nn.Module, seed: int) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    return model(ids, torch.arange(SEQ).unsqueeze(0).expand_as(ids), None)


def independent_weights(module: DepthAttention, sources: list[torch.Tensor]) -> torch.Tensor:
    """Per-token weights [n, tokens] in fp64, straight from the formula."""
    values = torch.stack([s.detach().double().reshape(-1, s.shape[-1]) for s in sources])
    keys = (
        module.key_gain.detach().double()
        * values
        / torch.sqrt(values.pow(2).mean(-1, keepdim=True) + module.eps)
    )
    return torch.softmax(keys @ module.pseudo_query.detach().double(), dim=0)


def test_recorder_matches_independent_recomputation(reseed):
    model = tiny_model(reseed, randomize=True)
    seen: dict[int, list[torch.Tensor]] = {}
    mixers = [m for m in model.modules() if isinstance(m, DepthAttention)]

    def capture(index):
        def hook(module, inputs, output):
            weights = independent_weights(module, inputs[0])
            rms_sq = output.detach().double().pow(2).mean()
            seen.setdefault(index, []).append((weights, rms_sq))

        return hook

    handles = [m.register_forward_hook(capture(i)) for i, m in enumerate(mixers)]
    recorder = DepthAttentionRecorder(model)
    assert not recorder.attached
    with recorder:
        assert recorder.attached
        for seed in (0, 1):  # two micro-batches
            forward(model, seed).sum().backward()
    assert not recorder.attached
    for handle in handles:
        handle.remove()
    snapshot = recorder.snapshot()
    assert list(snapshot) == NAMES_3_LAYERS
    assert [entry["sources"] for entry in snapshot.values()] == SOURCES_S2_3_LAYERS
    for index, (name, entry) in enumerate(snapshot.items()):
        assert entry["sublayer"] == index
        assert entry["tokens"] == 2 * SEQ * BATCH and entry["calls"] == 2
        assert math.isclose(sum(entry["weights"]), 1.0, rel_tol=0, abs_tol=1e-5), name
        expected = torch.cat([w for w, _ in seen[index]], dim=1).mean(1)
        torch.testing.assert_close(
            torch.tensor(entry["weights"], dtype=torch.float64), expected, atol=1e-5, rtol=0
        )
        expected_rms = math.sqrt(sum(float(r) for _, r in seen[index]) / 2)
        assert math.isclose(entry["rms"], expected_rms, rel_tol=1e-4), name
    assert not all(np.allclose(e["weights"], 1 / e["sources"]) for e in snapshot.values())
    assert output_rms(snapshot) == {name: entry["rms"] for name, entry in snapshot.items()}

    # Detached: the hooks are gone, nothing more is recorded; reset forgets.
    forward(model, 2)
    assert recorder.snapshot()["final"]["calls"] == 2
    recorder.reset()
    assert recorder.snapshot() == {}
    disabled = DepthAttentionRecorder(model, enabled=False)
    with disabled:
        assert not disabled.attached
        forward(model, 3)
    assert disabled.snapshot() == {}


def test_zero_queries_give_uniform_weights_and_matrix_layout(reseed):
    model = tiny_model(reseed, randomize=False)
    with torch.no_grad(), DepthAttentionRecorder(model) as recorder:
        forward(model, 0)
    snapshot = recorder.snapshot()
    for entry in snapshot.values():
        np.testing.assert_allclose(entry["weights"], [1 / entry["sources"]] * entry["sources"], atol=1e-6)

    matrix, rows, cols = depth_weight_matrix(snapshot)
    assert matrix.shape == (4, 7)
    assert cols == NAMES_3_LAYERS
    assert rows == ["b0 (embedding)", "b1", "b2", "b3"]
    assert [int((~np.isnan(matrix[:, c])).sum()) for c in range(7)] == SOURCES_S2_3_LAYERS
    np.testing.assert_allclose(np.nansum(matrix, axis=0), 1.0, atol=1e-6)
    # Order comes from the global sublayer index, not from the dictionary order.
    shuffled = dict(reversed(list(snapshot.items())))
    assert depth_weight_matrix(shuffled)[2] == NAMES_3_LAYERS
    partial = depth_partial_mask(snapshot)
    assert partial.shape == matrix.shape
    # S=2: odd sublayers (L*.mlp) and the final mix read a partial sum as their last source.
    assert [bool(partial[:, c].any()) for c in range(7)] == [False, True, False, True, False, True, True]
    text = format_matrix(matrix, rows, cols)
    assert "L3.mlp" in text and "b0 (embedding)" in text and "0.250" in text


def test_layer_gradient_norms(reseed):
    model = tiny_model(reseed, randomize=True)
    forward(model, 0).pow(2).mean().backward()
    norms = layer_gradient_norms(model)
    assert list(norms) == ["L1", "L2", "L3"]
    layer = model.decoder.layers[1]
    expected = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in layer.parameters()))
    assert math.isclose(norms["L2"], expected, rel_tol=1e-5)
    assert all(value > 0 for value in norms.values())
    # Megatron DDP's main_grad takes precedence over .grad.
    for param in layer.parameters():
        param.main_grad = torch.full_like(param, 2.0)
    count = sum(p.numel() for p in layer.parameters())
    assert math.isclose(layer_gradient_norms([model])["L2"], 2.0 * math.sqrt(count), rel_tol=1e-6)


def test_heatmap_png(tmp_path):
    from PIL import Image

    snapshot = {
        "L1.attn": {"weights": [1.0], "sources": 1, "rms": 1.0, "sublayer": 0, "partial": False},
        "L1.mlp": {"weights": [0.3, 0.7], "sources": 2, "rms": 1.0, "sublayer": 1, "partial": True},
        "final": {"weights": [0.2, 0.5, 0.3], "sources": 3, "rms": 1.0, "sublayer": 2, "partial": True},
    }
    matrix, rows, cols = depth_weight_matrix(snapshot)
    path = tmp_path / "heat.png"
    picture = render_heatmap(
        matrix, rows, cols, path=str(path), title="test", partial=depth_partial_mask(snapshot)
    )
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert 200 <= picture.shape[0] <= 2000 and 300 <= picture.shape[1] <= 4000
    assert picture.std() > 10  # not a blank canvas
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (picture.shape[1], picture.shape[0])


def test_tensorboard_logger_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    snapshot = {
        "L1.attn": {"weights": [1.0], "sources": 1, "rms": 1.5, "sublayer": 0, "partial": False},
        "L1.mlp": {"weights": [0.4, 0.6], "sources": 2, "rms": 0.5, "sublayer": 1, "partial": True},
        "final": {"weights": [0.5, 0.5], "sources": 2, "rms": 0.7, "sublayer": 2, "partial": True},
    }
    with TrainingLogger(str(tmp_path)) as logger:
        for step in (1, 2):
            logger.log_training(step, 8 * step, 1e-3, 8, 3.0 / step, 1.0, 0.5)
            logger.log_layer_stats(step, output_rms(snapshot), {"L1": 0.25, 2: 0.125}, image=step == 2)
        logger.log_timing(2, 0.25, 1000.0)
        logger.log_evaluation(2, 16, 2.0, math.exp(2.0))
        logger.log_evaluation(2, 16, 2.5, math.exp(2.5), split="test")
        logger.log_depth_heatmap(2, snapshot)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    megatron = ["learning-rate", "batch-size", "lm loss", "loss-scale", "grad-norm", "lm loss validation"]
    megatron += ["lm loss validation ppl", "lm loss test", "lm loss test ppl"]
    expected = {
        *megatron,
        *(f"{tag} vs samples" for tag in megatron),
        "iteration-time",
        "tokens-per-second",
        "attn_res/output_rms/L1.attn",
        "attn_res/output_rms/L1.mlp",
        "attn_res/output_rms/final",
        "attn_res/grad_norm/L1",
        "attn_res/grad_norm/L2",
    }
    assert scalars == expected
    assert [e.value for e in events.Scalars("lm loss")] == pytest.approx([3.0, 1.5])
    by_samples = events.Scalars("lm loss vs samples")
    assert [e.step for e in by_samples] == [8, 16]
    assert [e.value for e in by_samples] == pytest.approx([3.0, 1.5])
    assert [e.value for e in events.Scalars("lm loss validation ppl")] == pytest.approx([math.exp(2.0)])
    assert {"attn_res/depth_attention_weights", "attn_res/layer_stats"} == set(events.Tags()["images"])

    disabled = TrainingLogger(None)
    disabled.log_training(1, 8, 1e-3, 8, 1.0, 1.0, 0.5)
    disabled.close()
    assert not disabled.enabled


def test_plot_tool_random_init_demo(tmp_path):
    from PIL import Image

    output = tmp_path / "depth_attention.png"
    result = forked_cli.run(
        [
            sys.executable,
            str(REPO_ROOT / "tools" / "plot_depth_attention.py"),
            "--random-init-demo",
            "--num-layers",
            "2",
            "--hidden-size",
            "32",
            "--seq-length",
            "16",
            "--output",
            str(output),
            "--save-export",
            str(tmp_path / "export"),
        ],
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "b0 (embedding)" in result.stdout and "final" in result.stdout
    with Image.open(output) as image:
        assert image.format == "PNG" and image.size[0] >= 300 and image.size[1] >= 200
    assert (tmp_path / "export" / "model_state.pt").is_file()
    assert (tmp_path / "export" / "args.json").is_file()

    # The plain export loads back into the same model: identical weights, identical picture.
    reloaded = forked_cli.run(
        [
            sys.executable,
            str(REPO_ROOT / "tools" / "plot_depth_attention.py"),
            "--checkpoint",
            str(tmp_path / "export"),
            "--output",
            str(tmp_path / "reloaded.png"),
        ],
        timeout=300,
        cwd=tmp_path,
    )
    assert reloaded.returncode == 0, reloaded.stderr[-3000:]
    assert reloaded.stdout.splitlines()[:-1] == result.stdout.splitlines()[:-1]


TRAINED = [
    *PRE_MEGATRON_DEFAULTS,
    *old_ffn(32),
    "--device",
    "cpu",
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "16",
    "--micro-batch-size",
    "2",
    "--train-iters",
    "3",
    "--lr",
    "0.03",
    "--lr-warmup-iters",
    "1",
    "--corpus-bytes",
    "300000",
    "--attention-residuals",
    "block",
    "--attn-res-block-size",
    "2",
]
# Megatron's local layer spec checkpoints its pre-norms under Transformer Engine's names.
TE_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def plain_model_state(checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """A whole-model state dict read with torch.distributed.checkpoint alone (no Megatron):
    layer tensors are stored stacked along a leading layer dimension."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(checkpoint), str(scratch))
    state = {}
    for key, value in torch.load(scratch, weights_only=False).items():
        if key.startswith(("optimizer", "rng_state")) or "_extra_state" in key:
            continue
        if key.startswith("decoder.layers."):
            name = key.removeprefix("decoder.layers.")
            for layer, tensor in enumerate(value):
                state[f"decoder.layers.{layer}.{TE_NORM_NAMES.get(name, name)}"] = tensor
        else:
            state[key] = value
    return state


def plot_tool_module():
    """tools/plot_depth_attention.py imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "plot_depth_attention", REPO_ROOT / "tools/plot_depth_attention.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_tool_reads_a_distributed_checkpoint(tmp_path, reseed):
    from attnres_megatron.training.arguments import build_parser
    from attnres_megatron.training.corpus import BYTE_VOCAB_SIZE
    from attnres_megatron.training.model_setup import config_from_args

    ck = tmp_path / "ck"
    trained = forked_cli.run(
        [sys.executable, "-m", "attnres_megatron.training.pretrain", *TRAINED, "--save", str(ck)],
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    output, snapshot_path = tmp_path / "depth.png", tmp_path / "snapshot.json"
    tool = [sys.executable, str(REPO_ROOT / "tools" / "plot_depth_attention.py")]
    result = forked_cli.run(
        [*tool, "--load", str(ck), "--output", str(output), "--snapshot-json", str(snapshot_path)],
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    png = output.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    reported = json.loads(snapshot_path.read_text())

    # The same model, loaded independently of the tool and of Megatron's sharded loading.
    args = build_parser().parse_args(TRAINED)
    reseed()
    model = build_gpt_model(config_from_args(args, "cpu"), BYTE_VOCAB_SIZE, 16, transformer_impl="local")
    loaded = model.load_state_dict(
        plain_model_state(ck / "iter_0000003", tmp_path / "plain.pt"), strict=False
    )
    assert not loaded.unexpected_keys
    assert all(key.endswith("_extra_state") for key in loaded.missing_keys)
    assert torch.count_nonzero(model.decoder.attn_res_final.pseudo_query) > 0  # trained queries
    plot = plot_tool_module()
    expected = plot.record_forward(model, 16, 2, 1234)
    assert list(reported) == list(expected) == NAMES_3_LAYERS[:4] + ["final"]
    for name, entry in expected.items():
        np.testing.assert_allclose(reported[name]["weights"], entry["weights"], rtol=0, atol=1e-6)
    assert any(np.abs(np.array(e["weights"]) - 1 / e["sources"]).max() > 1e-3 for e in expected.values())
    matrix, rows, cols = depth_weight_matrix(expected)
    assert format_matrix(matrix, rows, cols) in result.stdout

    # Missing and corrupted checkpoints: clear errors naming the directory.
    with pytest.raises(SystemExit, match="latest_checkpointed_iteration.txt"):
        plot.checkpoint_args(tmp_path / "nothing")
    for shard in (ck / "iter_0000003").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(SystemExit, match=f"--load {ck}: .* incomplete or corrupted"):
        plot.load_distributed_checkpoint(model, ck)

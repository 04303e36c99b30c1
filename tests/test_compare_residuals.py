"""tools/compare_residuals.py: a tiny sweep end to end, the same batches and initial shared weights
for every variant of a seed, the table's statistics against a hand computation, resuming."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import forked_cli
import pytest
import torch
from test_pipeline_tools import load_tool

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
    "--micro-batch-size", "2", "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "2",
    "--save-interval", "2", "--corpus-bytes", "200000", "--split", "80,20,0", "--device", "cpu",
]  # fmt: skip
TINY = [*TINY_MODEL, "--train-iters", "4"]
SWEEP = ["--seeds", "1", "--variants", "baseline", "block", "full", "--attn-res-num-blocks", "2", *TINY]


compare = load_tool("compare_residuals")


def run_tool(output: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> tuple[int, list[list[str]]]:
    """The tool's main in this process, each run forked from the preloaded CLI server; the status
    and the commands it started."""
    launched: list[list[str]] = []

    def popen(command: list[str], **kwargs):
        launched.append(command)
        return forked_cli.Popen(command, **kwargs)

    monkeypatch.setattr(compare, "POPEN", popen)
    return compare.main(["--output-dir", str(output), *SWEEP, *extra]), launched


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """One tiny sweep: 1 seed, 4 steps, baseline, Block (N=2) and Full."""
    output = tmp_path_factory.mktemp("compare") / "sweep"
    with pytest.MonkeyPatch.context() as monkeypatch:
        status, launched = run_tool(output, monkeypatch)
    assert status == 0
    assert len(launched) == 3
    return output


def observations(output: Path, name: str) -> list[dict]:
    lines = (output / "runs" / name / "observations.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def batch_digests(output: Path, name: str) -> dict[int, str]:
    return {r["iteration"]: r["sha256"] for r in observations(output, name) if r["event"] == "batch"}


def logged_validation_losses(output: Path, name: str) -> dict[int, list[float]]:
    """Validation losses as the run printed them (Megatron-LM's evaluation lines)."""
    losses: dict[int, list[float]] = {}
    for line in (output / "runs" / name / "log.txt").read_text().splitlines():
        if "validation loss at iteration" in line and "on test set" not in line:
            iteration = int(line.split("at iteration ")[1].split()[0])
            losses.setdefault(iteration, []).append(float(line.split("lm loss value: ")[1].split()[0]))
    return losses


def test_a_tiny_sweep_writes_the_json_the_markdown_and_the_plots(sweep):
    from PIL import Image

    report = json.loads((sweep / "compare_residuals.json").read_text())
    assert [r["status"] for r in report["runs"]] == ["finished"] * 3
    for run in report["runs"]:
        printed = logged_validation_losses(sweep, f"{run['variant']}-seed1")
        assert [p["iteration"] for p in run["validation_curve"]] == [2, 4]
        assert [p["tokens"] for p in run["validation_curve"]] == [2 * 2 * 32, 4 * 2 * 32]
        assert len(printed[4]) == 2  # the periodic and the final evaluation after iteration 4
        assert run["final_validation_loss"] == pytest.approx(sum(printed[4]) / 2, rel=1e-6)
        assert list(run["output_rms"]) == ["L1.attn", "L1.mlp", "L2.attn", "L2.mlp", "final"]
        assert list(run["grad_norm"]) == ["L1", "L2"] and all(v > 0 for v in run["grad_norm"].values())
        assert run["depth_iterations"] == [4]  # the log iterations of the last quarter (1, 2 and 4 logged)
        assert run["tokens_per_second"] > 0
    stats = report["variants"]
    assert stats["baseline"]["difference_to_baseline"] is None
    for variant in ("block", "full"):
        baseline, mine = stats["baseline"]["mean"], stats[variant]["mean"]
        assert stats[variant]["difference_to_baseline"]["mean"] == pytest.approx(mine - baseline)
        assert stats[variant]["difference_to_baseline"]["ci"] is None  # one seed: no interval
    text = (sweep / "compare_residuals.md").read_text()
    assert "| variant | depth mixing | seeds |" in text
    assert "| block | Block, N=2 (S=2) | 1 |" in text and "| full | Full (S=1) | 1 |" in text
    assert "GPT 2 layers x hidden 32" in text and "CPU" in text
    for name in ("validation_loss", "output_rms", "grad_norm", "depth_attention_block"):
        with Image.open(sweep / "plots" / f"{name}.png") as image:
            assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 300
        assert f"(plots/{name}.png)" in text


def test_variants_read_the_same_batches_from_the_same_shared_weights(sweep, reseed):
    from attnres_megatron.models.families import chunk_inputs, model_family
    from attnres_megatron.training.arguments import parse_args, validate_args
    from attnres_megatron.training.model_setup import config_from_args
    from attnres_megatron.training.pretrain import training_batches
    from attnres_megatron.training.vocabulary import prepare_vocabulary

    names = ["baseline-seed1", "block-seed1", "full-seed1"]
    digests = [batch_digests(sweep, name) for name in names]
    assert sorted(digests[0]) == [1, 2, 3, 4]
    assert digests[0] == digests[1] == digests[2]
    assert len(set(digests[0].values())) == 4  # four different batches

    # The recorded ids are the step's batch of Megatron's sample order for seed 1, built here anew.
    args = parse_args(
        [*TINY, "--seed", "1", "--save", str(sweep / "runs" / "baseline-seed1" / "checkpoints")]
    )
    validate_args(args, 1)
    prepare_vocabulary(args)
    first = training_batches(args, "cpu").batches(0)
    expected = hashlib.sha256()
    for tokens, labels in first:
        expected.update(tokens.to(torch.int64).numpy().tobytes() + labels.to(torch.int64).numpy().tobytes())
    assert digests[0][1] == expected.hexdigest()[:16]

    # The shared weights every run recorded before its first step are seed 1's baseline model.
    starts = [next(r for r in observations(sweep, name) if r["event"] == "start") for name in names]
    assert len({s["shared_init_sha256"] for s in starts}) == 1
    reseed(1)
    model = model_family("gpt").build_chunk(config_from_args(args, "cpu"), chunk_inputs(args, 256, "cpu"))
    weights = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        weights.update(name.encode() + param.detach().contiguous().numpy().tobytes())
    assert starts[0]["shared_init_sha256"] == weights.hexdigest()[:16]
    assert starts[0]["shared_tensors"] == len(list(model.parameters()))
    report = json.loads((sweep / "compare_residuals.json").read_text())
    assert report["checks"]["1"]["same_batches"] and report["checks"]["1"]["same_shared_init"]

    # A run that read another batch is reported.
    runs = [compare.run_measurements(n.split("-")[0], 1, sweep / "runs" / n) for n in names]
    runs[2]["batch_digests"] = {**runs[2]["batch_digests"], 3: "0" * 16}
    assert compare.pairing_checks(runs)["1"]["differing_iterations"] == [3]


def test_the_baseline_rms_probe_measures_what_the_depth_recorder_measures(sweep):
    for name in ("block-seed1", "full-seed1"):
        depth = [r for r in observations(sweep, name) if r["event"] == "depth"]
        assert [r["iteration"] for r in depth] == [1, 2, 4]
        for record in depth:
            assert record["input_rms"] == pytest.approx(record["output_rms"], rel=1e-6)
    baseline = [r for r in observations(sweep, "baseline-seed1") if r["event"] == "depth"]
    assert all(r["output_rms"] == {} and len(r["input_rms"]) == 5 for r in baseline)


def test_the_statistics_against_a_hand_computation():
    # Published two-sided 95 % quantiles of Student's t.
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 30: 2.042}
    for dof, quantile in table.items():
        assert compare.t_critical(dof) == pytest.approx(quantile, abs=6e-4)
    assert compare.t_critical(1, 0.90) == pytest.approx(6.314, abs=6e-4)

    finals = {"baseline": [4.00, 4.10, 4.05], "block": [3.90, 4.02, 3.99], "full": [3.95, 4.12, 4.01]}
    runs = [
        {"variant": variant, "seed": seed, "final_validation_loss": loss, "tokens_per_second": 100.0 + seed}
        for variant, losses in finals.items()
        for seed, loss in zip((1, 2, 3), losses)
    ] + [{"variant": "block", "seed": 4, "status": "not started"}]  # not counted
    stats = compare.variant_statistics(runs, list(finals))
    # By hand: baseline mean 4.05, deviations -0.05, 0.05, 0 -> sd sqrt(0.005 / 2) = 0.05.
    assert stats["baseline"]["mean"] == pytest.approx(4.05) and stats["baseline"]["sd"] == pytest.approx(0.05)
    # Block minus baseline: -0.10, -0.08, -0.06 -> mean -0.08, sd sqrt((0.02^2 + 0 + 0.02^2) / 2) = 0.02;
    # 95 % CI -0.08 -+ 4.302653 * 0.02 / sqrt(3).
    block = stats["block"]["difference_to_baseline"]
    half = 4.302653 * 0.02 / math.sqrt(3)
    assert block["mean"] == pytest.approx(-0.08) and block["sd"] == pytest.approx(0.02)
    assert block["ci"] == pytest.approx([-0.08 - half, -0.08 + half], abs=1e-6)
    # Full minus baseline: -0.05, 0.02, -0.04 -> mean -0.07 / 3, deviations -0.02667, 0.04333, -0.01667.
    full = stats["full"]["difference_to_baseline"]
    mean = -0.07 / 3
    sd = math.sqrt(((-0.05 - mean) ** 2 + (0.02 - mean) ** 2 + (-0.04 - mean) ** 2) / 2)
    assert full["mean"] == pytest.approx(mean) and full["sd"] == pytest.approx(sd)
    assert full["ci"][1] - full["ci"][0] == pytest.approx(2 * 4.302653 * sd / math.sqrt(3), abs=1e-6)
    assert stats["block"]["tokens_per_second_median"] == 102.0

    report = {
        "confidence": 0.95,
        "variants": stats,
        "plan": {"attn_res_num_blocks": 6},
        "runs": [{"variant": "block", "model": {"sublayers_per_block": 4}}, {"variant": "full", "model": {}}],
    }
    rows = compare.summary_rows(report)
    assert rows[2] == "| baseline | none (PreNorm residual) | 3 | 4.0500 ± 0.0500 | — | — | 102 |"
    ci = f"[{-0.08 - half:+.4f}, {-0.08 + half:+.4f}]"
    assert rows[3] == f"| block | Block, N=6 (S=4) | 3 | 3.9700 ± 0.0624 | -0.0800 | {ci} | 102 |"


def test_flags_the_tool_sets_itself_are_refused(tmp_path, capsys):
    for flag in ("--seed", "--save", "--attention-residuals", "--tensorboard-dir"):
        with pytest.raises(SystemExit) as exited:
            compare.main(["--output-dir", str(tmp_path), *TINY, flag, "1"])
        assert exited.value.code == 2
        assert f"{flag}: set by this tool for each run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--output-dir", str(tmp_path), *TINY, "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--output-dir", str(tmp_path), "--train-tokens", "1000", *TINY])
    assert "give --train-tokens or --train-iters, not both" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()

    # --train-tokens: ceil(1000 tokens / (2 sequences x 32 tokens)) = 16 iterations.
    cli, passthrough = compare.parse_cli(
        ["--output-dir", str(tmp_path), "--train-tokens", "1000", *TINY_MODEL]
    )
    argv = compare.common_argv(cli, passthrough)
    assert argv[argv.index("--train-iters") + 1] == "16"


def test_a_second_sweep_skips_finished_runs_and_resumes_a_partial_one(sweep, tmp_path, monkeypatch, capsys):
    output = tmp_path / "sweep"
    shutil.copytree(sweep, output)
    finished = json.loads((output / "compare_residuals.json").read_text())["runs"][2]

    # The Full run interrupted after its checkpoint at iteration 2: records up to then, tracker at 2.
    run = output / "runs" / "full-seed1"
    records = observations(output, "full-seed1")
    kept = [r for r in records if r.get("iteration", 0) <= 2 and r["event"] != "trained"]
    (run / "observations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    (run / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("2")
    shutil.rmtree(run / "checkpoints" / "iter_0000004")

    capsys.readouterr()
    status, launched = run_tool(output, monkeypatch)
    assert status == 0
    assert capsys.readouterr().out.count("finished already, skipped") == 2  # baseline and Block
    assert len(launched) == 1 and str(run) in launched[0]
    assert launched[0][-2:] == ["--load", str(run / "checkpoints")]
    assert batch_digests(output, "full-seed1") == batch_digests(output, "baseline-seed1")
    report = json.loads((output / "compare_residuals.json").read_text())
    assert report["runs"][2]["final_validation_loss"] == finished["final_validation_loss"]  # bitwise resume

    # The same directory with other training flags is refused before anything starts.
    with pytest.raises(SystemExit, match="belongs to a sweep with other arguments"):
        run_tool(output, monkeypatch, "--lr", "1e-4")

    # --report-only (every run finished) starts nothing and writes the plots where it is told.
    plots = tmp_path / "p"
    assert compare.main(["--output-dir", str(output), "--report-only", "--plots-dir", str(plots)]) == 0
    assert sorted(p.name for p in plots.iterdir()) == sorted(compare.PLOTS.values())
    assert "Runs finished: 3 of 3" in (output / "compare_residuals.md").read_text()

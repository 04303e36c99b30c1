"""Does AttnRes help? Train baseline, Block and Full AttnRes side by side and compare them.

Each run is one ``attnres-pretrain`` process (its ``main``, in a child interpreter) with its own
directory ``OUTPUT/runs/<variant>-seed<k>/``: checkpoints, TensorBoard logs, its log and
``observations.jsonl``, what the comparison measures. The runs of a seed differ only in
``--attention-residuals`` (and ``--attn-res-num-blocks`` for Block): the seed decides both the
initialisation and Megatron's sample order, so every variant of a seed sees the same batches in
the same order and starts from the same shared weights (embedding, attention, MLP, norms,
output layer; the AttnRes vectors draw nothing from the RNG). Both are checked, not assumed: each
run records a sha256 of the token ids of every training step and of its shared weights before
the first step, and the report compares them across the variants of each seed.

Run again with the same arguments and an interrupted sweep continues: finished runs are skipped,
a partial one resumes from its last checkpoint (``--load``; attnres-pretrain resumes exactly).
``--report-only`` rebuilds the JSON, the markdown and the plots from the run directories, also
while a sweep is still going (unfinished runs are listed, not counted).

Measured per run: the validation loss after every evaluation (the curve) and after the last
iteration (the table: the mean of the validation evaluations at that iteration, the final one
and the periodic one when ``--eval-interval`` divides ``--train-iters``); the RMS of the hidden
state entering each sublayer (AttnRes: the depth recorder's mix output, ``output_rms``;
baseline, which has no mixer to record: a forward pre-hook on each pre-norm that measures the
same tensor) and the gradient norm of each layer (``layer_gradient_norms``), both from the
depth diagnostics at the log iterations, averaged over the last quarter of training; the depth
weights at the last iteration; tokens/s over training time (no evaluation, no checkpoints).

Every flag this tool does not define is an ``attnres-pretrain`` flag (Megatron-LM's names)
given to every run: the model shape (``--num-layers --hidden-size --num-attention-heads``
...), the tokens (``--tokenizer-type --tokenizer-model --seq-length --global-batch-size
--train-iters``, or this tool's ``--train-tokens``), optimizer and schedule. The tool sets
``--seed``, ``--attention-residuals``, ``--attn-res-num-blocks``, ``--save``, ``--load``,
``--tensorboard-dir`` and ``--summary-json`` itself.

Example::

    python tools/train_tokenizer.py --vocab-size 4096 --output runs/compare/tokenizer
    python tools/compare_residuals.py --output-dir runs/compare --seeds 1 2 3 \\
        --variants baseline block full --attn-res-num-blocks 6 \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model runs/compare/tokenizer \\
        --num-layers 12 --hidden-size 128 --num-attention-heads 4 --seq-length 256 ...
    python tools/compare_residuals.py --output-dir runs/compare --report-only --plots-dir docs/experiments
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

TOOL = Path(__file__).resolve()
REPO_ROOT = TOOL.parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

VARIANTS = ("baseline", "block", "full")
MODES = {"baseline": "none", "block": "block", "full": "full"}
COLORS = {"baseline": "#4d4d4d", "block": "#1f77b4", "full": "#d62728"}
WORKER_FLAG = "--run-worker"
OBSERVATIONS = "observations.jsonl"
RUN_FILE = "run.json"
SWEEP_FILE = "sweep.json"
REPORT_JSON = "compare_residuals.json"
REPORT_MD = "compare_residuals.md"
PLOTS = {
    "validation": "validation_loss.png",
    "output_rms": "output_rms.png",
    "grad_norm": "grad_norm.png",
    "heatmap": "depth_attention_block.png",
}
CONFIDENCE = 0.95
DEPTH_TAIL = 0.25
"""Depth profiles average the log iterations in this last fraction of training."""
MANAGED = (
    "--seed",
    "--attention-residuals",
    "--attn-res-block-size",
    "--attn-res-layers-per-block",
    "--attn-res-num-blocks",
    "--save",
    "--load",
    "--tensorboard-dir",
    "--summary-json",
)
"""attnres-pretrain flags the tool sets for each run."""
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_RANK",
    "PMI_SIZE",
    "SLURM_PROCID",
)
"""Variables that would make a run look like one rank of a launch: each run is one process."""
POPEN: Callable[..., Any] = functools.partial(subprocess.Popen, text=True)
"""Starts a run's process (tests substitute a faster launcher with the same interface)."""


# ---------------------------------------------------------------------------- statistics


def two_sided_t_probability(t: float, dof: int) -> float:
    """P(-t < T < t) for Student's t with ``dof`` degrees of freedom (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(abs(t) / math.sqrt(dof))
    cos2, total = math.cos(theta) ** 2, 0.0
    if dof % 2 == 0:
        term = total = 1.0
        for k in range(1, dof // 2):
            term *= (2 * k - 1) / (2 * k) * cos2
            total += term
        return math.sin(theta) * total
    if dof > 1:
        term = total = math.cos(theta)
        for k in range(1, (dof - 1) // 2):
            term *= (2 * k) / (2 * k + 1) * cos2
            total += term
    return 2.0 / math.pi * (theta + math.sin(theta) * total)


def t_critical(dof: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided ``confidence`` quantile of Student's t (bisection on its distribution function)."""
    if dof < 1:
        raise ValueError(f"a t quantile needs at least 1 degree of freedom, got {dof}.")
    low, high = 0.0, 1.0
    while two_sided_t_probability(high, dof) < confidence:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if two_sided_t_probability(middle, dof) < confidence else (low, middle)
    return (low + high) / 2


def describe(values: Sequence[float]) -> dict[str, Any]:
    """Count, mean and sample standard deviation (n - 1; None below two values)."""
    n = len(values)
    mean = sum(values) / n if n else None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "sd": sd}


def paired_difference(
    values: dict[int, float], baseline: dict[int, float], confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """Mean of ``values - baseline`` over the seeds both have, with its t confidence interval."""
    seeds = sorted(set(values) & set(baseline))
    stats = describe([values[seed] - baseline[seed] for seed in seeds])
    result = {"seeds": seeds, **stats, "confidence": confidence, "t": None, "ci": None}
    if stats["n"] > 1:
        t = t_critical(stats["n"] - 1, confidence)
        half = t * stats["sd"] / math.sqrt(stats["n"])
        result.update(t=t, ci=[stats["mean"] - half, stats["mean"] + half])
    return result


# ---------------------------------------------------------------------------- the sweep's plan


@dataclass
class RunSpec:
    """One run of the sweep: its variant, seed, directory and attnres-pretrain arguments."""

    variant: str
    seed: int
    directory: Path
    argv: list[str]

    @property
    def name(self) -> str:
        """``<variant>-seed<k>``, also the directory's name."""
        return f"{self.variant}-seed{self.seed}"

    @property
    def checkpoints(self) -> Path:
        """The run's ``--save``/``--load`` directory."""
        return self.directory / "checkpoints"


def build_parser() -> argparse.ArgumentParser:
    """This tool's own flags; every other flag goes to attnres-pretrain."""
    parser = argparse.ArgumentParser(
        prog="compare_residuals.py",
        description=__doc__.split("\n\n")[0],
        epilog="Every other flag is an attnres-pretrain flag given to every run (attnres-pretrain --help).",
        allow_abbrev=False,  # --seed must not pass for --seeds
    )
    parser.add_argument("--output-dir", type=Path, required=True, help="the sweep's directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one run per variant each")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--attn-res-num-blocks", type=int, default=8, help="N of the block variant (S = ceil(2L / N))"
    )
    parser.add_argument(
        "--train-tokens",
        type=int,
        default=None,
        help="training tokens per run: --train-iters = ceil(tokens / (global batch x seq length))",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="no training: rebuild JSON, markdown and plots"
    )
    parser.add_argument("--plots-dir", type=Path, default=None, help="where the PNGs go (OUTPUT/plots)")
    return parser


def flag_given(argv: Sequence[str], flag: str) -> bool:
    """Whether ``flag`` stands in ``argv`` (as ``--flag`` or ``--flag=value``)."""
    return any(token == flag or token.startswith(flag + "=") for token in argv)


def parse_cli(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """This tool's arguments and attnres-pretrain's (the rest), checked."""
    parser = build_parser()
    cli, passthrough = parser.parse_known_args(argv)
    cli.seeds = list(dict.fromkeys(cli.seeds))
    cli.variants = [v for v in VARIANTS if v in cli.variants]
    managed = [flag for flag in MANAGED if flag_given(passthrough, flag)]
    if managed:
        parser.error(f"{', '.join(managed)}: set by this tool for each run (use --seeds, --variants).")
    if cli.attn_res_num_blocks < 1:
        parser.error("--attn-res-num-blocks must be >= 1.")
    if cli.train_tokens is not None and flag_given(passthrough, "--train-iters"):
        parser.error("give --train-tokens or --train-iters, not both.")
    return cli, passthrough


def pretrain_args(argv: Sequence[str]) -> argparse.Namespace:
    """attnres-pretrain's parse of ``argv`` (its own error and exit status 2 on a bad flag)."""
    from attnres_megatron.training.arguments import parse_args

    return parse_args(list(argv))


def common_argv(cli: argparse.Namespace, passthrough: list[str]) -> list[str]:
    """The attnres-pretrain flags of every run: the passthrough plus the defaults a comparison needs."""
    argv = list(passthrough)
    args = pretrain_args(argv)
    if cli.train_tokens is not None:
        per_iteration = (args.global_batch_size or args.micro_batch_size) * args.seq_length
        argv += ["--train-iters", str(max(1, math.ceil(cli.train_tokens / per_iteration)))]
        args = pretrain_args(argv)
    if args.eval_iters <= 0:
        raise SystemExit("error: --eval-iters 0: a comparison needs the validation loss.")
    defaults = {
        "--eval-interval": max(1, args.train_iters // 10),
        "--log-interval": max(1, args.train_iters // 40),
    }
    defaults["--save-interval"] = args.eval_interval or defaults["--eval-interval"]
    for flag, value in defaults.items():
        if not flag_given(argv, flag):
            argv += [flag, str(value)]
    if not flag_given(argv, "--no-progress-bar"):
        argv.append("--no-progress-bar")
    return argv


def variant_argv(variant: str, num_blocks: int) -> list[str]:
    """The flags that make a run ``variant``."""
    argv = ["--attention-residuals", MODES[variant]]
    return argv + ["--attn-res-num-blocks", str(num_blocks)] if variant == "block" else argv


def run_argv(common: list[str], variant: str, seed: int, directory: Path, num_blocks: int) -> list[str]:
    """Every attnres-pretrain flag of one run (``--load`` is added when it resumes)."""
    return [
        *common,
        "--seed",
        str(seed),
        *variant_argv(variant, num_blocks),
        "--save",
        str(directory / "checkpoints"),
        "--tensorboard-dir",
        str(directory / "tensorboard"),
        "--summary-json",
        str(directory / "summary.json"),
    ]


def plan_runs(cli: argparse.Namespace, common: list[str]) -> list[RunSpec]:
    """The sweep's runs, seed by seed (so finished seeds pair up early)."""
    root = cli.output_dir.resolve() / "runs"
    specs = []
    for seed in cli.seeds:
        for variant in cli.variants:
            directory = root / f"{variant}-seed{seed}"
            argv = run_argv(common, variant, seed, directory, cli.attn_res_num_blocks)
            specs.append(RunSpec(variant, seed, directory, argv))
    return specs


def validate_runs(specs: Sequence[RunSpec]) -> None:
    """attnres-pretrain's own validation of each run's flags, before any run starts."""
    from attnres_megatron.training.arguments import validate_args

    for spec in specs:
        spec.directory.mkdir(parents=True, exist_ok=True)  # --summary-json's directory must exist
        validate_args(pretrain_args(spec.argv), 1)


def run_record(spec: RunSpec, common: list[str]) -> dict[str, Any]:
    """What ``run.json`` holds: enough to tell whether a directory belongs to this sweep."""
    return {"variant": spec.variant, "seed": spec.seed, "common_argv": common, "argv": spec.argv}


def check_run_directory(spec: RunSpec, common: list[str]) -> None:
    """Refuse a run directory made with other arguments (resuming it would mix two experiments)."""
    path = spec.directory / RUN_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    if saved.get("common_argv") != common or saved.get("variant") != spec.variant:
        old, new = set(saved.get("common_argv", [])), set(common)
        raise SystemExit(
            f"error: {spec.directory} belongs to a sweep with other arguments (only there: "
            f"{sorted(old - new)}; only here: {sorted(new - old)}); use another --output-dir."
        )


def write_sweep_file(cli: argparse.Namespace, common: list[str], specs: Sequence[RunSpec]) -> None:
    """``OUTPUT/sweep.json``: the plan, for ``--report-only``."""
    plan = {
        "variants": cli.variants,
        "seeds": cli.seeds,
        "attn_res_num_blocks": cli.attn_res_num_blocks,
        "common_argv": common,
        "runs": [{"variant": s.variant, "seed": s.seed, "directory": f"runs/{s.name}"} for s in specs],
    }
    cli.output_dir.mkdir(parents=True, exist_ok=True)
    (cli.output_dir / SWEEP_FILE).write_text(json.dumps(plan, indent=2) + "\n")


# ---------------------------------------------------------------------------- observations


def read_observations(path: Path) -> list[dict[str, Any]]:
    """The records of ``observations.jsonl`` (a line cut short by a killed run is left out)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def checkpoint_iteration(spec: RunSpec) -> Optional[int]:
    """The iteration the run's checkpoint tracker names (None without a tracker)."""
    from attnres_megatron.training.checkpoint_files import TRACKER_FILE

    tracker = spec.checkpoints / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    return int(text) if text.isdigit() else -1


def is_finished(directory: Path) -> bool:
    """Whether the run trained to its last iteration and ran its final evaluation."""
    return any(record["event"] == "finished" for record in read_observations(directory / OBSERVATIONS))


# ---------------------------------------------------------------------------- inside a run


class Observations:
    """Append-only JSON lines, flushed one by one (a killed run loses at most the last)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        """One record, with the time it was written."""
        self.handle.write(json.dumps({**record, "time": time.time()}) + "\n")
        self.handle.flush()


def tensor_bytes(tensor: Any) -> bytes:
    """The raw bytes of a tensor (any dtype), on the CPU."""
    import torch

    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def batch_digest(batches: Sequence[tuple[Any, Any]]) -> str:
    """sha256 (16 hex digits) of the token ids and labels of one step's micro-batches."""
    digest = hashlib.sha256()
    for tokens, labels in batches:
        digest.update(tensor_bytes(tokens.long()))
        digest.update(tensor_bytes(labels.long()))
    return digest.hexdigest()[:16]


def shared_weights_digest(chunks: Sequence[Any]) -> tuple[str, int]:
    """sha256 (16 hex digits) over the names and values of the non-AttnRes parameters, and their count."""
    digest, count = hashlib.sha256(), 0
    for chunk in chunks:
        for name, param in sorted(chunk.named_parameters(), key=lambda item: item[0]):
            if "attn_res" not in name:
                digest.update(name.encode())
                digest.update(tensor_bytes(param))
                count += 1
    return digest.hexdigest()[:16], count


def pre_norms(chunks: Sequence[Any]) -> Iterator[tuple[str, Any]]:
    """(sublayer name, module) of each sublayer's pre-norm and of the final norm, in depth order."""
    from megatron.core.transformer.transformer_layer import BaseTransformerLayer

    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, BaseTransformerLayer) and isinstance(
                getattr(module, "layer_number", None), int
            ):
                for kind, attr in (("attn", "input_layernorm"), ("mlp", "pre_mlp_layernorm")):
                    if getattr(module, attr, None) is not None:
                        yield f"L{module.layer_number}.{kind}", getattr(module, attr)
        final = getattr(getattr(chunk, "decoder", None), "final_layernorm", None)
        if final is not None:
            yield "final", final


class SublayerInputRMS:
    """RMS of what enters each pre-norm while attached: AttnRes's mix, the baseline's residual stream."""

    def __init__(self, chunks: Sequence[Any]) -> None:
        self.norms = list(pre_norms(chunks))
        self.handles: list[Any] = []
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def __enter__(self) -> SublayerInputRMS:
        self.sums.clear()
        self.counts.clear()
        self.handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in self.norms]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, name: str) -> Callable[..., None]:
        """A pre-hook adding the squared norm and the size of the norm's input under ``name``."""
        import torch

        def hook(module: Any, args: tuple) -> None:
            square = torch.linalg.vector_norm(args[0].detach(), dtype=torch.float32).double().square()
            self.sums[name] = self.sums[name] + square if name in self.sums else square
            self.counts[name] = self.counts.get(name, 0) + args[0].numel()

        return hook

    def values(self) -> dict[str, float]:
        """``{sublayer name: RMS}`` of what was seen while attached."""
        return {
            name: math.sqrt(float(self.sums[name]) / self.counts[name])
            for name, _ in self.norms
            if name in self.sums
        }


class RecordedBatches:
    """A run's training batches, each step reported to ``on_batches`` as it is read."""

    def __init__(self, data: Any, on_batches: Callable[[list], None]) -> None:
        self.data, self.on_batches = data, on_batches

    def batches(self, step: int) -> list:
        """The step's micro-batches, as the wrapped object gives them."""
        result = self.data.batches(step)
        self.on_batches(result)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.data, name)


def host_description(device: str) -> str:
    """The device a run trained on, for plot labels."""
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    model = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        names = [
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        ]
        model = names[0] if names else model
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {model} ({cores} cores, {torch.get_num_threads()} threads, torch {torch.__version__})"


def model_description(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    """The model and token settings of a run, for labels and the JSON."""
    return {
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "ffn_hidden_size": config.ffn_hidden_size,
        "swiglu": bool(getattr(args, "swiglu", False)),
        "seq_length": args.seq_length,
        "global_batch_size": args.global_batch_size,
        "train_iters": args.train_iters,
        "padded_vocab_size": getattr(args, "padded_vocab_size", None),
        "tokenizer_type": args.tokenizer_type,
        "attention_residuals": config.attention_residuals,
        "sublayers_per_block": config.attn_res_sublayers_per_block,
    }


def observed_training_loop(base: type, observations: Observations) -> type:
    """attnres-pretrain's training loop recording batches, evaluations and depth statistics."""
    from attnres_megatron.diagnostics import layer_gradient_norms, output_rms

    class ObservedTrainingLoop(base):
        """The loop, plus records in ``observations.jsonl``."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.iteration = self.start_iteration
            self.data = RecordedBatches(self.data, self.record_batches)
            self.probe = SublayerInputRMS(self.setup.unwrapped())
            for kind in ("periodic", "final"):
                setattr(self.evaluator, kind, self.observed_evaluation(getattr(self.evaluator, kind), kind))
            observations.write(self.start_record())

        def start_record(self) -> dict[str, Any]:
            """The run's model, device and, before the first step, its shared weights' digest."""
            chunks = self.setup.unwrapped()
            device = next(chunks[0].parameters()).device.type
            shared, count = shared_weights_digest(chunks) if self.start_iteration == 0 else (None, None)
            return {
                "event": "start",
                "start_iteration": self.start_iteration,
                "parameters": sum(p.numel() for chunk in chunks for p in chunk.parameters()),
                "shared_init_sha256": shared,
                "shared_tensors": count,
                "model": model_description(self.args, self.setup.config),
                "device": device,
                "host": host_description(device),
            }

        def record_batches(self, batches: list) -> None:
            """One step's batch digest."""
            observations.write(
                {"event": "batch", "iteration": self.iteration, "sha256": batch_digest(batches)}
            )

        def observed_evaluation(self, evaluate: Callable[[int], None], kind: str) -> Callable[[int], None]:
            """``evaluate``, its results recorded as ``kind`` evaluations."""

            def run(iteration: int) -> None:
                done = len(self.evaluator.results)
                evaluate(iteration)
                for result in self.evaluator.results[done:]:
                    observations.write({"event": "evaluation", "kind": kind, **result.as_dict()})

            return run

        def step(self, iteration: int) -> Any:
            """The step, with the RMS probe attached on log iterations (when the recorder is)."""
            self.iteration = iteration
            if self.recorder is None or not self.logging_iteration(iteration):
                return super().step(iteration)
            with self.probe:
                return super().step(iteration)

        def log_depth(self, iteration: int) -> None:
            """The depth diagnostics, also recorded (with the probe's RMS; the weights at the end)."""
            super().log_depth(iteration)
            snapshot = self.recorder.snapshot()
            record = {
                "event": "depth",
                "iteration": iteration,
                "output_rms": output_rms(snapshot),
                "input_rms": self.probe.values(),
                "grad_norm": layer_gradient_norms(self.setup.chunks),
            }
            if iteration == self.args.train_iters and snapshot:
                record["snapshot"] = snapshot
            observations.write(record)

        def run(self) -> int:
            """Training, its iterations and training seconds recorded."""
            iteration = super().run()
            seconds = self.clock.elapsed()
            start = self.start_iteration
            observations.write(
                {
                    "event": "trained",
                    "start_iteration": start,
                    "end_iteration": iteration,
                    "train_seconds": seconds,
                }
            )
            return iteration

        def finish(self, iteration: int) -> None:
            """The final checkpoint and evaluations; ``finished`` recorded when the run is complete."""
            super().finish(iteration)
            if not self.stopped and iteration == self.args.train_iters:
                observations.write({"event": "finished", "iteration": iteration})

    return ObservedTrainingLoop


def worker_main(argv: Sequence[str]) -> int:
    """One run: attnres-pretrain's main with the comparison's records (``RUN_DIR ARGS...``)."""
    sys.stdout.reconfigure(line_buffering=True)  # the sweep shows progress from these lines
    from attnres_megatron.training import pretrain

    observations = Observations(Path(argv[0]) / OBSERVATIONS)
    pretrain.TrainingLoop = observed_training_loop(pretrain.TrainingLoop, observations)
    return pretrain.main(list(argv[1:]))


# ---------------------------------------------------------------------------- running the sweep

ITERATION_LINE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*? lm loss: ([-+.0-9eE]+|nan|inf)")
EVALUATION_LINE = re.compile(
    r"validation loss at iteration (\d+)(?: on (\w+) set)? \| lm loss value: ([-+.0-9eE]+)"
)


def duration(seconds: Optional[float]) -> str:
    """``1h02m``, ``4m05s``, ``12s`` (``?`` when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(0.0, seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class Progress:
    """Which run, its iteration, and the time left for the run and the sweep."""

    specs: list[RunSpec]
    train_iters: int
    rates: dict[str, float] = field(default_factory=dict)
    """Wall seconds per iteration (evaluations and saves included), per variant."""
    startup: float = 30.0
    current: Optional[RunSpec] = None
    started: float = 0.0
    first: Optional[tuple[int, float]] = None

    def begin(self, spec: RunSpec) -> None:
        """A run's process starts."""
        self.current, self.started, self.first = spec, time.time(), None

    def label(self) -> str:
        """``[run 4/9 block seed 2]``."""
        spec = self.current
        return f"[run {self.specs.index(spec) + 1}/{len(self.specs)} {spec.variant} seed {spec.seed}]"

    def rate(self, variant: str) -> Optional[float]:
        """Seconds per iteration of ``variant`` (the mean over the variants measured when it is not)."""
        if variant in self.rates:
            return self.rates[variant]
        return sum(self.rates.values()) / len(self.rates) if self.rates else None

    def remaining(self, iteration: int) -> tuple[Optional[float], Optional[float]]:
        """Seconds left in the current run and in the whole sweep."""
        rate = self.rate(self.current.variant)
        if rate is None:
            return None, None
        run_left = rate * (self.train_iters - iteration)
        later = self.specs[self.specs.index(self.current) + 1 :]
        pending = [spec for spec in later if not is_finished(spec.directory)]
        sweep_left = run_left + sum(self.startup + self.rate(s.variant) * self.train_iters for s in pending)
        return run_left, sweep_left

    def line(self, text: str) -> Optional[str]:
        """The progress line for one line of the run's output (None for most lines)."""
        now = time.time()
        found = ITERATION_LINE.search(text)
        if found:
            iteration = int(found.group(1))
            if self.first is None:
                self.first = (iteration, now)
                self.startup = now - self.started
            elif iteration > self.first[0]:
                self.rates[self.current.variant] = (now - self.first[1]) / (iteration - self.first[0])
            run_left, sweep_left = self.remaining(iteration)
            rate = self.rates.get(self.current.variant)
            speed = f"{rate:.2f} s/it" if rate else "-- s/it"
            loss = float(found.group(3))
            return (
                f"{self.label()} iteration {iteration}/{found.group(2)} | lm loss {loss:.4f} | {speed} | "
                f"run ETA {duration(run_left)} | sweep ETA {duration(sweep_left)}"
            )
        found = EVALUATION_LINE.search(text)
        if found:
            split = found.group(2) or "validation"
            return f"{self.label()} {split} loss {float(found.group(3)):.4f} at iteration {found.group(1)}"
        if text.startswith(("error", "> no evaluation")) or "Error" in text.split(":", 1)[0]:
            return f"{self.label()} {text.rstrip()}"
        return None


def child_environment() -> dict[str, str]:
    """The sweep's environment without launcher variables (each run is a single process)."""
    return {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}


def prepare_run_directory(spec: RunSpec, common: list[str]) -> Optional[int]:
    """The iteration a run resumes from (None: it starts afresh, in an emptied directory)."""
    resume = checkpoint_iteration(spec)
    if resume is None and spec.directory.exists():
        import shutil

        shutil.rmtree(spec.directory)  # an attempt that died before its first checkpoint
    spec.directory.mkdir(parents=True, exist_ok=True)
    (spec.directory / RUN_FILE).write_text(json.dumps(run_record(spec, common), indent=2) + "\n")
    return resume


class SweepStop:
    """SIGTERM to the sweep reaches the running run (it saves a checkpoint and exits); no other run starts."""

    def __init__(self) -> None:
        self.requested = False
        self.process: Any = None
        self.previous: Any = None

    def __enter__(self) -> SweepStop:
        self.previous = signal.signal(signal.SIGTERM, self.handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def handle(self, signum: int, frame: Any) -> None:
        """The signal handler."""
        self.requested = True
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)


def launch(spec: RunSpec, common: list[str], progress: Progress, stop: SweepStop) -> int:
    """Run (or resume) one run, its output appended to ``log.txt``; its exit status."""
    resume = prepare_run_directory(spec, common)
    argv = spec.argv + (["--load", str(spec.checkpoints)] if resume is not None else [])
    how = f"resuming from iteration {resume}" if resume is not None else "starting"
    print(f"{progress.label()} {how}: {spec.directory}", flush=True)
    command = [sys.executable, str(TOOL), WORKER_FLAG, str(spec.directory), *argv]
    tail: list[str] = []
    with open(spec.directory / "log.txt", "a", buffering=1) as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        stop.process = POPEN(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_environment()
        )
        for text in stop.process.stdout:
            log.write(text)
            tail = (tail + [text.rstrip()])[-25:]
            message = progress.line(text)
            if message:
                print(message, flush=True)
        code = stop.process.wait()
    stop.process = None
    if code != 0:
        print(f"{progress.label()} failed with exit status {code}; last lines:", flush=True)
        print("\n".join(f"    {line}" for line in tail), flush=True)
    return code


def run_sweep(specs: list[RunSpec], common: list[str], train_iters: int) -> int:
    """Every run not finished yet, in order; 0 when all are finished."""
    progress = Progress(specs, train_iters)
    finished = [spec for spec in specs if is_finished(spec.directory)]
    print(f"[sweep] {len(specs)} runs, {len(finished)} finished already", flush=True)
    started = time.time()
    failed = []
    with SweepStop() as stop:
        for spec in specs:
            progress.begin(spec)
            if is_finished(spec.directory):
                print(f"{progress.label()} finished already, skipped", flush=True)
                continue
            if stop.requested:
                break
            began = time.time()
            if launch(spec, common, progress, stop) != 0 or not is_finished(spec.directory):
                failed.append(spec.name)
            else:
                print(f"{progress.label()} finished in {duration(time.time() - began)}", flush=True)
    done = sum(is_finished(spec.directory) for spec in specs)
    print(
        f"[sweep] {done}/{len(specs)} runs finished ({duration(time.time() - started)} this time)", flush=True
    )
    if failed:
        print(f"[sweep] not finished: {', '.join(failed)}", flush=True)
    return 0 if done == len(specs) else 1


# ---------------------------------------------------------------------------- measurements


def last_by(records: Sequence[dict[str, Any]], event: str, key: Callable[[dict], Any]) -> dict[Any, dict]:
    """The records of ``event`` by ``key``, the latest one winning (a resumed run redoes some)."""
    return {key(record): record for record in records if record["event"] == event}


def validation_points(records: Sequence[dict[str, Any]]) -> dict[int, float]:
    """Validation loss after each evaluated iteration (the mean when several evaluations ran there)."""
    evaluations = last_by(records, "evaluation", lambda r: (r["kind"], r["split"], r["iteration"]))
    losses: dict[int, list[float]] = {}
    for (_, split, iteration), record in evaluations.items():
        if split == "validation":
            losses.setdefault(iteration, []).append(record["loss"])
    return {iteration: sum(v) / len(v) for iteration, v in sorted(losses.items())}


def depth_profile(depth: dict[int, dict], key: str, train_iters: int) -> tuple[dict[str, float], list[int]]:
    """The mean of ``key`` over the log iterations of the last quarter of training, and those iterations."""
    logged = [depth[i] for i in sorted(depth) if depth[i].get(key)]
    records = [r for r in logged if r["iteration"] >= (1 - DEPTH_TAIL) * train_iters] or logged[-1:]
    names = list(records[0][key]) if records else []
    profile = {name: sum(r[key][name] for r in records) / len(records) for name in names}
    return profile, [record["iteration"] for record in records]


def tokens_per_second(records: Sequence[dict[str, Any]], tokens_per_iteration: int) -> Optional[float]:
    """Training tokens over training seconds, summed over the run's completed attempts."""
    attempts = [r for r in records if r["event"] == "trained" and r["end_iteration"] > r["start_iteration"]]
    seconds = sum(r["train_seconds"] for r in attempts)
    iterations = sum(r["end_iteration"] - r["start_iteration"] for r in attempts)
    return iterations * tokens_per_iteration / seconds if seconds > 0 else None


def spread(profile: dict[str, float], measure: Callable[[list[float]], float]) -> Optional[float]:
    """``measure`` of a depth profile's values (None for an empty or zero profile)."""
    values = list(profile.values())
    return measure(values) if values and min(values) > 0 else None


def run_measurements(variant: str, seed: int, directory: Path) -> dict[str, Any]:
    """Everything the report uses from one run directory."""
    records = read_observations(directory / OBSERVATIONS)
    starts = [r for r in records if r["event"] == "start"]
    result: dict[str, Any] = {"variant": variant, "seed": seed, "directory": f"runs/{directory.name}"}
    if not starts:
        return {**result, "status": "not started"}
    model = starts[-1]["model"]
    per_iteration = model["global_batch_size"] * model["seq_length"]
    batches = {
        iteration: r["sha256"] for iteration, r in last_by(records, "batch", lambda r: r["iteration"]).items()
    }
    depth = last_by(records, "depth", lambda r: r["iteration"])
    points = validation_points(records)
    finished = any(r["event"] == "finished" for r in records)
    fresh = [r for r in starts if r["start_iteration"] == 0]
    rms, rms_iterations = depth_profile(depth, "output_rms", model["train_iters"])
    probe, probe_iterations = depth_profile(depth, "input_rms", model["train_iters"])
    grads, _ = depth_profile(depth, "grad_norm", model["train_iters"])
    final_depth = depth.get(model["train_iters"], {})
    return {
        **result,
        "status": "finished" if finished else "partial",
        "iterations": max(batches, default=0),
        "model": model,
        "parameters": starts[-1]["parameters"],
        "device": starts[-1]["host"],
        "final_validation_loss": points.get(model["train_iters"]) if finished else None,
        "test_loss": next((r["loss"] for r in reversed(records) if r.get("split") == "test"), None),
        "validation_curve": [
            {"iteration": i, "tokens": i * per_iteration, "loss": loss} for i, loss in points.items()
        ],
        "tokens_per_second": tokens_per_second(records, per_iteration),
        "shared_init_sha256": fresh[-1]["shared_init_sha256"] if fresh else None,
        "batches_sha256": hashlib.sha256(json.dumps(sorted(batches.items())).encode()).hexdigest()[:16],
        "batches_recorded": len(batches),
        "output_rms": rms or probe,
        "rms_growth": spread(rms or probe, lambda values: values[-1] / values[0]),
        "grad_norm_spread": spread(grads, lambda values: max(values) / min(values)),
        "output_rms_source": "depth recorder (mix output)" if rms else "pre-norm input probe",
        "input_rms_probe": probe,
        "grad_norm": grads,
        "depth_iterations": rms_iterations or probe_iterations,
        "final_snapshot": final_depth.get("snapshot"),
        "batch_digests": batches,
    }


def pairing_checks(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per seed: whether its variants read the same batches and started from the same shared weights."""
    checks = {}
    for seed in sorted({run["seed"] for run in runs}):
        group = [run for run in runs if run["seed"] == seed and run["status"] != "not started"]
        digests = [run["batch_digests"] for run in group]
        common = set.intersection(*(set(d) for d in digests)) if digests else set()
        differing = sorted(i for i in common if len({d[i] for d in digests}) > 1)
        inits = {run["shared_init_sha256"] for run in group if run["shared_init_sha256"]}
        checks[str(seed)] = {
            "variants": [run["variant"] for run in group],
            "iterations_compared": len(common),
            "same_batches": not differing,
            "differing_iterations": differing[:20],
            "same_shared_init": len(inits) <= 1,
        }
    return checks


def mean_of(runs: Sequence[dict[str, Any]], key: str) -> Optional[float]:
    """The mean of ``key`` over the runs that have it (None when none has)."""
    return describe([r[key] for r in runs if r.get(key) is not None])["mean"]


def variant_statistics(runs: Sequence[dict[str, Any]], variants: Sequence[str]) -> dict[str, Any]:
    """Per variant: final validation loss over seeds and its paired difference to the baseline."""
    finals = {
        variant: {
            r["seed"]: r["final_validation_loss"]
            for r in runs
            if r["variant"] == variant and r.get("final_validation_loss") is not None
        }
        for variant in variants
    }
    stats = {}
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant and r.get("status", "finished") == "finished"]
        speeds = sorted(r["tokens_per_second"] for r in mine if r["tokens_per_second"])
        stats[variant] = {
            **describe([finals[variant][seed] for seed in sorted(finals[variant])]),
            "final_validation_loss": finals[variant],
            "tokens_per_second_median": speeds[len(speeds) // 2] if speeds else None,
            "rms_growth_mean": mean_of(mine, "rms_growth"),
            "grad_norm_spread_mean": mean_of(mine, "grad_norm_spread"),
            "difference_to_baseline": (
                paired_difference(finals[variant], finals["baseline"])
                if variant != "baseline" and "baseline" in finals
                else None
            ),
        }
    return stats


def build_report(output_dir: Path) -> dict[str, Any]:
    """The whole comparison from the run directories named by ``sweep.json``."""
    plan_path = output_dir / SWEEP_FILE
    if not plan_path.is_file():
        raise SystemExit(f"error: {plan_path} not found: --output-dir names no sweep of this tool.")
    plan = json.loads(plan_path.read_text())
    runs = [run_measurements(r["variant"], r["seed"], output_dir / r["directory"]) for r in plan["runs"]]
    described = [run for run in runs if run["status"] != "not started"]
    return {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "plan": plan,
        "model": described[0]["model"] if described else None,
        "parameters": {run["variant"]: run["parameters"] for run in described},
        "device": described[0]["device"] if described else None,
        "confidence": CONFIDENCE,
        "variants": variant_statistics(runs, plan["variants"]),
        "checks": pairing_checks(runs),
        "runs": runs,
    }


# ---------------------------------------------------------------------------- report: text


def mixing_label(variant: str, report: dict[str, Any]) -> str:
    """``none``, ``Block, N=6 (S=4)``, ``Full (S=1)``."""
    if variant == "baseline":
        return "none (PreNorm residual)"
    per_block = next(
        (
            r["model"].get("sublayers_per_block")
            for r in report["runs"]
            if r["variant"] == variant and "model" in r
        ),
        None,
    )
    size = f"S={per_block}" if per_block else "S=?"
    return (
        f"Block, N={report['plan']['attn_res_num_blocks']} ({size})"
        if variant == "block"
        else f"Full ({size})"
    )


def signed(value: Optional[float], digits: int = 4) -> str:
    """``+0.0123`` / ``-0.0123`` (``n/a`` when absent)."""
    return "n/a" if value is None else f"{value:+.{digits}f}"


def plain(value: Optional[float], digits: int = 4) -> str:
    """``4.1234`` (``n/a`` when absent)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def setup_label(report: dict[str, Any]) -> str:
    """Two lines naming the model shape and tokens, then the device (plots and markdown)."""
    model = report["model"]
    if model is None:
        return "no run has started"
    params = report["parameters"].get("baseline") or next(iter(report["parameters"].values()))
    tokens = model["train_iters"] * model["global_batch_size"] * model["seq_length"]
    mlp = "SwiGLU" if model["swiglu"] else "GeLU"
    shape = f"GPT {model['num_layers']} layers x hidden {model['hidden_size']}"
    shape += f", {model['num_attention_heads']} heads"
    vocab = f"vocab {model['padded_vocab_size']} ({model['tokenizer_type']})"
    return (
        f"{shape}, {mlp} FFN {model['ffn_hidden_size']}, seq {model['seq_length']}, {vocab}, "
        f"{params / 1e6:.2f}M params, {tokens / 1e6:.2f}M tokens/run\n{report['device']}"
    )


def summary_rows(report: dict[str, Any]) -> list[str]:
    """The main table: final validation loss per variant and its difference to the baseline."""
    confidence = f"{report['confidence']:.0%}"
    rows = [
        f"| variant | depth mixing | seeds | final validation loss, mean ± sd | Δ vs baseline (paired), mean "
        f"| {confidence} CI of Δ (t, n-1 dof) | tokens/s (median) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for variant, stats in report["variants"].items():
        diff = stats["difference_to_baseline"]
        ci = "n/a" if not diff or not diff["ci"] else f"[{signed(diff['ci'][0])}, {signed(diff['ci'][1])}]"
        speed = stats["tokens_per_second_median"]
        rows.append(
            f"| {variant} | {mixing_label(variant, report)} | {stats['n']} | {plain(stats['mean'])} ± "
            f"{plain(stats['sd'])} | {'—' if diff is None else signed(diff['mean'])} | "
            f"{'—' if diff is None else ci} | {'n/a' if speed is None else f'{speed:.0f}'} |"
        )
    return rows


def depth_rows(report: dict[str, Any]) -> list[str]:
    """Magnitude growth and gradient spread over depth, per variant (means over finished seeds)."""
    rows = [
        "| variant | RMS entering the final norm / RMS of the embedding "
        "| largest / smallest layer gradient norm |",
        "|---|---:|---:|",
    ]
    for variant, stats in report["variants"].items():
        growth, grads = stats["rms_growth_mean"], stats["grad_norm_spread_mean"]
        rows.append(f"| {variant} | {plain(growth, 2)} | {plain(grads, 2)} |")
    return rows


def seed_rows(report: dict[str, Any]) -> list[str]:
    """Final validation loss of every run, a row per seed."""
    variants = list(report["variants"])
    rows = ["| seed | " + " | ".join(variants) + " |", "|---:|" + "---:|" * len(variants)]
    for seed in report["plan"]["seeds"]:
        cells = []
        for variant in variants:
            run = next(r for r in report["runs"] if r["variant"] == variant and r["seed"] == seed)
            loss = run.get("final_validation_loss")
            cells.append(plain(loss) if loss is not None else f"({run['status']})")
        rows.append(f"| {seed} | " + " | ".join(cells) + " |")
    return rows


def check_lines(report: dict[str, Any]) -> list[str]:
    """The pairing checks in words."""
    lines = []
    for seed, check in report["checks"].items():
        if len(check["variants"]) < 2:
            lines.append(f"- seed {seed}: fewer than two runs started, nothing to compare yet.")
            continue
        batches = (
            "same" if check["same_batches"] else f"DIFFERENT at iterations {check['differing_iterations']}"
        )
        init = "same" if check["same_shared_init"] else "DIFFERENT"
        lines.append(
            f"- seed {seed} ({', '.join(check['variants'])}): training batches {batches} over "
            f"{check['iterations_compared']} iterations; initial shared weights {init}."
        )
    return lines


def markdown(report: dict[str, Any], plots: dict[str, Path], markdown_dir: Path) -> str:
    """The report as markdown: setup, the two tables, the pairing checks, the plots."""
    finished = sum(run["status"] == "finished" for run in report["runs"])
    lines = [
        "# Does AttnRes help? baseline vs Block vs Full",
        "",
        " | ".join(setup_label(report).splitlines()),
        "",
        f"Runs finished: {finished} of {len(report['runs'])} (generated {report['generated']}).",
        "",
        *summary_rows(report),
        "",
        "Depth diagnostics (last quarter of training, mean over seeds):",
        "",
        *depth_rows(report),
        "",
        "Final validation loss per run:",
        "",
        *seed_rows(report),
        "",
        "Pairing checks (sha256 of each step's token ids; of the non-AttnRes parameters before step 1):",
        "",
        *check_lines(report),
        "",
        "Final validation loss: the mean of the validation evaluations after the last iteration. Δ: "
        "variant minus baseline of the same seed; its confidence interval is mean ± t(n-1) · sd / √n.",
        "",
    ]
    for name, path in plots.items():
        lines.append(f"![{name}]({os.path.relpath(path, markdown_dir)})")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- report: plots


def new_figure(rows: int, width: float = 9.0, height: float = 4.2) -> tuple[Any, Any]:
    """A matplotlib figure (Agg canvas, no pyplot state) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height * rows), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return figure, axes


def save_figure(figure: Any, title: str, report: dict[str, Any], path: Path) -> None:
    """Title, the setup line, and the PNG."""
    figure.suptitle(f"{title}\n{setup_label(report)}", fontsize=8.5)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def band(axes: Any, x: Sequence[float], series: Sequence[Sequence[float]], variant: str, label: str) -> None:
    """The mean over seeds as a line, their min..max as a shaded band."""
    columns = list(zip(*series))
    mean = [sum(c) / len(c) for c in columns]
    axes.plot(x, mean, color=COLORS[variant], label=label, marker="o", markersize=2.5, linewidth=1.4)
    if len(series) > 1:
        lows, highs = [min(c) for c in columns], [max(c) for c in columns]
        axes.fill_between(x, lows, highs, color=COLORS[variant], alpha=0.18, linewidth=0)


def finished_runs(report: dict[str, Any], variant: str) -> list[dict[str, Any]]:
    """The finished runs of ``variant``, by seed."""
    runs = [r for r in report["runs"] if r["variant"] == variant and r["status"] == "finished"]
    return sorted(runs, key=lambda r: r["seed"])


def curves(runs: Sequence[dict[str, Any]]) -> tuple[list[float], list[list[float]]]:
    """Tokens (millions) and each run's validation losses at the evaluations all runs have."""
    common = sorted(set.intersection(*({p["tokens"] for p in r["validation_curve"]} for r in runs)))
    series = [[{p["tokens"]: p["loss"] for p in r["validation_curve"]}[t] for t in common] for r in runs]
    return [t / 1e6 for t in common], series


def plot_validation(report: dict[str, Any], path: Path) -> None:
    """Validation loss vs tokens with seed bands, and the paired difference to the baseline."""
    figure, (loss_axes, diff_axes) = new_figure(2)
    baseline = {r["seed"]: r for r in finished_runs(report, "baseline")}
    for variant in report["variants"]:
        runs = finished_runs(report, variant)
        if not runs:
            continue
        x, series = curves(runs)
        band(loss_axes, x, series, variant, f"{variant} ({len(runs)} seeds)")
        paired = [r for r in runs if r["seed"] in baseline]
        if variant != "baseline" and paired:
            x, both = curves(paired + [baseline[r["seed"]] for r in paired])
            n = len(paired)
            band(
                diff_axes,
                x,
                [[a - b for a, b in zip(both[i], both[i + n])] for i in range(n)],
                variant,
                variant,
            )
    loss_axes.set_ylabel("validation loss")
    loss_axes.legend(fontsize=8)
    loss_axes.grid(alpha=0.3)
    diff_axes.axhline(0.0, color=COLORS["baseline"], linewidth=1)
    diff_axes.set_ylabel("Δ validation loss vs baseline\n(same seed; < 0: better)")
    diff_axes.set_xlabel("training tokens (millions)")
    diff_axes.grid(alpha=0.3)
    diff_axes.legend(fontsize=8)
    save_figure(figure, "Validation loss (line: mean over seeds, band: min..max)", report, path)


def block_boundaries(report: dict[str, Any]) -> list[int]:
    """Sublayer indices where the Block variant seals a block."""
    model = next((r["model"] for r in report["runs"] if r["variant"] == "block" and "model" in r), None)
    if not model or not model["sublayers_per_block"]:
        return []
    size = model["sublayers_per_block"]
    return list(range(size, 2 * model["num_layers"], size))


def plot_profile(report: dict[str, Any], key: str, path: Path) -> None:
    """A depth profile (``output_rms`` per sublayer or ``grad_norm`` per layer) per variant, seed bands."""
    figure, (axes,) = new_figure(1, width=10.0, height=4.6)
    names: list[str] = []
    for variant in report["variants"]:
        runs = [r for r in finished_runs(report, variant) if r[key]]
        if runs:
            names = list(runs[0][key])
            band(axes, range(len(names)), [[r[key][n] for n in names] for r in runs], variant, variant)
    step = max(1, math.ceil(len(names) / 30))
    axes.set_xticks(range(0, len(names), step))
    axes.set_xticklabels(names[::step], rotation=60, ha="right", fontsize=7)
    axes.set_yscale("log")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    if key == "output_rms":
        for boundary in block_boundaries(report):
            axes.axvline(boundary - 0.5, color=COLORS["block"], linestyle=":", linewidth=0.8)
        axes.set_ylabel("RMS entering the sublayer")
        title = (
            "Hidden-state RMS entering each sublayer (AttnRes: depth-mix output; baseline: residual stream); "
            "dotted: Block boundaries"
        )
    else:
        axes.set_ylabel("gradient L2 norm of the layer")
        title = "Gradient norm per layer"
    save_figure(
        figure, f"{title}\nmean over the log iterations of the last quarter of training", report, path
    )


def plot_heatmap(report: dict[str, Any], path: Path) -> Optional[dict[str, Any]]:
    """The depth weights of the Block run with the lowest final validation loss (None without one)."""
    from attnres_megatron.diagnostics import depth_partial_mask, depth_weight_matrix, render_heatmap

    runs = [r for r in finished_runs(report, "block") if r["final_snapshot"] and r["final_validation_loss"]]
    if not runs:
        return None
    best = min(runs, key=lambda r: r["final_validation_loss"])
    snapshot = best["final_snapshot"]
    matrix, rows, cols = depth_weight_matrix(snapshot)
    title = (
        f"Depth attention of the best Block run (seed {best['seed']}, validation loss "
        f"{best['final_validation_loss']:.4f}), last iteration\n{setup_label(report)}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    render_heatmap(matrix, rows, cols, path=str(path), title=title, partial=depth_partial_mask(snapshot))
    return best


def write_plots(report: dict[str, Any], plots_dir: Path) -> dict[str, Path]:
    """Every plot there is data for; ``{name: path}``."""
    if not any(run["status"] == "finished" for run in report["runs"]):
        return {}
    paths = {name: plots_dir / filename for name, filename in PLOTS.items()}
    plot_validation(report, paths["validation"])
    plot_profile(report, "output_rms", paths["output_rms"])
    plot_profile(report, "grad_norm", paths["grad_norm"])
    if plot_heatmap(report, paths["heatmap"]) is None:
        del paths["heatmap"]
    return paths


def write_report(output_dir: Path, plots_dir: Optional[Path] = None) -> dict[str, Any]:
    """``compare_residuals.json``, ``compare_residuals.md`` and the PNGs of the sweep in ``output_dir``."""
    report = build_report(output_dir)
    plots = write_plots(report, plots_dir or output_dir / "plots")
    report["plots"] = {name: str(path) for name, path in plots.items()}
    saved = {**report, "runs": [{k: v for k, v in r.items() if k != "batch_digests"} for r in report["runs"]]}
    (output_dir / REPORT_JSON).write_text(json.dumps(saved, indent=2) + "\n")
    (output_dir / REPORT_MD).write_text(markdown(report, plots, output_dir))
    print(f"[report] {output_dir / REPORT_JSON}, {output_dir / REPORT_MD}", flush=True)
    for path in plots.values():
        print(f"[report] {path}", flush=True)
    return report


# ---------------------------------------------------------------------------- entry point


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: run (or continue) the sweep and write the report, or only the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [WORKER_FLAG]:
        return worker_main(argv[1:])
    cli, passthrough = parse_cli(argv)
    if cli.report_only:
        write_report(cli.output_dir, cli.plots_dir)
        return 0
    common = common_argv(cli, passthrough)
    specs = plan_runs(cli, common)
    for spec in specs:
        check_run_directory(spec, common)
    validate_runs(specs)
    write_sweep_file(cli, common, specs)
    status = run_sweep(specs, common, pretrain_args(common).train_iters)
    write_report(cli.output_dir, cli.plots_dir)
    return status


if __name__ == "__main__":
    raise SystemExit(main())

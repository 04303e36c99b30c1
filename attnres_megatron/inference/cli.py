"""``attnres-generate``: continue prompts with a model saved by ``attnres-pretrain``.

    attnres-generate --load CKPT --prompt "def main(" --max-new-tokens 64
    attnres-generate --load CKPT --prompt "a" "b" --temperature 0.8 --top-p 0.9 --seed 7
    torchrun --nproc-per-node 2 -m attnres_megatron.inference.cli --load CKPT --prompt "x"

The model, its vocabulary and the tokenizer come from the run's arguments saved in the
checkpoint (every pickle read through the allowlist: nothing loaded runs code); the weights
load in this launch's tensor-parallel layout, whatever layout saved them. Generation is greedy
unless ``--temperature``, ``--top-k`` or ``--top-p`` asks for sampling (Megatron-Core's sampler);
Megatron-LM's spellings ``--prompts``, ``--num-tokens-to-generate``, ``--top_k``, ``--top_p``
and ``--output-path`` are accepted too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from attnres_megatron.training.quiet import (
    KnownWarning,
    add_verbose_warnings_arg,
    hide_cpu_advice,
    install_filters,
    quiet_start,
)

GREEDY = "greedy"
GENERATE_WARNINGS = (
    KnownWarning(FutureWarning, r"`load_state_dict` is deprecated", r"megatron\.core\.dist_checkpointing\."),
    KnownWarning(FutureWarning, r"Please use DTensor instead", r"torch\.distributed\.checkpoint\."),
    KnownWarning(FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated", r"torch\."),
)
"""Deprecations torch raises under Megatron-Core's checkpoint reader and its tensor-parallel logits gather."""


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``attnres-generate``."""
    from attnres_megatron.models.specs import TRANSFORMER_IMPLS
    from attnres_megatron.training.arguments import add_device_arg, timeout_minutes

    parser = argparse.ArgumentParser(
        prog="attnres-generate",
        description="Generate text from an attnres-pretrain checkpoint with Megatron-Core's KV cache.",
    )
    parser.add_argument(
        "--load",
        type=Path,
        required=True,
        metavar="DIR",
        help="checkpoint directory of attnres-pretrain --save",
    )
    parser.add_argument(
        "--prompt",
        "--prompts",
        dest="prompts",
        nargs="+",
        action="extend",
        required=True,
        metavar="TEXT",
        help="prompts, each continued on its own (repeat the flag or give several)",
    )
    parser.add_argument(
        "--max-new-tokens",
        "--num-tokens-to-generate",
        dest="max_new_tokens",
        type=int,
        default=32,
        metavar="N",
        help="tokens to generate per prompt (default 32; fewer when the end-of-document token comes first)",
    )
    sampling = parser.add_argument_group("sampling (greedy unless one of these asks otherwise)")
    sampling.add_argument("--temperature", type=float, default=None, help="softmax temperature (0: greedy)")
    sampling.add_argument(
        "--top-k",
        "--top_k",
        dest="top_k",
        type=int,
        default=None,
        help="sample from the k most likely (1: greedy)",
    )
    sampling.add_argument(
        "--top-p", "--top_p", dest="top_p", type=float, default=None, help="sample from the nucleus of mass p"
    )
    sampling.add_argument("--seed", type=int, default=1234, help="seed of the sampler (default 1234)")
    parser.add_argument(
        "--prefill-chunk-size",
        type=int,
        default=None,
        metavar="K",
        help="run the prompt into the KV cache K tokens at a time (default: all at once)",
    )
    parser.add_argument(
        "--no-early-termination",
        action="store_true",
        help="keep generating after the end-of-document token (Megatron-Core's SamplingParams field)",
    )
    parser.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=None,
        metavar="T",
        help="tensor-parallel ranks (default: every process of the launch; nothing else is split)",
    )
    parser.add_argument(
        "--transformer-impl",
        choices=TRANSFORMER_IMPLS,
        default=None,
        help="layer spec (default: the run's); checkpoints load into either spec",
    )
    parser.add_argument(
        "--output-path", type=Path, default=None, metavar="FILE", help="also write the generations as JSON"
    )
    parser.add_argument(
        "--no-verify-checkpoint",
        action="store_true",
        help="skip checking the files against the sha256 manifest",
    )
    add_device_arg(parser, "cpu uses the CPU/gloo backend (default auto: cuda when available)")
    parser.add_argument(
        "--distributed-timeout-minutes",
        type=timeout_minutes,
        default=10,
        help="timeout of collectives (default 10)",
    )
    add_verbose_warnings_arg(parser)
    return parser


def _fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def sampling_settings(cli: argparse.Namespace) -> Any:
    """The sampler settings of the flags; an error names a bad flag."""
    from attnres_megatron.inference.generation import SamplingSettings

    if cli.temperature is not None and not cli.temperature >= 0:
        _fail(f"--temperature must be 0 (greedy) or more; got {cli.temperature}.")
    if cli.top_k is not None and cli.top_k < 0:
        _fail(f"--top-k must be 0 (off), 1 (greedy) or more; got {cli.top_k}.")
    if cli.top_p is not None and not 0.0 <= cli.top_p <= 1.0:
        _fail(f"--top-p must lie in [0, 1] (0: off); got {cli.top_p}.")
    if (cli.top_k or 0) > 1 and (cli.top_p or 0.0) > 0:
        _fail(
            "--top-k and --top-p cannot be combined (Megatron-Core's sampler applies one filter); "
            "drop one of them."
        )
    if cli.temperature is None and cli.top_k is None and cli.top_p is None:
        return SamplingSettings(seed=cli.seed)
    top_k = cli.top_k if cli.top_k is not None else 0
    top_p = cli.top_p if cli.top_p is not None else 0.0
    temperature = cli.temperature if cli.temperature is not None else 1.0
    return SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p, seed=cli.seed)


def describe_sampling(settings: Any) -> str:
    """``greedy``, or the temperature and filter of a sampled run."""
    if settings.greedy:
        return GREEDY
    filters = (
        f"top-k {settings.top_k}" if settings.top_k else f"top-p {settings.top_p:g}" if settings.top_p else ""
    )
    return (
        f"sampling, temperature {settings.temperature:g}"
        + (f", {filters}" if filters else "")
        + (f", seed {settings.seed}")
    )


def check_flags(cli: argparse.Namespace) -> None:
    """Positive token and chunk counts, a writable place for ``--output-path``."""
    if cli.output_path is not None and not cli.output_path.parent.is_dir():
        _fail(f"--output-path {cli.output_path}: directory {cli.output_path.parent} does not exist.")
    if cli.max_new_tokens < 1:
        _fail(f"--max-new-tokens must be at least 1; got {cli.max_new_tokens}.")
    if cli.prefill_chunk_size is not None and cli.prefill_chunk_size < 1:
        _fail(
            "--prefill-chunk-size must be at least 1 (omit it to prefill at once); "
            f"got {cli.prefill_chunk_size}."
        )


def tensor_parallel_size(cli: argparse.Namespace, world_size: int) -> int:
    """The TP size: the flag's, else the launch's process count; it must use every process."""
    size = cli.tensor_model_parallel_size or world_size
    if size < 1 or size != world_size:
        _fail(
            f"--tensor-model-parallel-size {size} with {world_size} process(es): attnres-generate splits "
            "the model over tensor-parallel ranks only, so launch exactly that many processes "
            f"(torchrun --nproc-per-node {size}) or drop the flag."
        )
    return size


def max_sequence_length(args: argparse.Namespace) -> int:
    """The model's position limit: ``--max-position-embeddings``, else ``--seq-length`` of the run."""
    return args.max_position_embeddings or args.seq_length


def tokenize_prompts(prompts: Sequence[str], tokenizer: Any, limit: int, new_tokens: int) -> list[list[int]]:
    """Each prompt's ids; an error names a prompt that is empty or does not fit with the new tokens."""
    ids = [tokenizer.tokenize(text) for text in prompts]
    for number, tokens in enumerate(ids, 1):
        if not tokens:
            _fail(f"--prompt {number} is empty: give at least one character to continue.")
        if len(tokens) >= limit:
            _fail(
                f"--prompt {number} is {len(tokens)} tokens, and the model's maximum sequence length is "
                f"{limit} (the run's --max-position-embeddings, else --seq-length): shorten the prompt "
                f"to at most {limit - 1} tokens to leave room for new ones."
            )
        if len(tokens) + new_tokens > limit:
            _fail(
                f"--prompt {number} ({len(tokens)} tokens) plus --max-new-tokens {new_tokens} exceeds the "
                f"model's maximum sequence length of {limit}: lower --max-new-tokens to at most "
                f"{limit - len(tokens)} or shorten the prompt."
            )
    return ids


def saved_model_args(cli: argparse.Namespace, tp: int, device: str) -> tuple[argparse.Namespace, int]:
    """The run's arguments from the checkpoint, for this layout; an error for what cannot generate."""
    from attnres_megatron.models.families import model_family
    from attnres_megatron.training.saved_run import checkpoint_args, model_vocab_size

    if not cli.load.is_dir():
        _fail(
            f"--load {cli.load}: no such directory; point --load at a directory written by "
            "attnres-pretrain --save."
        )
    args, iteration = checkpoint_args(cli.load, verify=False, tensor_model_parallel_size=tp, device=device)
    if not model_family(args.model).shape_from_flags:
        _fail(
            f"--load {cli.load} holds a {args.model} model: attnres-generate runs GPT models "
            "(--model gpt); Kimi Linear's KDA layers keep a recurrent state that Megatron-Core's "
            "static KV cache does not hold."
        )
    vocab = model_vocab_size(args)
    if vocab % tp:
        _fail(
            f"the checkpoint's vocabulary of {vocab} ids does not split over "
            f"--tensor-model-parallel-size {tp}; use a TP size that divides it."
        )
    args.padded_vocab_size = vocab
    return args, iteration


def describe_model(args: argparse.Namespace, iteration: int, tp: int, settings: Any) -> str:
    """One line: checkpoint, depth mixing, shape, layout and sampling."""
    mode = args.attention_residuals or "none"
    return (
        f"> attnres-generate: iteration {iteration} | {args.num_layers} layers, hidden {args.hidden_size} | "
        f"attention residuals: {mode} | TP {tp} | {describe_sampling(settings)}"
    )


def describe_generation(number: int, generation: Any) -> str:
    """One line of token counts and speeds of a prompt's generation."""
    prompt, steps = generation.prompt_length, generation.decode_steps
    return (
        f"> prompt {number}: {prompt} tokens + {generation.lengths[0]} new | prefill "
        f"{generation.prefill_seconds:.3f} s ({_rate(prompt, generation.prefill_seconds)} tokens/s) | "
        f"decode {steps} steps in {generation.decode_seconds:.3f} s "
        f"({_rate(steps, generation.decode_seconds)} tokens/s)"
    )


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:.0f}" if seconds > 0 else "-"


def record(text: str, generation: Any, tokenizer: Any, eod: Optional[int]) -> dict[str, Any]:
    """The JSON entry of one prompt: its text, ids, the new ids and the text they continue it with.

    The text is the tokenizer's detokenization of prompt and continuation together (an
    end-of-document id left out), as Megatron-Core's controller detokenizes a generation.
    """
    prompt_ids, new = generation.tokens[0, : generation.prompt_length].tolist(), generation.generated(0)
    shown = new[:-1] if new and new[-1] == eod else new
    full, prefix = tokenizer.detokenize(prompt_ids + shown), tokenizer.detokenize(prompt_ids)
    return dict(
        prompt=text,
        prompt_tokens=prompt_ids,
        generated_tokens=new,
        text=full,
        generated_text=full[len(prefix) :] if full.startswith(prefix) else tokenizer.detokenize(shown),
        prefill_seconds=generation.prefill_seconds,
        decode_seconds=generation.decode_seconds,
        decode_steps=generation.decode_steps,
    )


@dataclass(frozen=True)
class Plan:
    """Everything a generation run needs, checked before any process group starts."""

    launch: Any
    tensor_parallel: int
    device: str
    args: argparse.Namespace
    iteration: int
    tokenizer: Any
    max_sequence_length: int
    prompt_ids: list[list[int]]
    sampling: Any
    eod: Optional[int]
    """The id that ends a generation (None with ``--no-early-termination``)."""


def plan(cli: argparse.Namespace) -> Plan:
    """Validate the flags, the launch, the checkpoint and the prompts (an error names the fix)."""
    from attnres_megatron.models.specs import resolve_transformer_impl
    from attnres_megatron.training.distributed import resolve_device
    from attnres_megatron.training.launch_env import LaunchEnvError, discover_launch_env
    from attnres_megatron.training.saved_run import run_tokenizer

    sampling = sampling_settings(cli)
    check_flags(cli)
    try:
        launch = discover_launch_env()
    except LaunchEnvError as error:
        _fail(str(error))
    tp = tensor_parallel_size(cli, launch.world_size)
    device = resolve_device(cli.device)
    hide_cpu_advice(device, cli.verbose_warnings)
    args, iteration = saved_model_args(cli, tp, device)
    if cli.transformer_impl is not None:
        args.transformer_impl = cli.transformer_impl
    try:
        resolve_transformer_impl(args.transformer_impl, device)
    except ValueError as error:
        _fail(str(error))
    tokenizer = run_tokenizer(args)
    limit = max_sequence_length(args)
    ids = tokenize_prompts(cli.prompts, tokenizer, limit, cli.max_new_tokens)
    eod = None if cli.no_early_termination else tokenizer.eod
    return Plan(launch, tp, device, args, iteration, tokenizer, limit, ids, sampling, eod)


def load_generator(cli: argparse.Namespace, checked: Plan) -> tuple[Any, Any]:
    """The saved model on this rank behind Megatron-Core's inference wrapper, and the sampler."""
    from attnres_megatron.inference.generation import (
        CHUNKED_PREFILL_NEEDS_SDPA,
        AttnResInferenceWrapper,
        TokenSampler,
        supports_chunked_prefill,
    )
    from attnres_megatron.training.saved_run import build_saved_model, load_distributed_checkpoint

    model = build_saved_model(checked.args, checked.device)
    load_distributed_checkpoint(model, cli.load, verify=not cli.no_verify_checkpoint)
    if cli.prefill_chunk_size and not supports_chunked_prefill(model):
        _fail(f"--prefill-chunk-size: {CHUNKED_PREFILL_NEEDS_SDPA}.")
    wrapper = AttnResInferenceWrapper(
        model, max_batch_size=1, max_sequence_length=checked.max_sequence_length
    )
    return wrapper, TokenSampler(wrapper, checked.sampling, checked.tokenizer.vocab_size)


def generate_all(cli: argparse.Namespace, checked: Plan) -> list[dict[str, Any]]:
    """Continue every prompt in turn; rank 0 prints each one's speeds and text."""
    from attnres_megatron.inference.generation import generate

    wrapper, sampler = load_generator(cli, checked)
    printing = checked.launch.rank == 0
    if printing:
        print(
            describe_model(checked.args, checked.iteration, checked.tensor_parallel, checked.sampling),
            flush=True,
        )
    results = []
    for number, (text, ids) in enumerate(zip(cli.prompts, checked.prompt_ids), 1):
        prompt = torch.tensor([ids], dtype=torch.long, device=checked.device)
        generation = generate(
            wrapper, sampler, prompt, cli.max_new_tokens, cli.prefill_chunk_size, checked.eod
        )
        results.append(record(text, generation, checked.tokenizer, checked.eod))
        if printing:
            print(describe_generation(number, generation), flush=True)
            print(results[-1]["text"], flush=True)
    return results


def run(cli: argparse.Namespace) -> list[dict[str, Any]]:
    """Validate everything, start the process groups, generate for every prompt."""
    from attnres_megatron.training.collective_errors import exit_on_collective_failure
    from attnres_megatron.training.distributed import initialize_parallel, shutdown_parallel

    checked = plan(cli)
    initialize_parallel(
        checked.device,
        cli.seed,
        tensor_model_parallel_size=checked.tensor_parallel,
        launch_env=checked.launch,
        timeout_minutes=cli.distributed_timeout_minutes,
    )
    try:
        with exit_on_collective_failure(cli.distributed_timeout_minutes):
            results = generate_all(cli, checked)
    finally:
        shutdown_parallel()
    if checked.launch.rank == 0 and cli.output_path is not None:
        cli.output_path.write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``attnres-generate``."""
    if quiet_start(argv):
        install_filters(GENERATE_WARNINGS)
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

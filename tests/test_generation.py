"""Generation with Megatron-Core's static KV cache: greedy decoding equals a full recompute at every
step (no cache) for baseline, Block and Full AttnRes; chunked prefill equals unchunked; the sampler;
``attnres-generate`` on a checkpoint of ``attnres-pretrain``, single process and TP2; bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import forked_cli
import pytest
import torch
from test_diagnostics import TRAINED, plain_model_state
from test_distributed_cli import clean_env, torchrun
from worker_models import small_gpt_config

from attnres_megatron.inference import AttnResInferenceWrapper, SamplingSettings, TokenSampler, generate
from attnres_megatron.inference.generation import window_causal_mask
from attnres_megatron.models.builder import build_gpt_model

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, PROMPT, NEW = 64, 32, 7, 8
MODES = {
    "none": {},
    "block": dict(attention_residuals="block", attn_res_block_size=3),
    "full": dict(attention_residuals="full"),
}
GENERATE = [sys.executable, "-m", "attnres_megatron.inference.cli"]
PROMPTS = ["def f(", "x = 1"]


def tiny_model(reseed, mode: str, position: str = "rope") -> torch.nn.Module:
    """A 3-layer fp64 model with random pseudo-queries and key gains (non-uniform depth mixes)."""
    reseed(5)
    config = small_gpt_config(num_layers=3, **MODES[mode])
    model = build_gpt_model(config, VOCAB, SEQ, transformer_impl="local", position_embedding_type=position)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("pseudo_query", "key_gain")):
                param.copy_(
                    torch.randn(param.shape, generator=generator, dtype=param.dtype) + name.endswith("gain")
                )
    return model.eval()


def full_forward(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of every position, the whole sequence at once and no inference context."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)


def recompute_greedy(
    model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, eod: int = -1
) -> torch.Tensor:
    """The oracle: every step runs the whole sequence again (no KV cache) and takes the argmax."""
    tokens = prompt
    for _ in range(new_tokens):
        following = full_forward(model, tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, following], dim=1)
        if bool((following == eod).all()):
            break
    return tokens


def prompt_batch(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("position", ["rope", "learned_absolute"])
@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_with_the_kv_cache_equals_a_full_recompute(reseed, mode, position):
    model = tiny_model(reseed, mode, position)
    prompt = prompt_batch()
    expected = recompute_greedy(model, prompt, NEW)
    wrapper = AttnResInferenceWrapper(model, max_batch_size=2, max_sequence_length=SEQ)
    generation = generate(wrapper, TokenSampler(wrapper, SamplingSettings(), VOCAB), prompt, NEW)
    assert torch.equal(generation.tokens, expected)
    assert generation.lengths == [NEW, NEW] and generation.decode_steps == NEW - 1
    cached = len(wrapper.inference_context.key_value_memory_dict)
    assert cached == 3 and wrapper.inference_context.sequence_len_offset == PROMPT + NEW - 1


@pytest.mark.parametrize("mode", list(MODES))
def test_chunked_prefill_equals_unchunked(reseed, mode):
    model = tiny_model(reseed, mode)
    prompt = prompt_batch(4)
    expected = full_forward(model, prompt)
    wrapper = AttnResInferenceWrapper(model, max_batch_size=2, max_sequence_length=SEQ)
    sampler = TokenSampler(wrapper, SamplingSettings(), VOCAB)
    unchunked = generate(wrapper, sampler, prompt, NEW).tokens
    for chunk in (None, 1, 3, 4, PROMPT):
        wrapper.prep_model_for_inference()
        with torch.inference_mode():
            logits = wrapper.prefill(wrapper.prep_inference_input(prompt), PROMPT, chunk, all_logits=True)
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)
        assert torch.equal(
            generate(wrapper, sampler, prompt, NEW, prefill_chunk_size=chunk).tokens, unchunked
        )


def test_window_masks_follow_megatrons_convention():
    mask = window_causal_mask(2, 5)
    assert mask.shape == (1, 1, 3, 5)
    assert mask[0, 0].tolist() == [
        [False, False, False, True, True],
        [False, False, False, False, True],
        [False, False, False, False, False],
    ]


def test_an_eod_ends_a_row_and_the_loop_ends_when_every_row_did(reseed):
    model = tiny_model(reseed, "block")
    prompt = prompt_batch()
    greedy = recompute_greedy(model, prompt, NEW)
    eod = int(greedy[0, PROMPT + 2])  # row 0 stops at its third token
    wrapper = AttnResInferenceWrapper(model, max_batch_size=2, max_sequence_length=SEQ)
    generation = generate(wrapper, TokenSampler(wrapper, SamplingSettings(), VOCAB), prompt, NEW, eod=eod)
    stop = [next((i for i, t in enumerate(row[PROMPT:].tolist(), 1) if t == eod), NEW) for row in greedy]
    assert generation.lengths == stop
    for row in range(2):
        assert generation.generated(row) == greedy[row, PROMPT : PROMPT + stop[row]].tolist()
    assert generation.tokens.shape[1] == PROMPT + max(generation.lengths)


def test_sampling_draws_within_the_filters_and_repeats_with_the_seed(reseed):
    model = tiny_model(reseed, "full")
    prompt = prompt_batch()
    wrapper = AttnResInferenceWrapper(model, max_batch_size=2, max_sequence_length=SEQ)
    top2 = SamplingSettings(temperature=2.0, top_k=2, seed=11)
    runs = [generate(wrapper, TokenSampler(wrapper, top2, VOCAB), prompt, NEW).tokens for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    logits = full_forward(model, runs[0])
    for step in range(NEW):
        position = PROMPT + step
        allowed = logits[:, position - 1].topk(2).indices
        assert bool((allowed == runs[0][:, position, None]).any(-1).all())
    other = generate(
        wrapper, TokenSampler(wrapper, SamplingSettings(0.8, 0, 0.9, seed=12), VOCAB), prompt, NEW
    )
    assert not torch.equal(other.tokens, runs[0])


def test_padding_ids_are_never_sampled(reseed):
    model = tiny_model(reseed, "none")
    wrapper = AttnResInferenceWrapper(model, max_batch_size=1, max_sequence_length=SEQ)
    logits = torch.zeros(4, VOCAB, dtype=torch.float64)
    logits[:, VOCAB - 4 :] = 100.0  # the padding rows of a 60-id tokenizer's vocabulary
    for settings in (SamplingSettings(), SamplingSettings(temperature=1.0, top_k=0, seed=3)):
        tokens = TokenSampler(wrapper, settings, VOCAB - 4)(logits.clone())
        assert bool((tokens < VOCAB - 4).all())


def test_pipeline_stages_and_te_attention_are_refused_clearly(reseed):
    model = tiny_model(reseed, "block")
    wrapper = AttnResInferenceWrapper(model, max_batch_size=2, max_sequence_length=SEQ)
    model.decoder.layers[0].self_attention.core_attention = torch.nn.Identity()  # stands in for TE's
    with pytest.raises(ValueError, match="chunked prefill needs the local spec"):
        generate(wrapper, TokenSampler(wrapper, SamplingSettings(), VOCAB), prompt_batch(), NEW, 3)
    model.decoder.attn_res_io = object()  # a pipeline stage's I/O
    with pytest.raises(ValueError, match="--pipeline-model-parallel-size 1"):
        generate(wrapper, TokenSampler(wrapper, SamplingSettings(), VOCAB), prompt_batch(), NEW)
    with pytest.raises(ValueError, match="exceed the KV cache"):
        generate(wrapper, TokenSampler(wrapper, SamplingSettings(), VOCAB), prompt_batch(), SEQ)


def test_sampling_flags():
    from attnres_megatron.inference.cli import build_parser, describe_sampling, sampling_settings

    def settings(*flags: str) -> SamplingSettings:
        return sampling_settings(build_parser().parse_args(["--load", "ck", "--prompt", "a", *flags]))

    assert settings().greedy and settings("--top-k", "1", "--seed", "3").greedy
    assert settings("--temperature", "0").greedy
    sampled = settings("--temperature", "0.8")
    assert (sampled.top_k, sampled.top_p, sampled.temperature) == (0, 0.0, 0.8) and not sampled.greedy
    assert settings("--top_p", "0.9").top_p == 0.9 and settings("--top_k", "5").top_k == 5
    assert describe_sampling(settings("--top-p", "0.9", "--seed", "7")) == (
        "sampling, temperature 1, top-p 0.9, seed 7"
    )
    parsed = build_parser().parse_args(["--load", "ck", "--prompts", "a", "b", "--prompt", "c"])
    assert parsed.prompts == ["a", "b", "c"]


# ---------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 3-iteration Block AttnRes run of attnres-pretrain (byte tokens, 16 positions)."""
    ck = tmp_path_factory.mktemp("generate") / "ck"
    command = [sys.executable, "-m", "attnres_megatron.training.pretrain", *TRAINED, "--save", str(ck)]
    trained = forked_cli.run(command, env=clean_env(), timeout=300, cwd=REPO_ROOT)
    assert trained.returncode == 0, trained.stderr[-3000:]
    return ck


def generate_cli(launcher: list[str], checkpoint: Path, output: Path, *flags: str) -> list[dict]:
    command = [
        *launcher,
        "--load",
        str(checkpoint),
        "--prompt",
        *PROMPTS,
        "--output-path",
        str(output),
        *flags,
    ]
    result = forked_cli.run(command, env=clean_env(), timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (
        "> attnres-generate: iteration 3 | 2 layers, hidden 32 | attention residuals: block" in result.stdout
    )
    assert result.stdout.count("> prompt ") == len(PROMPTS) and "greedy" in result.stdout
    return json.loads(output.read_text())


@pytest.fixture(scope="module")
def single_process(checkpoint) -> list[dict]:
    return generate_cli(GENERATE, checkpoint, checkpoint.parent / "single.json", "--max-new-tokens", "8")


def test_the_command_continues_prompts_as_a_recompute_of_the_saved_weights(
    checkpoint, single_process, reseed, tmp_path
):
    from attnres_megatron.training.arguments import build_parser
    from attnres_megatron.training.corpus import BYTE_VOCAB_SIZE
    from attnres_megatron.training.model_setup import config_from_args
    from attnres_megatron.training.tokenizers import BYTE_EOD

    reseed()
    model = build_gpt_model(
        config_from_args(build_parser().parse_args(TRAINED), "cpu"),
        BYTE_VOCAB_SIZE,
        16,
        transformer_impl="local",
    )
    loaded = model.load_state_dict(
        plain_model_state(checkpoint / "iter_0000003", tmp_path / "plain.pt"), strict=False
    )
    assert not loaded.unexpected_keys and all(key.endswith("_extra_state") for key in loaded.missing_keys)
    model.eval()
    for text, entry in zip(PROMPTS, single_process):
        prompt = torch.tensor([list(text.encode())])
        expected = recompute_greedy(model, prompt, 8, eod=BYTE_EOD)[0, prompt.shape[1] :].tolist()
        assert entry["prompt"] == text and entry["prompt_tokens"] == list(text.encode())
        assert entry["generated_tokens"] == expected
        shown = bytes(t for t in expected if t != BYTE_EOD).decode(errors="ignore")
        assert entry["text"] == (text + shown).rstrip()  # the byte tokenizer's detokenization
        assert entry["generated_text"] == entry["text"][len(text) :]


def test_tensor_parallel_2_with_chunked_prefill_equals_the_single_process(
    checkpoint, single_process, tmp_path
):
    launcher = [*torchrun(2), "-m", "attnres_megatron.inference.cli"]
    flags = ("--max-new-tokens", "8", "--prefill-chunk-size", "2")
    tp2 = generate_cli(launcher, checkpoint, tmp_path / "tp2.json", *flags)
    assert [e["generated_tokens"] for e in tp2] == [e["generated_tokens"] for e in single_process]


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--load", "{missing}"],
            "no such directory; point --load at a directory written by attnres-pretrain",
        ),
        (["--load", "{empty}"], "no latest_checkpointed_iteration.txt there"),
        (["--prompt", "0123456789abcdef"], "is 16 tokens, and the model's maximum sequence length is 16"),
        (["--max-new-tokens", "12"], "lower --max-new-tokens to at most 10 or shorten the prompt"),
        (["--prompt", ""], "--prompt 1 is empty"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--prefill-chunk-size", "0"], "--prefill-chunk-size must be at least 1"),
        (["--top-k", "5", "--top-p", "0.9"], "--top-k and --top-p cannot be combined"),
        (["--temperature", "-1"], "--temperature must be 0 (greedy) or more"),
        (["--top-p", "1.5"], "--top-p must lie in [0, 1]"),
        (
            ["--tensor-model-parallel-size", "2"],
            "launch exactly that many processes (torchrun --nproc-per-node 2)",
        ),
        (["--output-path", "{missing}/out.json"], "does not exist"),
    ],
)
def test_bad_input_is_refused_before_any_work(checkpoint, tmp_path, monkeypatch, flags, message):
    from attnres_megatron.inference import cli
    from attnres_megatron.training import distributed

    def no_work(*args, **kwargs):
        raise AssertionError("the arguments were accepted: attnres-generate went on to start")

    monkeypatch.setattr(distributed, "initialize_parallel", no_work)
    (tmp_path / "empty").mkdir()
    paths = dict(missing=tmp_path / "missing", empty=tmp_path / "empty")
    argv = ["--load", str(checkpoint), "--device", "cpu"] + (
        [] if "--prompt" in flags else ["--prompt", "print("]
    )
    argv += [flag.format(**paths) for flag in flags]
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert str(exited.value.code).startswith("error: ") and message in str(exited.value.code)

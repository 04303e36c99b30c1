"""Hugging Face export and import: bitwise round trips, logits and greedy parity under transformers,
the block size in layers, refusals, and the AttnRes epsilon following the model's norm epsilon."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import forked_cli
import pytest
import torch

from attnres_megatron.hf.convert import export_checkpoint, import_directory
from attnres_megatron.hf.settings import ConversionError, check_exportable

REPO_ROOT = Path(__file__).resolve().parents[1]
SEQ, VOCAB = 12, 256
TINY = (
    f"--num-layers 3 --hidden-size 32 --num-attention-heads 4 --seq-length {SEQ} --micro-batch-size 2 "
    "--hidden-dropout 0 --attention-dropout 0 --device cpu"
).split()
LLAMA_STYLE = (
    "--swiglu --disable-bias-linear --normalization RMSNorm --position-embedding-type rope "
    "--untie-embeddings-and-output-weights"
).split()
GQA = "--group-query-attention --num-query-groups 2".split()
VARIANTS = {
    # Megatron-LM's defaults: GeLU MLP with biases, LayerNorm, learned positions, tied output layer.
    "baseline": ["--attention-residuals", "none"],
    # SwiGLU, RMSNorm, RoPE, grouped-query attention; 2 layers per block, the last block partial.
    "block": [*LLAMA_STYLE, *GQA, "--attention-residuals", "block", "--attn-res-block-size", "4"],
    # Full AttnRes with query/key norms, qkv biases only, wider heads, another norm epsilon.
    "full": (
        "--disable-bias-linear --add-qkv-bias --qk-layernorm --kv-channels 16 --position-embedding-type rope "
        "--norm-epsilon 1e-6 --attention-residuals full"
    ).split(),
}
TEXT = "def f(x):\n    return 'héllo' + \"\\x00\" <|endoftext|> Ā\t\x00 wörld"


def saved_checkpoint(root: Path, flags: list[str], seed: int = 3) -> torch.nn.Module:
    """Save a tiny attnres-pretrain checkpoint with random weights (non-zero pseudo-queries) under
    ``root``, in this process; returns its model (eval mode)."""
    from attnres_megatron.training.arguments import parse_args, validate_args
    from attnres_megatron.training.checkpointing import save_checkpoint
    from attnres_megatron.training.model_setup import config_from_args, setup_training
    from attnres_megatron.training.vocabulary import prepare_vocabulary

    args = parse_args([*TINY, *flags])
    validate_args(args, world_size=1)
    prepare_vocabulary(args)
    setup = setup_training(args, config_from_args(args, "cpu"), args.padded_vocab_size, "cpu")
    model = setup.unwrapped()[0]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.5 if "pseudo_query" in name else 0.05
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * scale)
    setup.optimizer.reload_model_params()
    save_checkpoint(setup, 3, str(root), {"consumed_samples": 0}, args, "test-run")
    return model.eval()


def megatron_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, s, vocab]`` of the Megatron-Core model (fp32, no mask: causal)."""
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, None)


def hf_model(directory: Path):
    """The exported directory under transformers, fp32, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=True, dtype=torch.float32)
    return model.eval()


def dcp_tensors(checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint, read with torch.distributed.checkpoint alone (no Megatron,
    none of the code under test)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(checkpoint), str(scratch))
    state = torch.load(scratch, weights_only=False)
    skip = ("optimizer", "rng_state")
    return {
        key: value
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and not key.startswith(skip) and "_extra_state" not in key
    }


def assert_same_tensors(original: Path, imported: Path, scratch: Path) -> None:
    """Every model tensor of two checkpoint iterations equal bit for bit, with the same dtype."""
    before = dcp_tensors(original, scratch / "original.pt")
    after = dcp_tensors(imported, scratch / "imported.pt")
    assert sorted(before) == sorted(after) and len(before) > 10
    for key, tensor in before.items():
        assert tensor.dtype == after[key].dtype and torch.equal(tensor, after[key]), key


@pytest.fixture(scope="module")
def exported(tmp_path_factory, single_rank):
    """Each variant saved, exported and imported back: name -> (model, directory)."""
    done = {}
    for name, flags in VARIANTS.items():
        root = tmp_path_factory.mktemp(name)
        model = saved_checkpoint(root / "ck", flags)
        export_checkpoint(root / "ck", root / "hf")
        import_directory(root / "hf", root / "imported")
        done[name] = (model, root)
    return done


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_then_import_round_trips_every_tensor_bitwise(exported, variant):
    _, root = exported[variant]
    assert_same_tensors(root / "ck" / "iter_0000003", root / "imported" / "iter_0000000", root)


def test_a_bf16_checkpoint_round_trips_in_bf16(tmp_path, single_rank):
    saved_checkpoint(tmp_path / "ck", [*LLAMA_STYLE, "--attention-residuals", "full", "--bf16"])
    export_checkpoint(tmp_path / "ck", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    import_directory(tmp_path / "hf", tmp_path / "imported")
    assert_same_tensors(tmp_path / "ck" / "iter_0000003", tmp_path / "imported" / "iter_0000000", tmp_path)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_logits_and_greedy_generation_match_megatron(exported, variant):
    model, root = exported[variant]
    hf = hf_model(root / "hf")
    ids = torch.randint(0, VOCAB, (2, SEQ - 4), generator=torch.Generator().manual_seed(5))
    ours = megatron_logits(model, ids)
    with torch.no_grad():
        theirs = hf(ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{variant}: max abs diff {diff:.3g}, relative to max |logit| {diff / ours.abs().max().item():.3g}")
    assert diff < 1e-5
    with torch.no_grad():
        loss = hf(ids, labels=ids).loss
    expected = torch.nn.functional.cross_entropy(ours[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    hf.generation_config.eos_token_id = None  # compare a fixed number of tokens
    generated = hf.generate(ids, max_new_tokens=4, do_sample=False)
    sequence = ids
    for _ in range(4):  # greedy with a full recompute at each step, on our model
        sequence = torch.cat(
            [sequence, megatron_logits(model, sequence)[:, -1].argmax(-1, keepdim=True)], dim=1
        )
    assert torch.equal(generated, sequence)


def test_config_json_carries_the_block_size_in_layers_and_the_convention_keys(exported):
    from safetensors import safe_open

    configs = {
        name: json.loads((root / "hf" / "config.json").read_text()) for name, (_, root) in exported.items()
    }
    order = ("baseline", "block", "full")
    assert [configs[name]["attn_res_block_size"] for name in order] == [None, 2, None]  # S = 4 sublayers
    assert [configs[name]["attn_res_full"] for name in order] == [False, False, True]
    assert configs["full"]["attn_res_eps"] == configs["full"]["norm_eps"] == 1e-6  # trained with the norm eps
    assert configs["block"]["auto_map"]["AutoModelForCausalLM"] == "modeling_attnres.AttnResForCausalLM"
    with safe_open(str(exported["block"][1] / "hf" / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
        assert weights.get_slice("model.layers.2.self_attention_res_proj.weight").get_shape() == [1, 32]
        assert weights.get_slice("model.layers.2.self_attention_res_norm.weight").get_shape() == [32]
        assert weights.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [16, 32]  # 2 groups
    for layer in range(3):
        for name in ("self_attention_res_norm", "self_attention_res_proj", "mlp_res_norm", "mlp_res_proj"):
            assert f"model.layers.{layer}.{name}.weight" in keys
    assert {
        "model.output_attn_res_norm.weight",
        "model.output_attn_res_proj.weight",
        "lm_head.weight",
    } <= keys
    with safe_open(str(exported["baseline"][1] / "hf" / "model.safetensors"), "pt") as weights:
        plain = set(weights.keys())
    assert not [key for key in plain if "_res_" in key] and "lm_head.weight" not in plain  # tied
    assert "model.embed_positions.weight" in plain and "model.layers.0.mlp.gate_proj.weight" not in plain


def test_the_exported_byte_tokenizer_gives_megatrons_byte_ids(exported):
    from transformers import AutoTokenizer

    from attnres_megatron.training.tokenizers import build_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(exported["block"][1] / "hf"))
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == build_tokenizer().tokenize(TEXT) == list(TEXT.encode())
    assert tokenizer.decode(ids) == TEXT


@pytest.mark.timeout(300)
def test_the_exported_directory_runs_without_attnres_megatron_or_megatron(exported):
    """The directory alone, in an interpreter where both packages fail to import."""
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('attnres_megatron', 'megatron'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = tokenizer('def f(x):', return_tensors='pt').input_ids\n"
        "print(model.generate(ids, max_new_tokens=3, do_sample=False).shape[1])\n"
    )
    directory = str(exported["full"][1] / "hf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, directory], capture_output=True, text=True, timeout=240, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) > len(b"def f(x):")


def test_bad_inputs_are_refused_with_the_reason(tmp_path, single_rank):
    saved_checkpoint(
        tmp_path / "odd", [*LLAMA_STYLE, "--attention-residuals", "block", "--attn-res-block-size", "3"]
    )
    with pytest.raises(ConversionError, match=r"--attn-res-block-size 3 gives S = 3 .*not a whole number of"):
        export_checkpoint(tmp_path / "odd", tmp_path / "hf_odd")
    assert not (tmp_path / "hf_odd").exists() and not list(tmp_path.glob(".hf_odd*"))

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep me")
    saved_checkpoint(tmp_path / "ck", ["--attention-residuals", "full"])
    with pytest.raises(ConversionError, match="exists and is not empty.*--overwrite"):
        export_checkpoint(tmp_path / "ck", existing)
    assert (existing / "mine.txt").read_text() == "keep me"
    export_checkpoint(tmp_path / "ck", existing, overwrite=True)
    assert not (existing / "mine.txt").exists() and (existing / "model.safetensors").is_file()
    with pytest.raises(ConversionError, match="exists and is not empty"):
        import_directory(existing, tmp_path / "ck")  # a checkpoint is never overwritten silently

    config = json.loads((existing / "config.json").read_text())
    (existing / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConversionError, match="model_type 'llama'"):
        import_directory(existing, tmp_path / "from_llama")
    (existing / "config.json").write_text(json.dumps({**config, "attn_res_full": False}))
    with pytest.raises(
        ConversionError, match=r"do not fit the model .*not in the model: decoder.attn_res_final"
    ):
        import_directory(existing, tmp_path / "inconsistent")  # AttnRes tensors, AttnRes off


def test_kimi_linear_export_is_refused_naming_what_cannot_be_verified():
    with pytest.raises(ConversionError, match=r"--model kimi-linear-tiny is refused") as refused:
        check_exportable(argparse.Namespace(model="kimi-linear-tiny"), None)
    for name in ("modeling_kimi", "A_log", "kv_b_proj", "e_score_correction_bias", "self_attention_res_"):
        assert name in str(refused.value)


# ---------------------------------------------------------------------------- epsilon


def test_attn_res_eps_follows_the_norm_epsilon_unless_set(single_rank):
    from megatron_lm_worker import GPT_AS_ATTNRES_PRETRAIN, TINY_GPT, megatron_lm_args

    from attnres_megatron import AttnResTransformerConfig, megatron_lm
    from attnres_megatron.training.arguments import parse_args
    from attnres_megatron.training.model_setup import config_from_args

    shape = dict(num_layers=2, hidden_size=32, num_attention_heads=4, attention_residuals="full")
    assert AttnResTransformerConfig(**shape).attn_res_eps == 1e-5  # Megatron's layernorm_epsilon
    assert AttnResTransformerConfig(**shape, layernorm_epsilon=1e-6).attn_res_eps == 1e-6
    assert AttnResTransformerConfig(**shape, layernorm_epsilon=1e-6, attn_res_eps=1e-3).attn_res_eps == 1e-3
    args = parse_args([*TINY, "--attention-residuals", "full", "--norm-epsilon", "1e-6"])
    assert args.attn_res_eps is None
    assert config_from_args(args, "cpu").attn_res_eps == args.attn_res_eps == 1e-6  # saved resolved
    kimi = parse_args(["--model", "kimi-linear-tiny"])
    assert config_from_args(kimi, "cpu").attn_res_eps == kimi.attn_res_eps == 1e-5  # the preset's norm eps
    mlm = megatron_lm_args([*TINY_GPT, *GPT_AS_ATTNRES_PRETRAIN, "--attention-residuals", "full"])
    mlm.norm_epsilon = 1e-6  # Megatron-LM's --norm-epsilon (the test parser leaves it out)
    megatron_lm.validate_attn_res_args(mlm)
    assert megatron_lm.config_from_megatron_args(mlm).attn_res_eps == mlm.attn_res_eps == 1e-6


def test_a_checkpoint_keeps_the_epsilon_it_was_trained_with(tmp_path, single_rank, monkeypatch):
    """A run saved with the old default (1e-6) exports and resumes with 1e-6."""
    from attnres_megatron.training import pretrain
    from attnres_megatron.training.checkpointing import saved_attn_res_eps

    old = [
        *LLAMA_STYLE,
        "--attention-residuals",
        "block",
        "--attn-res-block-size",
        "2",
        "--attn-res-eps",
        "1e-6",
    ]
    saved_checkpoint(tmp_path / "old", old)
    saved_checkpoint(tmp_path / "baseline", ["--attention-residuals", "none"])
    assert saved_attn_res_eps(str(tmp_path / "old")) == 1e-6
    assert saved_attn_res_eps(str(tmp_path / "baseline")) is None  # a warm start takes the norm epsilon
    exported = export_checkpoint(tmp_path / "old", tmp_path / "hf")
    assert (exported.config["attn_res_eps"], exported.config["norm_eps"]) == (1e-6, 1e-5)

    def stop(args, device):
        """Stop attnres-pretrain where it builds the model, reporting the epsilon it would use."""
        raise SystemExit(f"attn_res_eps {args.attn_res_eps}")

    monkeypatch.setattr(pretrain, "config_from_args", stop)
    resume = [*TINY, *old[:-2], "--load", str(tmp_path / "old"), "--mock-data"]
    with pytest.raises(SystemExit, match="attn_res_eps 1e-06"):
        pretrain.main(resume)


def test_a_bf16_load_without_the_optimizer_refreshes_its_fp32_weights(tmp_path, single_rank):
    from attnres_megatron.training.arguments import parse_args, validate_args
    from attnres_megatron.training.checkpointing import load_checkpoint
    from attnres_megatron.training.model_setup import config_from_args, setup_training

    saved = saved_checkpoint(tmp_path / "ck", [*LLAMA_STYLE, "--attention-residuals", "full", "--bf16"])
    args = parse_args([*TINY, *LLAMA_STYLE, "--attention-residuals", "full", "--bf16"])
    validate_args(args, world_size=1)
    setup = setup_training(args, config_from_args(args, "cpu"), VOCAB, "cpu")
    load_checkpoint(setup, str(tmp_path / "ck"), load_optimizer=False)
    pairs = [
        (model_param, main_param)
        for inner in getattr(setup.optimizer, "chained_optimizers", [setup.optimizer])
        for model_group, main_group in zip(inner.float16_groups, inner.fp32_from_float16_groups)
        for model_param, main_param in zip(model_group, main_group)
    ]
    assert pairs and all(torch.equal(main.to(torch.bfloat16), model) for model, main in pairs)
    loaded = dict(setup.unwrapped()[0].named_parameters())
    assert all(torch.equal(param, loaded[name]) for name, param in saved.named_parameters())


# ---------------------------------------------------------------------------- command line


def test_the_command_line_converts_and_attnres_pretrain_trains_on(exported, tmp_path):
    _, root = exported["block"]
    tool = [sys.executable, str(REPO_ROOT / "tools" / "convert_hf.py")]
    hf, ck = tmp_path / "hf", tmp_path / "ck"
    export = [*tool, "export", "--load", str(root / "ck"), "--output", str(hf)]
    done = forked_cli.run(export, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"> wrote {hf} (attention residuals: block, 2 layers per block)" in done.stdout
    again = forked_cli.run(export, cwd=tmp_path, timeout=300)
    assert again.returncode == 1 and f"error: --output {hf} exists and is not empty" in again.stderr
    imported = forked_cli.run(
        [*tool, "import", "--input", str(hf), "--save", str(ck)], cwd=tmp_path, timeout=300
    )
    assert imported.returncode == 0, imported.stderr[-2000:]
    command = shlex.split(imported.stdout.split("> train on with: attnres-pretrain ")[1].splitlines()[0])
    assert command[:3] == ["--load", str(ck), "--no-load-optim"]
    pretrain = [sys.executable, "-m", "attnres_megatron.training.pretrain", *command]
    run = [*pretrain, "--mock-data", "--train-iters", "2", "--micro-batch-size", "2", "--eval-iters", "0"]
    trained = forked_cli.run([*run, "--device", "cpu"], cwd=tmp_path, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"> resumed from {ck} at iteration 0" in trained.stdout
    without = [arg for arg in run if arg != "--no-load-optim"]
    refused = forked_cli.run([*without, "--device", "cpu"], cwd=tmp_path, timeout=300)
    assert refused.returncode != 0 and "holds model weights without optimizer state" in refused.stderr
    assert "pass --no-load-optim" in refused.stderr


def test_left_padded_batches_compute_what_each_prompt_computes_alone(exported):
    hf = hf_model(exported["baseline"][1] / "hf")  # learned absolute positions: padding must not shift them
    hf.generation_config.eos_token_id = None
    prompts = [list(b"import os\n"), list(b"x = 1")]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        padded = hf(ids, attention_mask=mask).logits
        for row, prompt in enumerate(prompts):
            alone = hf(torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(padded[row, width - len(prompt) :], alone, rtol=0, atol=1e-5)
    alone = [hf.generate(torch.tensor([p]), max_new_tokens=3, do_sample=False)[0, -3:] for p in prompts]
    together = hf.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(together[:, -3:], torch.stack(alone))


def test_a_hugging_face_tokenizer_is_exported_and_named_by_the_import(tmp_path, single_rank):
    import importlib.util

    from transformers import AutoTokenizer

    from attnres_megatron.training.tokenizers import build_tokenizer, tokenizer_args

    spec = importlib.util.spec_from_file_location(
        "train_tokenizer", REPO_ROOT / "tools" / "train_tokenizer.py"
    )
    train_tokenizer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_tokenizer)
    bpe = tmp_path / "bpe"
    assert (
        train_tokenizer.main(["--vocab-size", "300", "--output", str(bpe), "--corpus-bytes", "200000"]) == 0
    )
    flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(bpe)]
    saved_checkpoint(tmp_path / "ck", [*LLAMA_STYLE, "--attention-residuals", "full", *flags])
    exported = export_checkpoint(tmp_path / "ck", tmp_path / "hf")
    ours = build_tokenizer(tokenizer_args(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(bpe)))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert theirs(TEXT)["input_ids"] == ours.tokenize(TEXT)
    assert exported.config["eos_token_id"] == theirs.eos_token_id == ours.eod
    assert exported.config["vocab_size"] == 384  # 300 ids padded to a multiple of 128
    imported = import_directory(tmp_path / "hf", tmp_path / "imported")
    assert imported.flags[-4:] == [
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        str(tmp_path / "hf"),
    ]

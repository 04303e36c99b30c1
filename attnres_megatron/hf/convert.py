"""Export an attnres-pretrain checkpoint as a Hugging Face directory, and import one back.

An export directory holds ``model.safetensors`` (the tensors under the names of ``keys.py``),
``config.json`` (``settings.py``: ``attn_res_block_size`` in layers, ``auto_map`` to the modeling
files beside it), ``generation_config.json``, ``configuration_attnres.py`` and
``modeling_attnres.py`` (``trust_remote_code=True``) and the run's tokenizer (the byte-level one
converted to a ``tokenizer.json`` with the same ids, a Hugging Face one re-saved). An import builds
the model those settings describe with ``attnres-pretrain``'s own setup, loads the tensors and
saves a checkpoint at iteration 0 that ``attnres-pretrain --load --no-load-optim`` trains on
from. Both write into a staging directory beside the output and move it into place at the end; a
non-empty output is replaced only when asked (``overwrite``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from attnres_megatron.hf.keys import MappingError, Shapes, to_hf, to_megatron
from attnres_megatron.hf.settings import ConversionError, hf_config, pretrain_flags, required

HERE = Path(__file__).resolve().parent
MODELING_FILES = ("configuration_attnres.py", "modeling_attnres.py")
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PROVENANCE = "attnres_megatron"
"""config.json key recording what the export came from (iteration, Megatron-Core tokenizer flags)."""
BYTE_LEVEL = "ByteLevelTokenizer"


@dataclass
class Converted:
    """Where a conversion wrote, what it wrote and the notes to print."""

    directory: Path
    config: dict[str, Any]
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- shared


def _umask() -> int:
    """This process's file-creation mask (read without changing it)."""
    """This process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(path: Path, overwrite: bool, option: str) -> None:
    """Refuse a file, or a non-empty directory unless ``overwrite``: nothing saved is replaced silently."""
    if path.exists() and not path.is_dir():
        raise ConversionError(f"{option} {path} is a file, not a directory.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConversionError(
            f"{option} {path} exists and is not empty; choose a new directory, or pass --overwrite to "
            "replace its contents."
        )


@contextmanager
def staged_directory(path: Path, overwrite: bool, option: str) -> Iterator[Path]:
    """A fresh directory beside ``path`` to write into, moved to ``path`` when the block succeeds.

    ``path`` is checked first (:func:`check_output`); with ``overwrite`` it is replaced only after the
    new one is complete; a failure removes the staging directory and leaves ``path`` as it was."""
    check_output(path, overwrite, option)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        staging.chmod(0o777 & ~_umask())
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():
        replaced = path.with_name(f".{path.name}.replaced-{uuid.uuid4().hex[:8]}")
        path.rename(replaced)
        staging.rename(path)
        shutil.rmtree(replaced)
    else:
        staging.rename(path)


def model_tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    """The model's tensors by Megatron-Core name (no Transformer Engine ``_extra_state``)."""
    return {
        name: tensor
        for name, tensor in model.state_dict().items()
        if isinstance(tensor, Tensor) and not name.endswith("_extra_state")
    }


# ---------------------------------------------------------------------------- tokenizer


def byte_characters() -> list[str]:
    """The printable character of each byte in byte-level BPE (printable Latin-1 bytes stand for
    themselves, the others for the characters from U+0100 on, in byte order)."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    characters, extra = [], 0
    for byte in range(256):
        characters.append(chr(byte) if byte in printable else chr(0x100 + extra))
        extra += byte not in printable
    return characters


def write_byte_tokenizer(directory: Path, max_length: int) -> None:
    """A ``tokenizer.json`` whose ids are the UTF-8 bytes of the text, as ``ByteLevelTokenizer``'s:
    one token per byte, no merges, no special tokens (NUL, id 0, ends a document: the eos of
    ``generation_config.json``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {character: byte for byte, character in enumerate(byte_characters())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(directory / "tokenizer.json"))
    settings = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def hf_tokenizer(tokenizer: Any) -> Any:
    """The transformers tokenizer inside a Megatron-Core ``HuggingFaceTokenizer``."""
    return tokenizer.tokenizer._tokenizer.tokenizer


def token_ids(args: argparse.Namespace, tokenizer: Any) -> dict[str, Optional[int]]:
    """bos, eos and pad ids of the run's tokenizer (eos: its end-of-document id)."""
    ids: dict[str, Optional[int]] = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if tokenizer is None:
        return ids
    ids["eos_token_id"] = int(tokenizer.eod)
    if args.tokenizer_type == "HuggingFaceTokenizer":
        inner = hf_tokenizer(tokenizer)
        ids.update(bos_token_id=inner.bos_token_id, pad_token_id=inner.pad_token_id)
    return ids


def export_tokenizer(
    args: argparse.Namespace, tokenizer: Any, directory: Path, max_length: int
) -> Optional[str]:
    """Write the run's tokenizer files; a note when there are none to write."""
    if tokenizer is None:
        return "> note: the run's tokenizer could not be built: no tokenizer files written"
    if args.tokenizer_type == BYTE_LEVEL:
        write_byte_tokenizer(directory, max_length)
        return None
    if args.tokenizer_type == "HuggingFaceTokenizer":
        hf_tokenizer(tokenizer).save_pretrained(str(directory))
        return None
    return (
        f"> note: --tokenizer-type {args.tokenizer_type} has no Hugging Face tokenizer files: none written "
        "(its eos id is in generation_config.json)"
    )


def tokenizer_flags(directory: Path, config: Mapping) -> list[str]:
    """attnres-pretrain's tokenizer flags for an imported directory: the exported run's when it needs
    no file (byte-level, null), else the directory's own Hugging Face tokenizer."""
    saved = (config.get(PROVENANCE) or {}).get("tokenizer") or {}
    if saved.get("tokenizer_type") in (BYTE_LEVEL, "NullTokenizer"):
        size = saved.get("vocab_size")
        return ["--tokenizer-type", saved["tokenizer_type"], *(["--vocab-size", str(size)] if size else [])]
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
        return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(directory.resolve())]
    return ["--tokenizer-type", BYTE_LEVEL]


# ---------------------------------------------------------------------------- export


def _run_tokenizer(args: argparse.Namespace) -> Any:
    """The run's tokenizer, or None when it cannot be built (its files moved): the weights still export."""
    from attnres_megatron.training.saved_run import run_tokenizer

    try:
        return run_tokenizer(args)
    except SystemExit:
        return None


def _dtype_name(tensors: Mapping[str, Tensor]) -> str:
    """The dtype of the (first) tensors, as config.json spells it."""
    return str(next(iter(tensors.values())).dtype).removeprefix("torch.")


def saved_in_bf16(load: Path) -> bool:
    """Whether the run that saved the latest checkpoint under ``load`` trained with ``--bf16``."""
    from attnres_megatron.training.checkpoint_format import saved_arguments
    from attnres_megatron.training.checkpointing import latest_checkpoint, read_common

    _, path = latest_checkpoint(str(load))
    return bool(saved_arguments(read_common(path, str(load)).get("args")).get("bf16"))


def export_checkpoint(load: Path, output: Path, overwrite: bool = False, verify: bool = True) -> Converted:
    """Write the latest checkpoint under ``load`` (attnres-pretrain ``--save``) as a Hugging Face
    directory at ``output``; ``ConversionError`` (or ``SystemExit`` for an unreadable checkpoint)
    says what cannot be exported and why."""
    from safetensors.torch import save_file

    from attnres_megatron.training.model_setup import config_from_args
    from attnres_megatron.training.saved_run import (
        build_saved_model,
        checkpoint_args,
        load_distributed_checkpoint,
        model_vocab_size,
    )

    check_output(output, overwrite, "--output")  # before any work
    args, iteration = checkpoint_args(load, verify=verify)
    args.bf16 = saved_in_bf16(load)  # keep the saved dtype: the tensors are written as they are
    from attnres_megatron.training.distributed import start_single_process

    start_single_process("cpu", args.seed)
    config = config_from_args(args, "cpu")
    vocab = model_vocab_size(args)
    tokenizer = _run_tokenizer(args)
    fields = hf_config(args, config, vocab, token_ids(args, tokenizer))  # refusals before any loading
    fields[PROVENANCE] = dict(
        iteration=iteration,
        tokenizer={"tokenizer_type": args.tokenizer_type, "vocab_size": args.vocab_size},
    )
    model = build_saved_model(args, "cpu")
    load_distributed_checkpoint(model, load)
    tensors = to_hf(model_tensors(model), Shapes.of(fields))
    fields["torch_dtype"] = _dtype_name(tensors)
    notes = []
    with staged_directory(output, overwrite, "--output") as staging:
        save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
        generation = {
            key: fields[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in fields
        }
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for name in MODELING_FILES:
            shutil.copyfile(HERE / name, staging / name)
        note = export_tokenizer(args, tokenizer, staging, fields["max_position_embeddings"])
        notes += [note] if note else []
    return Converted(output, fields, pretrain_flags(fields), notes)


# ---------------------------------------------------------------------------- import


def read_weights(directory: Path) -> dict[str, Tensor]:
    """The tensors of ``model.safetensors`` (or of the shards its index lists); no code runs."""
    from safetensors.torch import load_file

    index = directory / WEIGHTS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / WEIGHTS).is_file():
        shards = [WEIGHTS]
    else:
        raise ConversionError(f"{directory} holds neither {WEIGHTS} nor {WEIGHTS_INDEX}.")
    tensors: dict[str, Tensor] = {}
    for shard in shards:
        tensors.update(load_file(str(directory / Path(shard).name)))
    return tensors


def read_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face directory (a clear error when absent or not JSON)."""
    path = directory / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path}: cannot read a JSON config ({error}).") from None


def _load_into(model: torch.nn.Module, state: Mapping[str, Tensor], source: Path) -> None:
    """Copy every tensor into ``model``; every parameter must be given, with its shape."""
    expected = model_tensors(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(name for name in set(state) & set(expected) if state[name].shape != expected[name].shape)
    problems = {"missing": missing, "not in the model": unexpected, "of another shape": wrong}
    listed = [f"{what}: {', '.join(names[:4])}" for what, names in problems.items() if names]
    if listed:
        raise ConversionError(
            f"{source}: the tensors do not fit the model config.json describes ({'; '.join(listed)})."
        )
    with torch.no_grad():
        for name, tensor in model_tensors(model).items():
            tensor.copy_(state[name])


def import_directory(source: Path, save: Path, overwrite: bool = False) -> Converted:
    """Read a Hugging Face directory written by :func:`export_checkpoint` (or one in its convention)
    into a checkpoint at ``save``: iteration 0, the weights without optimizer state, which
    ``attnres-pretrain --load SAVE --no-load-optim`` trains on from."""
    from attnres_megatron.training.arguments import parse_args, validate_args
    from attnres_megatron.training.checkpointing import new_run_id, save_checkpoint
    from attnres_megatron.training.model_setup import config_from_args, setup_training

    check_output(save, overwrite, "--save")  # before any work
    config = read_config(source)
    tensors = read_weights(source)
    bf16 = ["--bf16"] if tensors and all(t.dtype == torch.bfloat16 for t in tensors.values()) else []
    flags = [*pretrain_flags(config), *tokenizer_flags(source, config), *bf16]
    try:
        state = to_megatron(tensors, Shapes.of(config))
    except MappingError as error:
        raise ConversionError(f"{source / WEIGHTS}: {error}") from None
    args = parse_args(flags)
    validate_args(args, world_size=1)  # and derive what the flags leave open (the global batch)
    args.padded_vocab_size = int(required(config, "vocab_size"))
    from attnres_megatron.training.distributed import start_single_process

    start_single_process("cpu", args.seed)
    megatron_config = config_from_args(args, "cpu")
    setup = setup_training(args, megatron_config, args.padded_vocab_size, "cpu")
    _load_into(setup.unwrapped()[0], state, source)
    setup.optimizer.reload_model_params()  # bf16: the optimizer's fp32 copies start from these weights
    with staged_directory(save, overwrite, "--save") as staging:
        save_checkpoint(setup, 0, str(staging), {"consumed_samples": 0}, args, new_run_id())
    return Converted(save, config, flags)

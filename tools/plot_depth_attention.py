"""Plot which earlier representations each AttnRes sublayer attends to (a depth heatmap).

Runs one forward pass on a batch of the built-in corpus (Python standard-library sources,
tokenized with the run's tokenizer; the model's vocabulary is the one saved with the run's
arguments) with a :class:`~attnres_megatron.diagnostics.DepthAttentionRecorder` attached,
prints the mean softmax weight of every source at every sublayer, and writes a PNG.

Inputs (one of):

* ``--load DIR``: a checkpoint directory written by ``attnres-pretrain --save DIR``
  (Megatron-Core ``dist_checkpointing``, any TP/PP layout). The latest iteration named by
  ``DIR/latest_checkpointed_iteration.txt`` is read; the model is rebuilt from the run's
  arguments stored in the checkpoint (made single-process and fp32) and its weights are
  loaded through Megatron's sharded state dict, resharded to one process. Its files are first
  checked against the checkpoint's sha256 manifest (``--no-verify-checkpoint`` skips that), and
  every pickle in it is read with ``attnres_megatron.training.safe_unpickle``'s allowlist.

* ``--checkpoint DIR``: the plugin's "plain" export, a directory holding

  - ``model_state.pt``: ``torch.save(model.state_dict(), ...)`` of the whole, unsplit model
    (TP = PP = 1; keys such as ``decoder.layers.0.attn_res_attention.pseudo_query``; a
    ``module.`` prefix from DDP wrappers and a ``{"model": state_dict}`` wrapper are accepted);
  - ``args.json``: the ``attnres-pretrain`` arguments as a JSON object
    (``vars(args)``; keys with underscores, e.g. ``"num_layers": 4``); missing keys take
    ``attnres-pretrain``'s defaults. Parallel sizes are reset to 1 and bf16 to fp32.

  ``--save-export DIR`` writes this format for the model the tool built or loaded.

* ``--random-init-demo``: a tiny AttnRes GPT (Block AttnRes, S=2 by default) with its own
  initialisation. Pseudo-queries start at zero, so every weight is ``1/n`` (uniform over
  sources); ``--query-std`` draws them from N(0, std^2) for a non-uniform picture.

Examples::

    python tools/plot_depth_attention.py --load checkpoints/run1 --output depth_attention.png
    python tools/plot_depth_attention.py --random-init-demo --output depth_attention.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from attnres_megatron.diagnostics.depth import (  # noqa: E402
    DepthAttentionRecorder,
    depth_partial_mask,
    depth_weight_matrix,
    format_matrix,
    render_heatmap,
)
from attnres_megatron.training.distributed import start_single_process  # noqa: E402
from attnres_megatron.training.saved_run import (  # noqa: E402
    build_saved_model,
    checkpoint_args,
    load_distributed_checkpoint,
    model_args,
    run_tokenizer,
)


def demo_args(cli: argparse.Namespace) -> argparse.Namespace:
    """Arguments of the tiny demo model."""
    return model_args(
        dict(
            model="gpt",
            num_layers=cli.num_layers,
            hidden_size=cli.hidden_size,
            num_attention_heads=4,
            ffn_hidden_size=2 * cli.hidden_size,
            attention_residuals=cli.attention_residuals,
            attn_res_block_size=cli.attn_res_block_size if cli.attention_residuals == "block" else None,
            seq_length=cli.seq_length or 64,
            transformer_impl="local",
            seed=cli.seed,
        )
    )


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The whole model for ``args`` on the CPU (an error for a model without depth weights)."""
    model = build_saved_model(args, "cpu")
    if not model.config.attn_res_enabled:
        raise SystemExit(
            "error: the model has attention_residuals='none': there are no depth weights to plot."
        )
    return model


def load_plain_export(model: torch.nn.Module, directory: Path) -> None:
    """Load ``directory/model_state.pt`` (see the module docstring) into ``model``."""
    from attnres_megatron.training.safe_unpickle import RefusedPickleError, restricted_torch_load

    try:
        state = restricted_torch_load(directory / "model_state.pt")
    except RefusedPickleError as error:
        raise SystemExit(f"error: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    state = {key.removeprefix("module.").removeprefix("module."): value for key, value in state.items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise SystemExit(
            f"error: {directory / 'model_state.pt'} does not match the model of args.json: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
        )


def save_plain_export(model: torch.nn.Module, args: argparse.Namespace, directory: Path) -> None:
    """Write ``model_state.pt`` and ``args.json`` (the plain export) to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    torch.save(state, directory / "model_state.pt")
    saved = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    (directory / "args.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def corpus_tokens(max_bytes: int, tokenizer: Any = None) -> torch.Tensor:
    """The built-in corpus as token ids: its bytes, or each file's text tokenized by ``tokenizer``."""
    from attnres_megatron.training.corpus import load_stdlib_corpus

    tokens = load_stdlib_corpus(max_bytes=max_bytes)
    if tokenizer is None or tokenizer.is_byte_level:
        return tokens
    ids: list[int] = []
    for document in bytes(tokens.to(torch.uint8).tolist()).split(b"\0"):
        ids += tokenizer.tokenize(document.decode("utf-8", errors="replace")) + [tokenizer.eod]
    return torch.tensor(ids, dtype=torch.long)


def record_forward(
    model: torch.nn.Module, seq_length: int, batch_size: int, seed: int, tokenizer: Any = None
) -> dict[str, dict[str, Any]]:
    """One eval-mode forward on a corpus batch (bytes, or ``tokenizer``'s ids); the recorder's snapshot."""
    from attnres_megatron.training.corpus import TokenWindows

    tokens = corpus_tokens(max(1 << 20, 4 * (seq_length + 1) * batch_size), tokenizer)
    ids, _ = TokenWindows(tokens, seq_length, seed).batch(batch_size)
    positions = torch.arange(seq_length).unsqueeze(0).expand_as(ids)
    model.eval()
    with torch.no_grad(), DepthAttentionRecorder(model) as recorder:
        model(ids, positions, None)
    return recorder.snapshot()


def parse_cli(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--load", type=Path, help="checkpoint directory written by attnres-pretrain --save (latest iteration)"
    )
    source.add_argument("--checkpoint", type=Path, help="directory with model_state.pt and args.json")
    source.add_argument("--random-init-demo", action="store_true", help="a tiny randomly initialised model")
    parser.add_argument("--output", type=Path, default=Path("depth_attention.png"), help="PNG to write")
    parser.add_argument("--snapshot-json", type=Path, help="also write the recorder snapshot as JSON")
    parser.add_argument(
        "--no-verify-checkpoint",
        action="store_true",
        help="with --load: skip checking the files against the checkpoint's sha256 manifest",
    )
    parser.add_argument(
        "--seq-length", type=int, default=None, help="tokens per sample (default: the saved run's, or 64)"
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--title", default=None)
    demo = parser.add_argument_group("demo model (--random-init-demo)")
    demo.add_argument("--num-layers", type=int, default=4)
    demo.add_argument("--hidden-size", type=int, default=64)
    demo.add_argument("--attention-residuals", choices=("block", "full"), default="block")
    demo.add_argument("--attn-res-block-size", type=int, default=2)
    demo.add_argument("--query-std", type=float, default=0.0, help="draw pseudo-queries from N(0, std^2)")
    parser.add_argument("--save-export", type=Path, help="also write the model as a plain export here")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: build or load the model, record one forward, print and plot."""
    cli = parse_cli(argv)
    if cli.load is not None:
        args, iteration = checkpoint_args(cli.load, verify=not cli.no_verify_checkpoint)
        label = f"{cli.load}, iteration {iteration}"
    elif cli.checkpoint is not None:
        args_path = cli.checkpoint / "args.json"
        if not (cli.checkpoint / "model_state.pt").is_file() or not args_path.is_file():
            raise SystemExit(f"error: {cli.checkpoint} needs model_state.pt and args.json (see --help).")
        args = model_args(json.loads(args_path.read_text()))
        label = str(cli.checkpoint)
    else:
        args = demo_args(cli)
        label = "random init" + (f", query std {cli.query_std:g}" if cli.query_std > 0 else "")
    if cli.seq_length:
        args.seq_length = cli.seq_length
    start_single_process("cpu", cli.seed)
    model = build_model(args)
    if cli.load is not None:
        load_distributed_checkpoint(model, cli.load)
    elif cli.checkpoint is not None:
        load_plain_export(model, cli.checkpoint)
    elif cli.query_std > 0:
        generator = torch.Generator().manual_seed(cli.seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("pseudo_query"):
                    param.copy_(torch.randn(param.shape, generator=generator) * cli.query_std)
    if cli.save_export is not None:
        save_plain_export(model, args, cli.save_export)
    snapshot = record_forward(model, args.seq_length, cli.batch_size, cli.seed, run_tokenizer(args))
    matrix, rows, cols = depth_weight_matrix(snapshot)
    print(format_matrix(matrix, rows, cols))
    title = cli.title or f"AttnRes depth attention ({label}, {args.attention_residuals})"
    render_heatmap(
        matrix, rows, cols, path=str(cli.output), title=title, partial=depth_partial_mask(snapshot)
    )
    if cli.snapshot_json is not None:
        cli.snapshot_json.write_text(json.dumps(snapshot, indent=2) + "\n")
    print(f"wrote {cli.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

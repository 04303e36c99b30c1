"""Convert between attnres-pretrain checkpoints and Hugging Face directories.

``export`` writes the latest checkpoint under ``--load`` (any TP/PP layout it was saved in) as a
Hugging Face directory: ``model.safetensors``, ``config.json`` (Attention Residuals as
``attn_res_block_size`` in transformer layers; Full AttnRes as ``attn_res_full``), the run's
tokenizer, ``generation_config.json`` and the modeling files that
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` runs. ``import`` reads such a
directory into a checkpoint that ``attnres-pretrain --load`` reads (iteration 0, fresh optimizer)
and prints the flags that build its model. Nothing read runs code: checkpoint pickles go through
the allowlist, weights are safetensors. An output directory that is not empty is refused unless
``--overwrite`` is given.

Examples::

    python tools/convert_hf.py export --load runs/tiny/checkpoints --output runs/tiny/hf
    python tools/convert_hf.py import --input runs/tiny/hf --save runs/tiny/imported
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from attnres_megatron.training.quiet import quiet_start  # noqa: E402


def parse_cli(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The ``export`` and ``import`` subcommands and their options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="attnres-pretrain checkpoint -> Hugging Face directory")
    export.add_argument(
        "--load", type=Path, required=True, help="directory written by attnres-pretrain --save"
    )
    export.add_argument("--output", type=Path, required=True, help="Hugging Face directory to write")
    export.add_argument(
        "--no-verify-checkpoint", action="store_true", help="skip checking the files' sha256 manifest"
    )
    imported = commands.add_parser("import", help="Hugging Face directory -> attnres-pretrain checkpoint")
    imported.add_argument("--input", type=Path, required=True, help="Hugging Face directory (an export)")
    imported.add_argument("--save", type=Path, required=True, help="checkpoint directory to write")
    for sub in (export, imported):
        sub.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    return parser.parse_args(argv)


def describe_attn_res(config: dict) -> str:
    """``none``, ``full`` or ``block, K layer(s) per block`` of a Hugging Face config."""
    layers = config.get("attn_res_block_size")
    if config.get("attn_res_full"):
        return "full (every sublayer a block)"
    if layers is None:
        return "none"
    return f"block, {layers} layer{'s' if layers > 1 else ''} per block"


def main(argv: Optional[list[str]] = None) -> int:
    """Run the subcommand; errors end with ``error: ...`` and exit status 1."""
    quiet_start(argv)
    cli = parse_cli(argv)
    from attnres_megatron.hf.convert import export_checkpoint, import_directory
    from attnres_megatron.hf.settings import ConversionError

    try:
        if cli.command == "export":
            done = export_checkpoint(cli.load, cli.output, cli.overwrite, verify=not cli.no_verify_checkpoint)
        else:
            done = import_directory(cli.input, cli.save, cli.overwrite)
    except ConversionError as error:
        raise SystemExit(f"error: {error}") from None
    for note in done.notes:
        print(note, file=sys.stderr)
    print(f"> wrote {done.directory} (attention residuals: {describe_attn_res(done.config)})")
    if cli.command == "import":
        flags = shlex.join(["--load", str(done.directory), "--no-load-optim", *done.flags])
        print(f"> train on with: attnres-pretrain {flags}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m engine.export`: a checkpoint to a Hugging Face folder, and such a folder back.

    python -m engine.export export <checkpoint_dir> --out <folder> [--step N] [--dtype bfloat16]
                                                    [--zip <file.zip>]
    python -m engine.export import <folder> --out <checkpoint_dir> [--step N]

The export loads with `transformers` (see the folder's README.md); the import writes an
ordinary checkpoint directory (model, meta, tokenizer/) that the engine, chat and training
read. The web app offers the same export as a zip on the checkpoints page and at
`GET /api/checkpoints/<id>/export/`, and `manage.py import_checkpoint` imports into the data
home and registers the checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.hf_export import DTYPES, ExportError, export_checkpoint, zip_chunks
from engine.hf_import import import_folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.export", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    out = commands.add_parser("export", help="write a checkpoint as a Hugging Face folder")
    out.add_argument("checkpoint_dir", type=Path, help="the checkpoint directory (all steps)")
    out.add_argument("--out", type=Path, required=True, help="new folder to write")
    out.add_argument("--step", type=int, default=None, help="step to export (default: latest)")
    out.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="convert the weights (default: as saved)")  # fmt: skip
    out.add_argument("--zip", type=Path, default=None, help="also write the folder as this zip")
    back = commands.add_parser("import", help="write an exported folder as a checkpoint")
    back.add_argument("folder", type=Path, help="a folder written by `export`")
    back.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    back.add_argument("--step", type=int, default=None,
                      help="step to save as (default: the step it was exported from)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "export":
            files = export_checkpoint(args.checkpoint_dir, args.out, step=args.step,
                                      dtype=args.dtype)  # fmt: skip
            print(f"exported {len(files)} files to {args.out}")
            if args.zip is not None:
                with args.zip.open("xb") as handle:
                    for chunk in zip_chunks(args.out, args.out.name):
                        handle.write(chunk)
                print(f"zipped to {args.zip}")
        else:
            result = import_folder(args.folder, args.out, step=args.step)
            tokenizer = "with its tokenizer" if result.has_tokenizer else "without a tokenizer"
            print(f"imported step {result.step} into {result.checkpoint_dir} ({tokenizer})")
    except (ExportError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

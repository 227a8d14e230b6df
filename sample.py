"""Generate images from a trained (or converted) latentdiff model.

    python sample.py --workdir workdirs/ldm_tiny --prompt "a red circle at the top left" --n 4
    python sample.py --workdir WORKDIR --prompt_file prompts.txt --sampler dpmpp2m --steps 20 --guidance 5

See `python sample.py --help`.
"""

import sys

import latentdiff  # noqa: F401  (applies the CPU XLA flags before JAX starts)
from latentdiff import errors
from latentdiff.sample_cli import parse_args, run

if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    errors.run_cli(lambda: run(arguments))

"""Generate images from a trained (or converted) latentdiff model.

    python sample.py --workdir workdirs/ldm_tiny --prompt "a red circle at the top left" --n 4
    python sample.py --workdir WORKDIR --prompt_file prompts.txt --sampler dpmpp2m --steps 20 --guidance 5
    python sample.py --workdir WORKDIR --init_image in.png --strength 0.6 --prompt "a blue circle"       (img2img)
    python sample.py --workdir WORKDIR --init_image in.png --mask mask.png --prompt "a green square"   (inpainting)
    python sample.py --workdir SR_WORKDIR --low_res small.png                               (super-resolution)

The same as `latentdiff sample` (latentdiff/sample_cli.py); see `python sample.py --help`.
"""

from latentdiff import cli

if __name__ == "__main__":
    cli.run_as("sample")

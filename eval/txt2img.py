"""The paper's text-to-image table protocol: FID / IS of a stage-2 model on captions of a reference split.

The same as `latentdiff eval txt2img` (latentdiff/evaluation/txt2img.py); see `python eval/txt2img.py --help`.
"""

from latentdiff import cli

if __name__ == "__main__":
    cli.run_as("eval txt2img")

"""Text alignment on the shapes dataset: generate from held-out captions, grade the images analytically.

The same as `latentdiff eval alignment` (latentdiff/evaluation/alignment.py); see `python eval/alignment.py --help`.
"""

from latentdiff import cli

if __name__ == "__main__":
    cli.run_as("eval alignment")

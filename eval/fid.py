"""FID (and Inception Score) between generated images and a reference.

The same as `latentdiff eval fid` (latentdiff/evaluation/fid.py); see `python eval/fid.py --help`.
"""

from latentdiff import cli

if __name__ == "__main__":
    cli.run_as("eval fid")

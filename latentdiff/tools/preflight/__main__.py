"""`python -m latentdiff.tools.preflight` = `latentdiff preflight`."""

import sys

from latentdiff.tools.preflight.cli import main

main(sys.argv[1:])

"""Time to first image, cold and warm compilation cache: a command run twice against one fresh cache directory.

    python bench/first_image.py --runs 2 -- python sample.py --workdir demo --prompt "a red circle" --n 1 --out /tmp/s
    python bench/first_image.py --runs 2 -- python -m latentdiff.demo run --demo_dir demo --out /tmp/demo_out

Run 1 starts with an empty LATENTDIFF_COMPILE_CACHE (cold: everything compiles and is stored); later runs read it
(warm). A run with LATENTDIFF_COMPILE_CACHE=off is timed too, to show the cache costs nothing when cold. Prints one
JSON line per run and the warm/cold ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def timed(command: list[str], cache: str) -> float:
    env = dict(os.environ, LATENTDIFF_COMPILE_CACHE=cache)
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="runs with the cache (the first one cold)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to time")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    off = timed(command, "off")
    print(json.dumps({"cache": "off", "seconds": round(off, 1)}), flush=True)
    with tempfile.TemporaryDirectory(prefix="first-image-cache-") as cache:
        seconds = []
        for run in range(args.runs):
            seconds.append(timed(command, cache))
            print(json.dumps({"cache": "cold" if run == 0 else "warm", "seconds": round(seconds[-1], 1)}), flush=True)
    warm = min(seconds[1:]) if len(seconds) > 1 else float("nan")
    print(f"warm / cold = {warm / seconds[0]:.2f}; cold with cache / off = {seconds[0] / off:.2f}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Roofline: the best float32 rates single ops reach on this CPU, and what each speed target of issue #10 would need.

    python bench/roofline.py
    python bench/roofline.py --train-json /tmp/train_small.json,/tmp/train_tiny.json --sample-json /tmp/sample.json

Part 1 (always): each library's rate on large single ops, in its own worker with the benchmarks' thread settings —
XLA (jnp.dot, lax.conv_general_dilated NHWC, through latentdiff's CPU flags) and PyTorch (matmul, conv2d NCHW and
channels-last, i.e. oneDNN). The largest of them is the "best single-op rate": no whole train step or sampler, which
also runs norms, softmax, element-wise ops and copies, can sustain more.
Part 2 (with --train-json / --sample-json, the --json files of bench/train_step.py and bench/sample.py): for every
stage, the peer's achieved GFLOP/s (the same XLA-counted FLOPs credited to both, as those scripts report) times the
target ratio is the rate our whole step would need; shown next to our achieved rate and as a fraction of the best
single-op rate. A fraction >= 1 means the target cannot be met with the same FLOPs in float32 on this machine.
XLA counts the backward of a stride-2 convolution as the lhs-dilated convolution it emits (zeros included), which
inflates stage 1's FLOPs by a few percent (~4% for the tiny autoencoder); the rates are upper estimates by that much.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys

import harness

# (batch, height, width, in channels, out channels) of 3x3 stride-1 convolutions: the UNet's and the autoencoder's.
CONV_SHAPES = ((8, 32, 32, 256, 256), (16, 64, 64, 64, 64), (8, 8, 8, 384, 384))
DOT_SIZE = 2048
TARGETS = {"train": 1.3, "sample": 1.5}  # issue #10: train step ≥ 1.3× PyTorch eager, sampling ≥ 1.5× diffusers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=9, help="timed calls per op (median reported)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch (XLA uses all cores)")
    p.add_argument("--train-json", default="", help="comma list of bench/train_step.py --json files")
    p.add_argument("--sample-json", default="", help="comma list of bench/sample.py --json files")
    p.add_argument("--results", default=harness.RESULTS, help="RESULTS.md to append to ('' = do not write)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs < 3:
        p.error("--runs must be >= 3")
    return args


def conv_flops(b: int, h: int, w: int, c: int, k: int) -> float:
    return 2.0 * b * h * w * c * k * 9


def xla_rates(runs: int) -> dict[str, float]:
    """GFLOP/s of jnp.dot n×n×n and of each CONV_SHAPES convolution through XLA (median of `runs`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import latentdiff  # noqa: F401  (CPU XLA flags)

    def rate(fn, flops: float, *arrays) -> float:
        f = jax.jit(fn)
        times = harness.time_runs(lambda: f(*arrays).block_until_ready(), runs, warmup=2)
        return flops / statistics.median(times) / 1e9

    rng = np.random.default_rng(0)
    out = {f"dot {DOT_SIZE}³": harness.matmul_peak_gflops(DOT_SIZE, runs)}
    for bsz, h, w, c, k in CONV_SHAPES:
        x = jnp.asarray(rng.standard_normal((bsz, h, w, c)), jnp.float32)
        kern = jnp.asarray(rng.standard_normal((3, 3, c, k)), jnp.float32)
        out[f"conv3x3 {bsz}×{h}×{w}×{c}→{k}"] = rate(harness.conv3x3, conv_flops(bsz, h, w, c, k), x, kern)
    return out


def torch_rates(runs: int, threads: int) -> dict[str, float]:
    """GFLOP/s of torch matmul and conv2d (NCHW and channels-last) on the same problems."""
    import torch

    harness.torch_setup(threads, "cpu")
    torch.manual_seed(0)

    def rate(fn, flops: float) -> float:
        with torch.no_grad():
            times = harness.time_runs(fn, runs, warmup=2)
        return flops / statistics.median(times) / 1e9

    n = DOT_SIZE
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = {f"dot {n}³": rate(lambda: a @ b, 2.0 * n**3)}
    for bsz, h, w, c, k in CONV_SHAPES:
        kern = torch.randn(k, c, 3, 3)
        for fmt, memory_format in (("", torch.contiguous_format), (" channels-last", torch.channels_last)):
            x = torch.randn(bsz, c, h, w).contiguous(memory_format=memory_format)
            kf = kern.contiguous(memory_format=memory_format)
            name = f"conv3x3 {bsz}×{h}×{w}×{c}→{k}" + fmt
            conv = lambda x=x, kf=kf: torch.nn.functional.conv2d(x, kf, padding=1)
            out[name] = rate(conv, conv_flops(bsz, h, w, c, k))
    return out


def size_of(header: str) -> str:
    match = re.search(r"--size (\w+)", header)
    return match.group(1) if match else "?"


def load_results(path: str, script: str) -> dict:
    """A --json file of bench/{script}; exits with a one-line error when it is missing or not one."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise SystemExit(
            f"roofline: cannot read {path!r} ({err}); pass a file written by bench/{script} --json"
        ) from None
    if not isinstance(data, dict) or "rows" not in data or "header" not in data:
        raise SystemExit(f"roofline: {path!r} is not a bench/{script} --json file (no 'rows' / 'header')")
    return data


def train_rows(paths: list[str], best: float) -> list[dict]:
    """Feasibility rows of bench/train_step.py JSON files: one per (stage, peer framework)."""
    rows = []
    for path in paths:
        data = load_results(path, "train_step.py")
        size = size_of(data["header"])
        by_stage: dict[str, dict[str, dict]] = {}
        for r in data["rows"]:
            by_stage.setdefault(r["stage"], {})[r["framework"]] = r
        for stage, fws in by_stage.items():
            ours = fws.get("ours", {})
            for fw, r in fws.items():
                if fw != "ours" and r.get("gflops"):
                    rows.append(feasibility(f"train {size} {stage} vs {fw}", "train", r["gflops"], ours, best))
    return rows


def sample_rows(paths: list[str], best: float) -> list[dict]:
    """Feasibility rows of bench/sample.py JSON files: one per peer framework."""
    rows = []
    for path in paths:
        data = load_results(path, "sample.py")
        fws = {r["framework"]: r for r in data["rows"]}
        ours, size = fws.get("ours", {}), size_of(data["header"])
        for fw, r in fws.items():
            if fw != "ours" and r.get("gflops"):
                rows.append(feasibility(f"sample {size} vs {fw}", "sample", r["gflops"], ours, best))
    return rows


def feasibility(what: str, kind: str, peer_gflops: float, ours: dict, best: float) -> dict:
    target = TARGETS[kind]
    needed = target * peer_gflops
    return {
        "what": what,
        "peer": peer_gflops,
        "ours": ours.get("gflops"),
        "ratio": ours["gflops"] / peer_gflops if ours.get("gflops") else None,
        "target": target,
        "needed": needed,
        "of_best": needed / best,
    }


SINGLE_OP_COLUMNS = [("op", "op (float32)"), ("xla", "XLA GFLOP/s"), ("torch", "PyTorch GFLOP/s")]
FEASIBILITY_COLUMNS = [
    ("what", "step"),
    ("peer", "peer GFLOP/s"),
    ("ours", "ours GFLOP/s"),
    ("ratio", "ours faster ×"),
    ("target", "target ×"),
    ("needed", "needed GFLOP/s"),
    ("of_best", "needed / best single-op rate"),
]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        rates = xla_rates(args.runs) if args.worker == "xla" else torch_rates(args.runs, args.threads)
        harness.emit({"rates": rates, "load_before": harness.load_average()})
        return
    header = harness.run_header(sys.argv, "cpu")
    env = harness.limit_threads(args.threads)
    worker = ["--runs", str(args.runs), "--threads", str(args.threads)]
    results = {lib: harness.run_worker(__file__, [lib, *worker], env) for lib in ("xla", "torch")}
    for lib, res in results.items():
        if "error" in res:
            raise SystemExit(f"roofline: the {lib} worker failed: {res['error']}")
    xla, torch_ = results["xla"]["rates"], results["torch"]["rates"]
    ops = list(dict.fromkeys([*xla, *torch_]))
    op_rows = [{"op": op, "xla": xla.get(op), "torch": torch_.get(op)} for op in ops]
    best = max([*xla.values(), *torch_.values()])
    body = harness.table(op_rows, SINGLE_OP_COLUMNS)
    body += f"\n\nBest single-op rate: {best:.0f} GFLOP/s. Torch threads: {args.threads}; load avg at the workers' "
    body += f"start {results['xla']['load_before']} / {results['torch']['load_before']}."
    train_paths, sample_paths = ([p for p in s.split(",") if p] for s in (args.train_json, args.sample_json))
    feas = train_rows(train_paths, best) + sample_rows(sample_paths, best)
    if feas:
        body += "\n\n" + harness.table(feas, FEASIBILITY_COLUMNS)
        body += (
            "\n\nneeded = target × the peer's GFLOP/s (our XLA-counted FLOPs per step or batch, credited to both) — "
            "the whole-step rate ours would need; inputs: "
            + ", ".join(f"`{p}`" for p in train_paths + sample_paths)
            + "."
        )
    print(body)
    if args.results:
        harness.append_section("bench/roofline.py", f"{header}\n\n{body}", args.results)


if __name__ == "__main__":
    main()

"""A/B of our train step with XLA's convolutions vs oneDNN's (onednn_conv.py), alternating workers.

    bash bench/experiments/onednn_conv/build.sh
    python bench/experiments/onednn_conv/ab.py --size tiny --stage ae_rec,ae_gan --runs 7 --rounds 2
    python bench/experiments/onednn_conv/ab.py --speed      # single convolutions: fwd and fwd+bwd, xla vs onednn
    python bench/experiments/onednn_conv/ab.py --size small --stage sample --runs 5 --rounds 2
                                                            # sampling (bench/sample.py's worker: DDIM 50, batch 8)

First checks oneDNN against lax.conv_general_dilated (forward, input and kernel gradients; stride 1 and 2, asymmetric
padding) and stops if they differ. Then, per stage, runs bench/train_step.py's `ours` worker --rounds times with and
without oneDNN (OMP_WAIT_POLICY=PASSIVE, OMP_NUM_THREADS = --threads: with OpenMP's default spin-waiting, oneDNN's
threads starved XLA's own and a tiny ae_gan step took minutes), and reports median step times.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

VARIANTS = {"xla": {}, "onednn": {"ONEDNN_CONV": "1"}}
CHECK_CASES = (  # x shape, kernel shape, strides, padding
    ((2, 9, 7, 5), (3, 3, 5, 6), (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 8, 5), (3, 3, 5, 6), (2, 2), ((0, 1), (0, 1))),
    ((2, 10, 10, 3), (4, 4, 3, 8), (2, 2), ((1, 1), (1, 1))),
    ((2, 8, 8, 4), (1, 1, 4, 7), (1, 1), ((0, 0), (0, 0))),
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", help="tiny | small")
    p.add_argument("--stage", default="ae_rec", help="comma list of ldm, ae_rec, ae_gan, sample")
    p.add_argument("--runs", type=int, default=7, help="timed steps per worker")
    p.add_argument("--rounds", type=int, default=2, help="workers per variant, alternating")
    p.add_argument("--threads", type=int, default=2, help="OpenMP threads for oneDNN")
    p.add_argument("--results", default=common.RESULTS, help="RESULTS.md to append to ('' = do not write)")
    return p.parse_args(argv)


def check() -> None:
    """Max relative error of oneDNN vs lax for output, dx and dw; raises if any exceeds 1e-5."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import onednn_conv

    import latentdiff  # noqa: F401  (its CPU flags, as in the train step)

    rng = np.random.default_rng(0)
    for x_shape, w_shape, strides, padding in CHECK_CASES:
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
        dims = ("NHWC", "HWIO", "NHWC")
        reference = functools.partial(
            jax.lax.conv_general_dilated, window_strides=strides, padding=padding, dimension_numbers=dims
        )
        y_ref, vjp_ref = jax.vjp(reference, x, w)
        ours = functools.partial(onednn_conv.conv, strides=strides, padding=padding)
        y_new, vjp_new = jax.vjp(ours, x, w)
        grad = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)
        pairs = [(y_ref, y_new), *zip(vjp_ref(grad), vjp_new(grad))]
        errors = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in pairs]
        shown = " ".join(f"{e:.1e}" for e in errors)
        print(f"check {x_shape} * {w_shape} strides {strides} padding {padding}: rel. error y/dx/dw {shown}")
        if max(errors) > 1e-5:
            raise SystemExit("oneDNN convolution differs from lax.conv_general_dilated")


SPEED_SHAPES = (  # B, H, W, C, K of 3x3 stride-1 convolutions in the autoencoder and the small UNet
    (16, 64, 64, 32, 32),
    (16, 32, 32, 64, 64),
    (4, 128, 128, 64, 64),
    (4, 64, 64, 128, 128),
    (8, 16, 16, 192, 192),
    (8, 8, 8, 384, 384),
    (16, 64, 64, 32, 3),
)


def speed(runs: int) -> str:
    """Per-convolution forward and forward+backward (dx and dw) times, lax vs oneDNN, as a markdown table."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import onednn_conv

    import latentdiff  # noqa: F401  (before JAX starts: its CPU flags, Eigen convolutions, as in the train step)

    pad = ((1, 1), (1, 1))
    impls = {
        "xla": functools.partial(
            jax.lax.conv_general_dilated, window_strides=(1, 1), padding=pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
        ),
        "onednn": functools.partial(onednn_conv.conv, strides=(1, 1), padding=pad),
    }
    rng = np.random.default_rng(0)
    rows = []
    for b, h, w, c, k in SPEED_SHAPES:
        x = jnp.asarray(rng.standard_normal((b, h, w, c)), jnp.float32)
        kernel = jnp.asarray(rng.standard_normal((3, 3, c, k)), jnp.float32)
        row = {"shape": f"{b}×{h}×{w}×{c}→{k}"}
        for name, impl in impls.items():
            forward = jax.jit(impl)
            both = jax.jit(jax.grad(lambda x, kernel, impl=impl: jnp.sum(impl(x, kernel) ** 2), argnums=(0, 1)))
            row[name + "_f"] = 1e3 * statistics.median(
                common.time_runs(lambda f=forward, a=(x, kernel): f(*a).block_until_ready(), runs, warmup=2)
            )
            row[name + "_fb"] = 1e3 * statistics.median(
                common.time_runs(lambda f=both, a=(x, kernel): jax.block_until_ready(f(*a)), runs, warmup=2)
            )
        row["gain"] = row["xla_fb"] / row["onednn_fb"]
        rows.append(row)
    columns = [("shape", "conv 3x3 B×H×W×C→K")]
    columns += [(f"{n}_{p}", f"{n} {label} ms") for n in impls for p, label in (("f", "fwd"), ("fb", "fwd+bwd"))]
    return common.table(rows, [*columns, ("gain", "fwd+bwd xla / onednn")])


def main(argv: list[str]) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when libgomp loads (with the oneDNN library)
    if "--worker" in argv:  # a bench/train_step.py or bench/sample.py worker, with oneDNN installed when asked
        if os.environ.get("ONEDNN_CONV") == "1":
            import onednn_conv

            onednn_conv.install()
        # sample.py's worker (the only one taking --steps) or train_step.py's
        importlib.import_module("sample" if "--steps" in argv else "train_step").main(argv)
        return
    if argv[:1] == ["--check"]:
        check()
        return
    if argv[:1] == ["--speed"]:
        print(speed(runs=9))
        return
    args = parse_args(argv)
    header = common.run_header([os.path.abspath(__file__), *argv], "cpu")
    env = {**common.limit_threads(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    if subprocess.run([sys.executable, __file__, "--check"], env={**os.environ, **env}).returncode:
        raise SystemExit("ab.py: the oneDNN check failed (see above)")
    rows = []
    for stage in args.stage.split(","):
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        loads: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for variant, extra in VARIANTS.items():
                worker = ["--size", args.size, "--framework", "ours", "--runs", str(args.runs), "--device", "cpu"]
                worker += ["--threads", str(args.threads)]
                if stage == "sample":  # bench/sample.py's defaults: DDIM 50 steps, guidance 3, batch 8
                    worker += ["--steps", "50", "--batch", "8", "--guidance", "3.0"]
                else:
                    worker += ["--stage", stage, "--batch", "0"]
                res = common.run_worker(__file__, worker, {**env, **extra})
                if "error" in res:
                    raise SystemExit(f"[{stage} {variant}] {res['error']}")
                times[variant] += res["times"]
                loads[variant].append(res["load_before"])
                print(f"[{stage} {variant}] median {statistics.median(res['times']) * 1e3:.0f} ms", flush=True)
        base = statistics.median(times["xla"])
        for variant in VARIANTS:
            med = statistics.median(times[variant])
            rows.append(
                {
                    "stage": f"{args.size} {stage}",
                    "variant": variant,
                    "step_ms": med * 1e3,
                    "range": f"{min(times[variant]) * 1e3:.0f}–{max(times[variant]) * 1e3:.0f}",
                    "n": len(times[variant]),
                    "speedup": base / med,
                    "load": "/".join(f"{x:.1f}" for x in loads[variant]),
                }
            )
    columns = [
        ("stage", "stage"),
        ("variant", "convolutions"),
        ("step_ms", "step ms (median)"),
        ("range", "min–max ms"),
        ("n", "steps"),
        ("speedup", "vs xla ×"),
        ("load", "load avg"),
    ]
    body = common.table(rows, columns)
    body += f"\n\n{args.rounds} alternating workers per variant, {args.runs} steps each; OMP_WAIT_POLICY=PASSIVE."
    print(body)
    if args.results:
        section = "bench/experiments/onednn_conv (not used by latentdiff)"
        common.append_section(section, f"{header}\n\n{body}", args.results)


if __name__ == "__main__":
    main(sys.argv[1:])

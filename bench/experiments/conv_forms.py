"""Experiment: other forms of XLA:CPU's 3×3 convolutions, against lax.conv_general_dilated (not used by latentdiff).

    python bench/experiments/conv_forms.py winograd       # Winograd F(2,3) / F(4,3) vs lax: forward, both gradients
    python bench/experiments/conv_forms.py weight-grad    # the weight gradient as GEMMs of shifted slices / im2col
    python bench/train_step.py --size small --stage ae_rec --frameworks ours --runs 2 --results '' \
        --hlo-out /tmp/ae_rec.hlo.gz
    python bench/experiments/conv_forms.py hlo /tmp/ae_rec.hlo.gz   # every convolution of that step, timed alone

Question: can a different formulation, in plain JAX (no native build, unlike bench/experiments/onednn_conv), beat the
Eigen convolutions latentdiff's CPU flags select? And how much of a train step do the convolutions take? (The
profiler cannot say: on the CPU it does not see the work XLA hands to Eigen's thread pool.)
Shapes are NHWC / HWIO float32, stride 1, padding 1. Each mode prints a Markdown table and appends it to
bench/RESULTS.md (`--results ''` to skip). The Winograd and GEMM forms are checked against lax before they are timed.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common
import jax
import jax.numpy as jnp
import numpy as np

import latentdiff  # noqa: F401  (applies latentdiff's CPU XLA flags before a JAX backend starts)

SECTION = "bench/experiments/conv_forms.py (not used by latentdiff)"

# Winograd minimal filtering F(m, 3) (Lavin & Gray 2016): y = Aᵀ[(G w Gᵀ) ⊙ (Bᵀ d B)]A for an (m+2)² input tile d.
WINOGRAD = {
    "F(2,3)": dict(
        m=2,
        bt=[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        g=[[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        at=[[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    "F(4,3)": dict(
        m=4,
        bt=[
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        g=[
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        at=[[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}

# (B, H, W, Cin, Cout): the small autoencoder's levels (bench/common.ae_config) and its 64->3 output conv, then the
# small UNet's levels (16x16x4 latents, channels 96·(1,2,4), batch 8; bench/common.ldm_config).
SHAPES = [
    (4, 128, 128, 64, 64),
    (4, 64, 64, 128, 128),
    (4, 32, 32, 256, 256),
    (4, 16, 16, 256, 256),
    (4, 128, 128, 64, 3),
    (8, 16, 16, 96, 96),
    (8, 8, 8, 192, 192),
    (8, 4, 4, 384, 384),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("winograd", "weight-grad", "hlo"))
    p.add_argument("hlo_file", nargs="?", default="", help="hlo: an optimised HLO dump (train_step.py --hlo-out)")
    p.add_argument("--runs", type=int, default=7, help="timed calls per form (median reported)")
    p.add_argument("--top", type=int, default=25, help="hlo: rows of the table (largest total time first)")
    p.add_argument("--results", default=common.RESULTS, help="RESULTS.md to append to ('' = do not write)")
    args = p.parse_args(argv)
    if args.mode == "hlo" and not os.path.isfile(args.hlo_file):
        p.error(f"hlo mode needs an HLO dump: {args.hlo_file!r} is not a file (write one with train_step.py --hlo-out)")
    return args


def _combine(parts: list[jax.Array], coefficients: list[float]) -> jax.Array:
    """Σ c·part over the non-zero coefficients (the transforms are sparse small-integer matrices)."""
    terms = [p if c == 1 else -p if c == -1 else c * p for c, p in zip(coefficients, parts) if c != 0]
    return sum(terms[1:], terms[0])


def winograd_conv(x: jax.Array, w: jax.Array, name: str) -> jax.Array:
    """3×3 'same' convolution by Winograd `name`: input transform by strided slices, (m+2)² batched GEMMs over the
    tiles, output transform, tiles back to the image. [B,H,W,Ci] × [3,3,Ci,Co] -> [B,H,W,Co]."""
    spec = WINOGRAD[name]
    m, bt, at = spec["m"], spec["bt"], spec["at"]
    n = m + 2
    b, h, wd, ci = x.shape
    co = w.shape[-1]
    th, tw = -(-h // m), -(-wd // m)
    xp = jnp.pad(x, ((0, 0), (1, th * m + 1 - h), (1, tw * m + 1 - wd), (0, 0)))
    rows = [xp[:, k : k + m * th : m] for k in range(n)]  # n × [B, th, Wp, Ci]
    rows = [_combine(rows, bt[i]) for i in range(n)]
    tiles = []
    for i in range(n):
        cols = [rows[i][:, :, k : k + m * tw : m] for k in range(n)]  # n × [B, th, tw, Ci]
        tiles += [_combine(cols, bt[j]) for j in range(n)]
    v = jnp.stack(tiles).reshape(n * n, b * th * tw, ci)
    g = jnp.asarray(spec["g"], jnp.float32)
    u = jnp.einsum("ik,klcd,jl->ijcd", g, w, g).reshape(n * n, ci, co)
    prod = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,)))).reshape(n, n, b * th * tw, co)
    half = [_combine([prod[i] for i in range(n)], at[p]) for p in range(m)]  # m × [n, T, Co]
    y = jnp.stack([jnp.stack([_combine([hp[j] for j in range(n)], at[q]) for q in range(m)]) for hp in half])
    y = y.reshape(m, m, b, th, tw, co).transpose(2, 3, 0, 4, 1, 5).reshape(b, th * m, tw * m, co)
    return y[:, :h, :wd]


def weight_grad_lax(x: jax.Array, g: jax.Array) -> jax.Array:
    """XLA's own weight gradient of common.conv3x3. [B,H,W,Ci], [B,H,W,Co] -> [3,3,Ci,Co]."""
    w0 = jnp.zeros((3, 3, x.shape[-1], g.shape[-1]), x.dtype)
    return jax.grad(lambda w: jnp.sum(common.conv3x3(x, w) * g))(w0)


def weight_grad_taps(x: jax.Array, g: jax.Array) -> jax.Array:
    """Nine GEMMs, one per tap: x shifted by the tap, [B·H·W, Ci]ᵀ @ [B·H·W, Co]."""
    _, h, w, ci = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    g2 = g.reshape(-1, g.shape[-1])
    return jnp.stack(
        [jnp.stack([xp[:, i : i + h, j : j + w].reshape(-1, ci).T @ g2 for j in range(3)]) for i in range(3)]
    )


def weight_grad_im2col(x: jax.Array, g: jax.Array) -> jax.Array:
    """One GEMM: the [B·H·W, 9·Ci] patch matrix ᵀ @ [B·H·W, Co]."""
    _, h, w, ci = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=-1)
    return (patches.reshape(-1, 9 * ci).T @ g.reshape(-1, g.shape[-1])).reshape(3, 3, ci, g.shape[-1])


def median_ms(fn: Callable, *args: jax.Array, runs: int) -> float:
    """Median wall time of a jitted call in milliseconds (after one warm-up call)."""
    times = common.time_runs(lambda: jax.block_until_ready(fn(*args)), runs)
    return common.summary(times)["median"] * 1e3


def relative_error(a: jax.Array, ref: jax.Array) -> float:
    return float(jnp.max(jnp.abs(a - ref)) / jnp.max(jnp.abs(ref)))


def xla_gflop(fn: Callable, *args: jax.Array) -> float:
    """GFLOP of fn(*args) by XLA's cost analysis (a padded 3×3 convolution counts only the taps inside the image)."""
    return common.xla_flops(jax.jit(fn).lower(*args)) / 1e9


def random_operands(shape: tuple[int, ...], seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B,H,W,Ci], w [3,3,Ci,Co] (fan-in scaled), an output cotangent g [B,H,W,Co]."""
    b, h, w, ci, co = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, w, ci), np.float32)
    kernel = rng.standard_normal((3, 3, ci, co), np.float32) / np.sqrt(9 * ci)
    g = rng.standard_normal((b, h, w, co), np.float32)
    return jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(g)


def winograd_rows(runs: int) -> list[dict]:
    """Per shape: forward, and forward + both gradients (value_and_grad of <conv(x, w), g>, with g an argument so
    nothing folds into constants), of lax and each Winograd form, and their errors."""
    rows = []
    for k, shape in enumerate(SHAPES):
        x, w, g = random_operands(shape, k)
        ref = common.conv3x3(x, w)
        row = {"shape": "×".join(map(str, shape))}
        forms = {"lax": common.conv3x3, **{n: (lambda x, w, n=n: winograd_conv(x, w, n)) for n in WINOGRAD}}
        for name, conv in forms.items():
            fwd = jax.jit(conv)
            train = jax.jit(jax.value_and_grad(lambda x, w, g, conv=conv: jnp.sum(conv(x, w) * g), argnums=(0, 1)))
            if name != "lax":
                row[f"err {name}"] = relative_error(fwd(x, w), ref)
                if row[f"err {name}"] > 1e-3:
                    raise AssertionError(f"{name} at {shape}: relative error {row[f'err {name}']:.2e}")
            row[f"fwd {name}"] = median_ms(fwd, x, w, runs=runs)
            row[f"grad {name}"] = median_ms(train, x, w, g, runs=runs)
        row["lax fwd GF/s"] = xla_gflop(common.conv3x3, x, w) / row["fwd lax"] * 1e3
        rows.append(row)
        print(row, flush=True)
    return rows


def weight_grad_rows(runs: int) -> list[dict]:
    """Per shape: the weight gradient by XLA, by nine tap GEMMs and by one im2col GEMM; the input gradient by XLA."""
    rows = []
    for k, shape in enumerate(SHAPES):
        x, w, g = random_operands(shape, k)
        ref = jax.jit(weight_grad_lax)(x, g)
        row = {"shape": "×".join(map(str, shape))}
        for name, fn in (("xla", weight_grad_lax), ("taps", weight_grad_taps), ("im2col", weight_grad_im2col)):
            jf = jax.jit(fn)
            if relative_error(jf(x, g), ref) > 1e-4:
                raise AssertionError(f"weight gradient {name} at {shape} differs from XLA's")
            row[f"dW {name}"] = median_ms(jf, x, g, runs=runs)
        row["dW xla GF/s"] = xla_gflop(weight_grad_lax, x, g) / row["dW xla"] * 1e3
        input_grad = lambda x, w, g: jax.grad(lambda x: jnp.sum(common.conv3x3(x, w) * g))(x)
        row["dX xla"] = median_ms(jax.jit(input_grad), x, w, g, runs=runs)
        row["dX xla GF/s"] = xla_gflop(input_grad, x, w, g) / row["dX xla"] * 1e3
        rows.append(row)
        print(row, flush=True)
    return rows


# --- every convolution of an HLO dump ----------------------------------------------------------------------------

_DEF = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (?:f32|bf16|f16)\[([\d,]*)\]", re.M)
_CONV = re.compile(
    r"= (f32|bf16|f16)\[([\d,]*)\]\S* convolution\(%([\w.\-]+), %([\w.\-]+)\), window=\{([^}]*)\}, "
    r"dim_labels=(\w+)_(\w+)->(\w+)"
)
_CALLER = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*\bcalls=%([\w.\-]+)", re.M)
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
_LABELS = {"lhs": dict(b="N", f="C"), "rhs": dict(o="O", i="I"), "out": dict(b="N", f="C")}


def _spec(labels: str, side: str) -> str:
    """HLO dim labels ('b01f', '01io') -> lax dimension-number strings ('NHWC', 'HWIO')."""
    table = {**_LABELS[side], "0": "H", "1": "W"}
    return "".join(table[c] for c in labels)


def _window(text: str) -> dict[str, list[int]]:
    """'size=3x3 stride=2x2 pad=1_1x0_1 lhs_dilate=2x2' -> per-dimension fields ('pad' as (low, high) pairs), with
    HLO's defaults for the ones left out."""
    fields = {"size": "1x1", "stride": "1x1", "pad": "0_0x0_0", "lhs_dilate": "1x1", "rhs_dilate": "1x1"}
    fields |= dict(kv.split("=") for kv in text.split())
    out = {k: [int(v) for v in fields[k].split("x")] for k in ("size", "stride", "lhs_dilate", "rhs_dilate")}
    out["pad"] = [tuple(int(v) for v in p.split("_")) for p in fields["pad"].split("x")]
    return out


def parse_convolutions(hlo: str) -> list[dict]:
    """The convolutions of an optimised HLO module: operand / output shapes, window, dim labels, kind, op name."""
    shapes = {m.group(1): tuple(int(s) for s in m.group(2).split(",") if s) for m in _DEF.finditer(hlo)}
    callers = {m.group(2): m.group(1) for m in _CALLER.finditer(hlo)}  # computation -> the instruction that calls it
    convs = []
    computation = ""
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
        m = _CONV.search(line)
        if not m:
            continue
        dtype, out, lhs_name, rhs_name, window, lhs_l, rhs_l, out_l = m.groups()
        win = _window(window)
        name = re.search(r'op_name="([^"]*)"', line)
        op_name = name.group(1) if name else ""
        groups = re.search(r"feature_group_count=(\d+)", line)
        if any(
            "0" not in labels or "1" not in labels or labels.index("0") > labels.index("1")
            for labels in (lhs_l, rhs_l, out_l)
        ):
            raise SystemExit(
                f"conv_forms: spatial dim labels other than 0 then 1 are not handled: {line.strip()[:160]}"
            )
        # XLA writes every gradient convolution with the canonical b01f_01io labels on transposed operands. The
        # weight gradient is created in a rewrite that drops its op_name; its "window" spans the feature map (the
        # batch as its input features) and its output is the kernel, so its window is larger than its output. The
        # input gradient keeps the op_name of the transposed (backward) program.
        out_shape = tuple(int(s) for s in out.split(","))
        out_spatial = [out_shape[i] for i, c in enumerate(out_l) if c in "01"]
        kind = "dW" if not op_name else ("dX" if "transpose(" in op_name else "fwd")
        if (kind == "dW") != bool(np.prod(win["size"]) > np.prod(out_spatial)):
            print(f"conv_forms: warning: {kind} by op_name but not by shape: {line.strip()[:160]}", file=sys.stderr)
        convs.append(
            dict(
                dtype=dtype,
                out=out_shape,
                lhs=shapes[lhs_name],
                rhs=shapes[rhs_name],
                size=win["size"],
                stride=win["stride"],
                pad=win["pad"],
                lhs_dilation=win["lhs_dilate"],
                rhs_dilation=win["rhs_dilate"],
                labels=(_spec(lhs_l, "lhs"), _spec(rhs_l, "rhs"), _spec(out_l, "out")),
                groups=int(groups.group(1)) if groups else 1,
                kind=kind,
                op_name=op_name,
                caller=callers.get(computation, "entry"),
            )
        )
    return convs


def conv_fn(c: dict) -> Callable[[jax.Array, jax.Array], jax.Array]:
    def conv(a: jax.Array, b: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            a,
            b,
            c["stride"],
            c["pad"],
            lhs_dilation=c["lhs_dilation"],
            rhs_dilation=c["rhs_dilation"],
            dimension_numbers=c["labels"],
            feature_group_count=c["groups"],
        )

    return conv


def hlo_rows(path: str, runs: int) -> tuple[list[dict], dict]:
    """Times each convolution of the dump alone (FLOPs by XLA's cost analysis of the rebuilt convolution); rows
    grouped by (kind, operand and output shapes, stride, lhs dilation), and the totals per kind. Each HLO instruction
    is timed once and as a plain XLA convolution: those not in the entry computation (inside a YNNPACK fusion, a
    while body...) are counted in `notes` by what calls them."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        convs = parse_convolutions(f.read())
    if not convs:
        raise SystemExit(f"conv_forms: no convolution in {path}")
    rng = np.random.default_rng(0)
    groups: dict[tuple, dict] = {}
    totals: dict[str, float] = {}
    notes: dict[str, int] = {}
    for c in convs:
        dtype = _DTYPES[c["dtype"]]
        a = jnp.asarray(rng.standard_normal(c["lhs"], np.float32), dtype)
        b = jnp.asarray(rng.standard_normal(c["rhs"], np.float32), dtype)
        fn = jax.jit(conv_fn(c))
        lowered = fn.lower(a, b)
        if lowered.out_info.shape != c["out"]:
            raise AssertionError(f"rebuilt convolution has shape {lowered.out_info.shape}, HLO says {c['out']}: {c}")
        ms = median_ms(fn, a, b, runs=runs)
        place = re.sub(r"\.\d+$", "", c["caller"])  # 'entry', or what calls it: 'ynn_fusion', a while loop...
        if place != "entry":
            notes[place] = notes.get(place, 0) + 1
        key = (c["kind"], c["lhs"], c["rhs"], c["out"], tuple(c["stride"]), tuple(c["lhs_dilation"]))
        row = groups.setdefault(key, dict(kind=c["kind"], lhs=str(c["lhs"]), rhs=str(c["rhs"]), out=str(c["out"]), n=0))
        row["n"] += 1
        row["ms"] = row.get("ms", 0.0) + ms
        row["gflop"] = row.get("gflop", 0.0) + common.xla_flops(lowered) / 1e9
        totals[c["kind"]] = totals.get(c["kind"], 0.0) + ms
    rows = sorted(groups.values(), key=lambda r: -r["ms"])
    for r in rows:
        r["GF/s"] = r["gflop"] / r["ms"] * 1e3
    return rows, {"count": len(convs), **totals, "all": sum(totals.values()), "notes": notes}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    header = common.run_header(sys.argv, "cpu")  # before the timing: its load average is the machine's, not ours
    if args.mode == "winograd":
        rows = winograd_rows(args.runs)
        columns = [("shape", "B×H×W×Ci×Co")]
        for name in ("lax", *WINOGRAD):
            columns += [(f"fwd {name}", f"fwd {name} ms"), (f"grad {name}", f"fwd+grads {name} ms")]
        columns += [(f"err {n}", f"max rel. err {n}") for n in WINOGRAD] + [("lax fwd GF/s", "lax fwd GFLOP/s")]
        body = common.table(rows, columns)
    elif args.mode == "weight-grad":
        rows = weight_grad_rows(args.runs)
        columns = [
            ("shape", "B×H×W×Ci×Co"),
            ("dW xla", "dW XLA ms"),
            ("dW taps", "dW 9 tap GEMMs ms"),
            ("dW im2col", "dW im2col GEMM ms"),
            ("dW xla GF/s", "dW XLA GFLOP/s"),
            ("dX xla", "dX XLA ms"),
            ("dX xla GF/s", "dX XLA GFLOP/s"),
        ]
        body = common.table(rows, columns)
    else:
        rows, totals = hlo_rows(args.hlo_file, args.runs)
        columns = [("kind", "kind"), ("n", "count"), ("lhs", "lhs"), ("rhs", "rhs"), ("out", "out")]
        columns += [("ms", "ms (sum, alone)"), ("GF/s", "GFLOP/s")]
        kinds = ", ".join(f"{k} {v:.0f} ms" for k, v in totals.items() if k in ("fwd", "dX", "dW"))
        elsewhere = ", ".join(f"{n} in {place}" for place, n in totals["notes"].items())
        body = (
            common.table(rows[: args.top], columns)
            + f"\n\n{totals['count']} convolutions, {totals['all']:.0f} ms when each runs alone ({kinds}); "
            f"top {min(args.top, len(rows))} of {len(rows)} groups shown."
            + (
                f" Not in the entry computation (timed as plain convolutions all the same): {elsewhere}."
                if elsewhere
                else ""
            )
        )
    print(body)
    if args.results:
        common.append_section(SECTION, header + "\n\n" + body, args.results)


if __name__ == "__main__":
    main()

"""Inception feature extraction (the FID network) in latentdiff (JAX) vs pytorch-fid (PyTorch), same machine.

    python bench/fid.py                                   # batch 16 of 256 px uint8 images, all cores, 5 runs
    python bench/fid.py --batch_size 32 --image_size 299 --runs 7 --threads 2 --no_results
    python bench/fid.py --device gpu --batch_size 128       # both frameworks on the GPU (bench/gpu.sh section fid)

Both sides get the same random FID-Inception weights (ours through latentdiff.convert.inception_weights' key table,
theirs loaded into pytorch-fid's InceptionV3([3]) with its FID blocks: no download), the same uint8 batch and the
same CPU threads (the worker processes are pinned to the first --threads cores; torch.set_num_threads too), or
with --device gpu the same GPU (ours: JAX's default backend; theirs: the model and each batch moved to CUDA, as
pytorch-fid's fid_score does with --device cuda; no pinning). Timed:
uint8 [B, S, S, 3] in host memory -> 2048-d pool features in host memory, preprocessing included (pytorch-fid's:
/255, bilinear resize to 299, 2x - 1; ours with --preprocess pytorch_fid), after one warm-up call (our jit compile).
Each framework runs in its own subprocess, one after the other. Prints a table and appends it to bench/RESULTS.md
(section "Inception features (FID)") unless --no_results. A ratio > 1 means latentdiff is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from bench import harness

SECTION = "Inception features (FID)"
FEATURE_CHECK = 8  # pool features of the first image compared between the two workers


def random_params() -> dict:
    """Random FID-Inception params in our layout (He-scaled kernels, plausible BN statistics), numpy only."""
    import jax

    from latentdiff.nn.inception import NUM_CLASSES, abstract_params

    rng = np.random.default_rng(0)
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(NUM_CLASSES))[0]
    out: dict = {}
    for path, leaf in flat:
        name = "/".join(p.key for p in path)
        if name.endswith("kernel"):
            v = rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        elif name.endswith("var"):
            v = rng.uniform(0.5, 1.5, leaf.shape)
        elif name.endswith("scale"):
            v = np.ones(leaf.shape)
        else:
            v = rng.normal(size=leaf.shape) * 0.1
        node = out
        for part in name.split("/")[:-1]:
            node = node.setdefault(part, {})
        node[name.split("/")[-1]] = v.astype(np.float32)
    return out


def torch_state_dict(params: dict) -> dict[str, np.ndarray]:
    """Our params -> pytorch-fid / torchvision state dict, inverting the converter's own key table."""
    from flax import traverse_util

    from latentdiff.convert import key_tables as cc
    from latentdiff.convert.inception_weights import torchvision_table

    inverse = {cc.conv_kernel: cc.inverse_conv_kernel, cc.dense_kernel: cc.inverse_dense_kernel}
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
    table = torchvision_table(True)
    return {r.src: np.ascontiguousarray(inverse.get(r.transform, cc.identity)(flat[r.dst])) for r in table}


def images(batch: int, size: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def pin_threads(threads: int) -> None:
    """Restricts this process to the first `threads` cores (XLA sizes its pool by the schedulable CPUs)."""
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores[:threads])


def worker_jax(args: argparse.Namespace) -> dict:
    if args.device == "cpu":
        pin_threads(args.threads)
    import latentdiff  # noqa: F401, I001  (CPU XLA flags before JAX starts)
    import jax
    import jax.numpy as jnp

    from latentdiff import metrics

    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise RuntimeError(f"--device gpu but JAX's backend is {jax.default_backend()!r}")
    params = jax.device_put(random_params())
    x = images(args.batch_size, args.image_size)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    run = lambda: metrics.inception_features(params, x, args.batch_size, args.preprocess, dtype=dtype)
    times = harness.time_runs(run, args.runs, warmup=1)
    pool = run()[0]
    return {
        "framework": "latentdiff (JAX)",
        "backend": jax.default_backend(),
        "times": times,
        "features": pool[0, :FEATURE_CHECK].tolist(),
    }


def build_pytorch_fid(state_dict: dict[str, np.ndarray]):
    """pytorch-fid's InceptionV3([3]) (resize + normalise inside, as its fid_score uses it) with given weights."""
    import torch
    from pytorch_fid import inception as pfi

    def fid_inception_v3_random():
        net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = pfi.FIDInceptionE_1(1280)
        net.Mixed_7c = pfi.FIDInceptionE_2(2048)
        own = net.state_dict()
        net.load_state_dict({k: torch.from_numpy(state_dict[k]) if k in state_dict else v for k, v in own.items()})
        return net

    pfi.fid_inception_v3 = fid_inception_v3_random  # the only change: no weight download
    return pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()


def worker_torch(args: argparse.Namespace) -> dict:
    if args.device == "cpu":
        pin_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    model = build_pytorch_fid(torch_state_dict(random_params())).to(device)
    x = images(args.batch_size, args.image_size)

    def run() -> np.ndarray:  # what pytorch_fid.fid_score.get_activations does per batch (ToTensor: /255, .to(device))
        with torch.no_grad():
            batch = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0).to(device)
            return model(batch)[0].squeeze(3).squeeze(2).cpu().numpy()

    times = harness.time_runs(run, args.runs, warmup=1)
    pool = run()
    return {
        "framework": "pytorch-fid (PyTorch)",
        "backend": device.type,
        "times": times,
        "features": pool[0, :FEATURE_CHECK].tolist(),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/fid.py", description=__doc__.split("\n")[0])
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--image_size", type=int, default=256, help="side of the uint8 input images (resized to 299)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per framework (median reported; >= 5)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU cores for both sides")
    p.add_argument("--preprocess", default="pytorch_fid", choices=("pytorch_fid", "paper", "clean"), help="ours")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="where both frameworks run")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="our conv compute dtype")
    p.add_argument("--no_results", action="store_true", help="do not append to the results file")
    p.add_argument("--results", default=harness.RESULTS, help="markdown file the table is appended to")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--worker", default=None, choices=("jax", "torch"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker_args(args: argparse.Namespace) -> list[str]:
    return [
        *("--batch_size", str(args.batch_size), "--image_size", str(args.image_size), "--runs", str(args.runs)),
        *("--threads", str(args.threads), "--preprocess", args.preprocess, "--dtype", args.dtype),
        *("--device", args.device),
    ]


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.worker:
        harness.emit(worker_jax(args) if args.worker == "jax" else worker_torch(args))
        return
    if args.runs < 5:
        raise SystemExit("error: --runs must be >= 5 (medians of at least 5 runs)")
    if not 1 <= args.threads <= len(os.sched_getaffinity(0)):
        raise SystemExit(f"error: --threads must be in 1..{len(os.sched_getaffinity(0))}")
    header = harness.run_header([os.path.abspath(__file__), *argv], args.device)
    env = harness.limit_threads(args.threads)
    if args.device == "gpu":
        env |= harness.gpu_worker_env(0.6)
    rows = []
    for name in ("torch", "jax"):
        result = harness.run_worker(os.path.abspath(__file__), [name, *worker_args(args)], env=env)
        if "error" in result:
            raise SystemExit(f"error: {name} worker failed: {result['error']}")
        s = harness.summary(result["times"])
        rows.append(
            {
                **result,
                "median_s": s["median"],
                "min_s": s["min"],
                "max_s": s["max"],
                "images_per_s": args.batch_size / s["median"],
            }
        )
    torch_row, jax_row = rows
    jax_row["ratio"] = jax_row["images_per_s"] / torch_row["images_per_s"]
    torch_row["ratio"] = 1.0
    a, b = np.asarray(jax_row["features"]), np.asarray(torch_row["features"])
    agreement = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
    columns = [
        ("framework", "framework"),
        ("median_s", "median s / batch"),
        ("min_s", "min s"),
        ("max_s", "max s"),
        ("images_per_s", "images/s"),
        ("ratio", "vs pytorch-fid"),
        ("load_before", "load before"),
        ("load_after", "load after"),
    ]
    body = "\n".join(
        [
            header,
            f"Batch {args.batch_size} × {args.image_size}² uint8 -> 2048-d pool features on {args.device} "
            f"({jax_row.get('backend')} / {torch_row.get('backend')}), {args.threads} CPU thread(s), "
            f"{args.runs} timed runs each (after 1 warm-up), ours: preprocess {args.preprocess}, dtype {args.dtype}. "
            f"Max relative difference of the features (first image, {FEATURE_CHECK} dims): {agreement:.2e}.",
            "",
            harness.table(rows, columns),
        ]
    )
    print(body)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "agreement": agreement, "header": header}, f, indent=1, default=str)
    if not args.no_results:
        harness.append_section(SECTION, body, args.results)
        print(f"appended to {args.results}")


if __name__ == "__main__":
    main(sys.argv[1:])

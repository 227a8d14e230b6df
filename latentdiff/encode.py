"""Precompute stage-1 latents of a dataset split and report the latent scale factor (1 / std).

    python -m latentdiff.encode --workdir workdirs/ae --out latents/ [--split train] [--num 0] [--batch_size 64]

Writes `OUT/latents.npz` with `mean` and `logvar` [N, h, w, c] (KL posterior moments, so stage 2 can sample the
posterior as the LDM code does) or `latents` (VQ pre-quantisation), plus `captions.jsonl`, `labels.npy` when the
dataset has labels, and `meta.json` (scale factor, shapes, source workdir and step). The dataset is the stage-1
config's `data` block (override with --config.data.* style flags is not needed: pass --split / --num).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

import latentdiff  # noqa: F401  (CPU XLA flags)
from latentdiff import errors


def encode_split(workdir: str, out: str, split: str, num: int, batch_size: int, seed: int) -> dict[str, Any]:
    """Encodes `split` of the stage-1 workdir's dataset; returns the meta dict (also written to OUT/meta.json)."""
    import jax
    import jax.numpy as jnp

    from latentdiff import config_utils, first_stage, params_io
    from latentdiff.data.pipeline import make_dataset
    from latentdiff.train.autoencoder import export_first_stage

    export_dir = export_first_stage(workdir)
    fs = first_stage.load_export(export_dir)
    config = config_utils.load_workdir_config(workdir)
    iterator = make_dataset(
        config.data,
        split=split,
        tokenizer=None,
        global_batch_size=batch_size,
        process_index=0,
        process_count=1,
        seed=seed,
        train=False,
    )
    kl = fs.config.kind == "kl"

    @jax.jit
    def encode(variables: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        if kl:
            posterior = fs.module.apply(variables, images, False, method=type(fs.module).encode)
            return posterior.mean, posterior.logvar
        h = fs.module.apply(variables, images, False, method=type(fs.module).encode)
        return h, jnp.zeros_like(h)

    means, logvars, captions, labels = [], [], [], []
    total = 0
    for batch in iterator:
        mean, logvar = jax.device_get(encode(fs.variables, jnp.asarray(batch["image"])))
        means.append(np.asarray(mean))
        logvars.append(np.asarray(logvar))
        captions.extend(str(c) for c in batch["caption"])
        if "label" in batch:
            labels.append(np.asarray(batch["label"]))
        total += len(mean)
        if num and total >= num:
            break
    if not means:
        raise ValueError(f"split {split!r} gave no full batch of {batch_size}; lower --batch_size")
    mean = np.concatenate(means)[: num or None]
    logvar = np.concatenate(logvars)[: num or None]
    rng = np.random.default_rng(seed)
    sampled = mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape) if kl else mean
    scale_factor = float(1.0 / np.std(sampled))
    os.makedirs(out, exist_ok=True)
    arrays = {"mean": mean, "logvar": logvar} if kl else {"latents": mean}
    tmp = os.path.join(out, f"latents.tmp.{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, os.path.join(out, "latents.npz"))
    config_utils.atomic_write_text(
        os.path.join(out, "captions.jsonl"), "".join(json.dumps(c) + "\n" for c in captions[: len(mean)])
    )
    if labels:
        np.save(os.path.join(out, "labels.npy"), np.concatenate(labels)[: len(mean)])
    meta = {
        "workdir": os.path.abspath(workdir),
        "step": params_io.read_metadata(os.path.join(export_dir, "params.safetensors")).get("step"),
        "split": split,
        "num": len(mean),
        "kind": fs.config.kind,
        "latent_shape": list(mean.shape[1:]),
        "latent_std": float(np.std(sampled)),
        "scale_factor": scale_factor,
    }
    config_utils.atomic_write_text(os.path.join(out, "meta.json"), json.dumps(meta, indent=2))
    return meta


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m latentdiff.encode", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a trained stage-1 workdir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--num", type=int, default=0, help="encode at most this many images (0 = the whole split)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def run() -> None:
        meta = encode_split(args.workdir, args.out, args.split, args.num, args.batch_size, args.seed)
        print(f"encoded {meta['num']} images -> {args.out}  latent {meta['latent_shape']}")
        print(f"latent std {meta['latent_std']:.5f}  ->  scale factor 1/std = {meta['scale_factor']:.5f}")

    errors.run_cli(run)


if __name__ == "__main__":
    main(sys.argv[1:])

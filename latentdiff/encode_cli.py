"""Precompute stage-1 latents of a dataset split (a stage-2 data source) and report the latent scale factor (1 / std).

    latentdiff encode --workdir workdirs/ae --out latents/ [--split train] [--num 0] [--batch_size 64]
    python train.py --config configs/ldm_txt2img_kl8.py:tiny --workdir workdirs/ldm \
        --config.first_stage.workdir=workdirs/ae --config.first_stage.latents=latents/

Writes into OUT one memory-mappable `.npy` file per array (stage 2 reads them with np.load(mmap_mode="r"); see
latentdiff/data/latents.py for the layout): `mean.npy` and `logvar.npy` [N, h, w, c] (KL posterior moments, so stage 2
samples the posterior as the LDM code does) or `latents.npy` (VQ pre-quantisation), `labels.npy` when the dataset has
labels, `captions.jsonl` (one caption per image: the one the loader picked for multi-caption datasets) and
`meta.json` (scale factor, shapes, source workdir and step). Arrays are filled batch by batch into temporary
memory-mapped files and renamed when complete, so memory stays at one batch and readers never see half a file;
meta.json is written last. The dataset is the stage-1 config's `data` block, read in order (no augmentation); the
last partial batch of the split is dropped (a smaller --batch_size keeps more).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

import latentdiff  # noqa: F401  (CPU XLA flags)
from latentdiff import atomic_files, errors
from latentdiff.errors import UserError
from latentdiff.output_paths import check_output_dir


def encode_split(workdir: str, out: str, split: str, num: int, batch_size: int, seed: int) -> dict[str, Any]:
    """Encodes `split` of the stage-1 workdir's dataset into OUT; returns the meta dict (also OUT/meta.json)."""
    import jax
    import jax.numpy as jnp

    from latentdiff import config_utils
    from latentdiff.data.input_pipeline import make_dataset
    from latentdiff.data.latents import ARRAYS, CAPTIONS, LABELS, META
    from latentdiff.workdir import read_first_stage

    first_stage, first_stage_step = read_first_stage(workdir)  # read-only: nothing is written into the stage-1 workdir
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
    total = iterator.num_batches * batch_size
    total = min(total, num) if num else total
    if total == 0:
        raise UserError(f"split {split!r} gave no full batch of {batch_size}; lower --batch_size")
    kl = first_stage.config.kind == "kl"
    latent_shape = first_stage.latent_shape(config.data.resolution)

    @jax.jit
    def encode(variables: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        if kl:
            posterior = first_stage.module.apply(variables, images, False, method=type(first_stage.module).encode)
            return posterior.mean, posterior.logvar
        h = first_stage.module.apply(variables, images, False, method=type(first_stage.module).encode)
        return h, jnp.zeros_like(h)

    os.makedirs(out, exist_ok=True)
    atomic_files.remove_stale(out)  # temporaries of a killed earlier encoding
    if os.path.isfile(os.path.join(out, META)):  # the directory is not a valid latents source until rewritten
        os.remove(os.path.join(out, META))
    names = ARRAYS[first_stage.config.kind]
    final = {n: os.path.join(out, f"{n}.npy") for n in names} | {"labels": os.path.join(out, LABELS)}
    final["captions"] = os.path.join(out, CAPTIONS)
    tmp = {n: atomic_files.temp_path(path) for n, path in final.items()}
    try:
        std = _fill(encode, first_stage.variables, iterator, tmp, names, total, latent_shape, kl, seed)
    except BaseException:  # an error or SIGTERM (errors.run_cli): no half-written temporaries stay behind
        for path in tmp.values():
            atomic_files.discard(path)
        raise
    for name in (*names, "captions"):
        os.replace(tmp[name], final[name])
    if os.path.isfile(tmp["labels"]):
        os.replace(tmp["labels"], final["labels"])
    elif os.path.isfile(final["labels"]):  # stale labels of an earlier encoding
        os.remove(final["labels"])
    meta = {
        "format": "npy",
        "workdir": os.path.abspath(workdir),
        "step": str(first_stage_step),
        "split": split,
        "num": total,
        "kind": first_stage.config.kind,
        "latent_shape": list(latent_shape),
        "embed_dim": int(first_stage.config.embed_dim),
        "downsample_factor": first_stage.downsample_factor,
        "resolution": int(config.data.resolution),
        "latent_std": std,
        "scale_factor": 1.0 / std,
    }
    config_utils.atomic_write_text(os.path.join(out, META), json.dumps(meta, indent=2))
    return meta


def _fill(
    encode: Any,
    variables: dict,
    iterator: Any,
    tmp: dict[str, str],
    names: tuple[str, ...],
    total: int,
    latent_shape: tuple[int, ...],
    kl: bool,
    seed: int,
) -> float:
    """Encodes `total` images batch by batch into the temporary files `tmp` (memory-mapped arrays [total, h, w, c],
    labels [total] when the data has them, captions as JSON lines) -> the std of the (sampled) latents."""
    import jax
    import jax.numpy as jnp

    arrays = {
        n: np.lib.format.open_memmap(tmp[n], mode="w+", dtype=np.float32, shape=(total, *latent_shape)) for n in names
    }
    labels = None
    rng = np.random.default_rng(seed)
    moments = np.zeros(2, np.float64)  # sum and sum of squares of the (sampled) latents, for the scale factor
    filled = 0
    with open(tmp["captions"], "w", encoding="utf-8") as captions:
        for batch in iterator:
            take = min(len(batch["image"]), total - filled)
            mean, logvar = (
                np.asarray(a)[:take] for a in jax.device_get(encode(variables, jnp.asarray(batch["image"])))
            )
            rows = slice(filled, filled + take)
            if kl:
                arrays["mean"][rows], arrays["logvar"][rows] = mean, logvar
                sampled = mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape)
            else:
                arrays["latents"][rows] = sampled = mean
            moments += (np.sum(sampled, dtype=np.float64), np.sum(np.square(sampled, dtype=np.float64)))
            captions.writelines(json.dumps(str(c)) + "\n" for c in batch["caption"][:take])
            if "label" in batch:
                if labels is None:
                    labels = np.lib.format.open_memmap(tmp["labels"], mode="w+", dtype=np.int32, shape=(total,))
                labels[rows] = np.asarray(batch["label"][:take], np.int32)
            filled += take
            if filled >= total:
                break
    for arr in (*arrays.values(), *([labels] if labels is not None else [])):
        arr.flush()
    count = total * int(np.prod(latent_shape))
    return float(np.sqrt(max(moments[1] / count - (moments[0] / count) ** 2, 0.0)))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="latentdiff encode", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a trained stage-1 workdir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--num", type=int, default=0, help="encode at most this many images (0 = the whole split)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def run() -> None:
        check_output_dir(args.out, "--out")
        meta = encode_split(args.workdir, args.out, args.split, args.num, args.batch_size, args.seed)
        print(f"encoded {meta['num']} images -> {args.out}  latent {meta['latent_shape']}")
        print(f"latent std {meta['latent_std']:.5f}  ->  scale factor 1/std = {meta['scale_factor']:.5f}")

    errors.run_cli(run)


if __name__ == "__main__":
    main(sys.argv[1:])

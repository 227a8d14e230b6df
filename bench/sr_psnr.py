"""PSNR of a super-resolution LDM (configs/ldm_sr4.py) against bicubic upsampling, on the validation split.

    python train.py --config configs/ldm_sr4.py:tiny --workdir /tmp/sr4 --config.first_stage.workdir=AE_WORKDIR
    python bench/sr_psnr.py --workdir /tmp/sr4 [--num 256] [--steps 50] [--batch 64] [--json out.json]

For every validation image x (the loader's centre crop at data.resolution, in [-1, 1]): the low-resolution input
y = bicubic↓f(x) (antialiased, as in training); the model's ×f output = latentdiff.generation.make_generate (DDIM,
η = 0, EMA params, z_T from --seed, concat input y), decoded by the first stage; the baseline = bicubic↑f(y)
(jax.image.resize 'cubic', clipped). Also reported: the first stage's reconstruction D(E(x)) (posterior mode), an
upper bound for the LDM. PSNR per image on uint8-quantised images (data range 255), averaged over images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import latentdiff  # noqa: F401  (CPU XLA flags)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a trained configs/ldm_sr4.py workdir")
    parser.add_argument("--num", type=int, default=256, help="validation images (a multiple of --batch)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the numbers here")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from latentdiff import conditioning, config_utils, generation, metrics
    from latentdiff import workdir as workdir_lib
    from latentdiff.data.input_pipeline import make_dataset
    from latentdiff.first_stage import load_first_stage_export
    from latentdiff.imaging import to_uint8
    from latentdiff.train.ldm import LDMTask
    from latentdiff.train.ldm_setup import null_condition

    config = config_utils.load_workdir_config(args.workdir)
    if conditioning.concat_kind(config) != "sr":
        raise SystemExit(f"error: {args.workdir!r} is not a super-resolution workdir (conditioning.concat != 'sr')")
    factor = config.conditioning.sr_factor
    first_stage = load_first_stage_export(os.path.join(args.workdir, "first_stage"))
    restored = workdir_lib.restore_stage2_params(args.workdir, config)
    task = LDMTask(config, first_stage, null_condition(config, None), float(restored["scale_factor"]))
    params = restored["ema_params"]
    scale = jnp.float32(restored["scale_factor"])

    generate = generation.make_generate(
        unet=task.unet,
        cond_encoder=task.cond_encoder,
        first_stage=first_stage,
        schedule=task.schedule,
        parameterization=config.diffusion.parameterization,
        sampler="ddim",
        num_steps=args.steps,
        concat="sr",
    )

    @jax.jit
    def run(
        params: dict, first_stage_variables: dict, hr: jax.Array, x_T: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        low = conditioning.low_res_from_image(hr, factor)
        no_cond = jnp.zeros((hr.shape[0],), jnp.int32)  # text_encoder.kind 'none': dummy labels, no guidance
        model = generate(params, first_stage_variables, scale, no_cond, no_cond[:1], 1.0, 0.0, x_T,
                         jax.random.key(args.seed), {"low_res": low})  # fmt: skip
        bicubic = jnp.clip(jax.image.resize(low, hr.shape, "cubic"), -1.0, 1.0)
        recon = first_stage.decode(first_stage_variables, first_stage.encode(first_stage_variables, hr, None, False))
        return model, bicubic, recon

    data = make_dataset(config.data, split=config.data.eval_split, tokenizer=None, global_batch_size=args.batch,
                        process_index=0, process_count=1, seed=0, train=False)  # fmt: skip
    scores: dict[str, list[np.ndarray]] = {"ldm": [], "bicubic": [], "first_stage_recon": []}
    seen = 0
    base = jax.random.key(args.seed)
    noise = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), task.latent_shape)))
    start = time.perf_counter()
    for batch in data:
        if seen >= args.num:
            break
        hr = jnp.asarray(batch["image"])
        indices = jnp.arange(seen, seen + hr.shape[0])
        x_T = noise(indices)  # sample i's noise depends only on (seed, i)
        outs = run(params, first_stage.variables, hr, x_T)
        target = to_uint8(np.asarray(hr)).astype(np.float32)
        for key, out in zip(scores, outs):
            scores[key].append(np.asarray(metrics.psnr(to_uint8(np.asarray(out)).astype(np.float32), target, 255.0)))
        seen += hr.shape[0]
    seconds = time.perf_counter() - start
    result = {
        "workdir": args.workdir,
        "checkpoint_step": int(restored["step"]),
        "images": seen,
        "resolution": int(config.data.resolution),
        "factor": int(factor),
        "ddim_steps": args.steps,
        "seconds": round(seconds, 1),
        **{f"psnr_{k}": round(float(np.mean(np.concatenate(v))), 3) for k, v in scores.items()},
    }
    lr = config.data.resolution // factor
    step = result["checkpoint_step"]
    print(f"SR x{factor} ({lr} -> {config.data.resolution} px), {seen} validation images, checkpoint step {step}")
    print("| method | PSNR dB |\n|---|---|")
    print(f"| LDM ({args.steps} DDIM steps, EMA) | {result['psnr_ldm']:.2f} |")
    print(f"| bicubic upsampling | {result['psnr_bicubic']:.2f} |")
    print(f"| first-stage reconstruction (bound) | {result['psnr_first_stage_recon']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

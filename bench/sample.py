"""Sampling benchmark: DDIM with classifier-free guidance, latentdiff vs a diffusers LDMTextToImagePipeline loop.

    python bench/sample.py --size tiny --steps 50 --batch 8
    python bench/sample.py --size tiny --compile-steps 25,250      # compile time vs number of steps (ours)
    python bench/sample.py --device gpu --size paper --batch 16 --steps 50

Ours: latentdiff.generation.make_generate (text encoder, DDIM as one lax.scan, guidance batched as one doubled UNet
call per step, decode), jitted once. Peer: the loop of diffusers' LDMTextToImagePipeline written out — text encoder
on [cond; uncond] once, DDIMScheduler(scaled_linear 0.00085..0.012, leading spacing, steps_offset 1,
set_alpha_to_one False, as DESIGN.md), one doubled UNet call per step, guidance, AutoencoderKL.decode — with the same
architecture and random weights. GPU: ours bf16 (+ cuDNN attention), diffusers fp16.
Reported: images/s (median of --runs batches), time per batch, first-call (compile) time, peak RSS, achieved GFLOP/s
(FLOPs of one batch from XLA's cost analysis, credited to both) and its fraction of the dense-matmul peak; and with
--compile-steps the lower+compile time of our sampler for each step count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import harness

FRAMEWORKS = ("ours", "diffusers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", help="tiny | small (| paper with --device gpu)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--batch", type=int, default=8, help="images per batch (the UNet sees 2× with guidance)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--frameworks", default="ours,diffusers", help=f"comma list of {FRAMEWORKS}")
    p.add_argument("--runs", type=int, default=5, help="timed batches per worker (median reported)")
    p.add_argument("--rounds", type=int, default=1, help="times each framework's worker is run, alternating")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    p.add_argument("--compile-steps", default="", help="e.g. 25,250: also measure our compile time per step count")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--attention", default="", help="GPU: unet.attention_impl for ours (xla | cudnn; default cudnn)")
    p.add_argument("--results", default=harness.RESULTS, help="RESULTS.md to append to ('' = do not write)")
    p.add_argument("--json", default="", help="also write all worker results to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--framework", default="", help=argparse.SUPPRESS)
    p.add_argument("--compile-only", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for f in args.frameworks.split(","):
        if f and f not in FRAMEWORKS:
            p.error(f"--frameworks {f!r} is not one of {FRAMEWORKS}")
    if args.size not in (*harness.SIZES, "paper") or (args.size == "paper" and args.device != "gpu"):
        p.error("--size must be tiny | small, or paper with --device gpu")
    if args.steps < 1 or args.batch < 1 or args.runs < 1:
        p.error("--steps, --batch and --runs must be >= 1")
    return args


def configs(args: argparse.Namespace):
    """(stage-2 config, stage-1 autoencoder block) for the size and device."""
    from latentdiff.config_utils import load_config

    if args.size == "paper":
        config = load_config(os.path.join(harness.REPO, "configs", "ldm_txt2img_kl8.py") + ":paper")
        ae = load_config(os.path.join(harness.REPO, "configs", "autoencoder_kl_f8.py") + ":paper").autoencoder
    else:
        config = harness.ldm_config(args.size)
        ae = harness.stage1_for(config)
    if args.device == "gpu":
        config.unet.dtype = config.text_encoder.dtype = ae.dtype = "bfloat16"
        config.unet.attention_impl = args.attention or "cudnn"
    return config, ae


def ours(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import latentdiff  # noqa: F401  (XLA CPU flags)
    from latentdiff import generation
    from latentdiff.first_stage import FirstStage, abstract_autoencoder_variables
    from latentdiff.nn.autoencoder import build_autoencoder
    from latentdiff.nn.text_encoder import build_text_encoder, init_tokens
    from latentdiff.nn.unet import build_unet, init_inputs
    from latentdiff.train.ldm import schedule_from_config

    config, ae_cfg = configs(args)
    unet, text = build_unet(config.unet), build_text_encoder(config.text_encoder)
    latent = config.data.resolution // 8
    inp = init_inputs(config.unet, 1, latent, config.text_encoder.max_length)
    abstract = {
        "unet": jax.eval_shape(lambda: unet.init(jax.random.key(0), inp["x"], inp["t"], inp["context"], None, False)),
        "cond": jax.eval_shape(lambda: text.init(jax.random.key(0), init_tokens(config.text_encoder, 1))),
    }
    params = jax.device_put({k: harness.random_like(v["params"], seed=i) for i, (k, v) in enumerate(abstract.items())})
    first_stage_variables = jax.device_put(harness.random_like(abstract_autoencoder_variables(ae_cfg), seed=5))
    first_stage = FirstStage(config=ae_cfg, module=build_autoencoder(ae_cfg), variables=first_stage_variables)
    schedule = schedule_from_config(config.diffusion)
    length, vocab = config.text_encoder.max_length, config.text_encoder.vocab_size
    rng = np.random.default_rng(0)
    cond = jnp.asarray(rng.integers(1, vocab, (args.batch, length)), jnp.int32)
    uncond = jnp.zeros((1, length), jnp.int32)

    def compiled_for(steps: int):
        gen = generation.make_generate(
            unet=unet,
            cond_encoder=text,
            first_stage=first_stage,
            schedule=schedule,
            parameterization="eps",
            sampler="ddim",
            num_steps=steps,
        )
        x_T = generation.initial_noise(0, jnp.arange(args.batch), (latent, latent, 4))
        call_args = (params, first_stage_variables, jnp.float32(0.18215), cond, uncond, jnp.float32(args.guidance))
        call_args += (jnp.float32(0.0), x_T, jax.random.key(0))
        t0 = time.perf_counter()
        compiled = jax.jit(gen).lower(*call_args).compile()
        return compiled, call_args, time.perf_counter() - t0

    if args.compile_only:
        return {"compile_s": compiled_for(args.compile_only)[2], "steps": args.compile_only}
    compiled, call_args, compile_s = compiled_for(args.steps)
    times = harness.time_runs(lambda: compiled(*call_args).block_until_ready(), args.runs, warmup=1)
    flops = batch_flops(unet, text, first_stage, params, first_stage_variables, cond, latent, args.steps)
    out = {"compile_s": compile_s, "times": times, "rss_mib": harness.peak_rss_mib(), "backend": jax.default_backend()}
    peak = harness.matmul_peak_gflops() if args.device == "cpu" else 0.0
    return {**out, "flops": flops, "matmul_peak_gflops": peak}


def batch_flops(
    unet, text, first_stage, params: dict, first_stage_variables: dict, cond, latent: int, steps: int
) -> float:
    """FLOPs of one guided batch, from XLA's cost analysis of its parts (a scan's body is counted once, so the
    parts are counted apart): `steps` UNet calls at batch 2B, the text encoder on 2B prompts (as diffusers runs it;
    ours encodes B + 1), and the decoder at batch B. The same FLOPs are credited to both frameworks."""
    import jax
    import jax.numpy as jnp

    b = cond.shape[0]
    tokens = jax.ShapeDtypeStruct((2 * b, *cond.shape[1:]), cond.dtype)
    context = jax.eval_shape(lambda: text.apply({"params": params["cond"]}, tokens))
    latents = lambda n: jax.ShapeDtypeStruct((n, latent, latent, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((2 * b,), jnp.int32)

    def flops_of(fn, *fn_args) -> float:  # lowered, not compiled: a paper-scale GPU compile would take minutes
        return harness.xla_flops(jax.jit(fn).lower(*fn_args))

    unet_apply = lambda p, x, t, c: unet.apply({"params": p}, x, t, c, None, False)
    unet_call = flops_of(unet_apply, params["unet"], latents(2 * b), t, context)
    encode = flops_of(lambda p, tok: text.apply({"params": p}, tok), params["cond"], tokens)
    decode = flops_of(lambda v, z: first_stage.decode(v, z), first_stage_variables, latents(b))
    return steps * unet_call + encode + decode


def diffusers_loop(args: argparse.Namespace) -> dict:
    device = harness.torch_setup(args.threads, args.device)
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    from latentdiff.convert.diffusers_vae import diffusers_config

    config, ae_cfg = configs(args)
    dtype = torch.float16 if args.device == "gpu" else torch.float32
    torch.manual_seed(0)
    latent = config.data.resolution // 8
    with device:
        unet = UNet2DConditionModel(**harness.diffusers_unet_kwargs(config.unet, latent)).to(dtype=dtype).eval()
        text = LDMBertModel(LDMBertConfig(**harness.ldmbert_kwargs(config.text_encoder))).to(dtype=dtype).eval()
        vae = AutoencoderKL(**diffusers_config(ae_cfg)).to(dtype=dtype).eval()
    d = config.diffusion
    scheduler = DDIMScheduler(
        num_train_timesteps=d.timesteps,
        beta_start=d.linear_start,
        beta_end=d.linear_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    length, vocab = config.text_encoder.max_length, config.text_encoder.vocab_size
    rng = np.random.default_rng(0)
    cond = torch.tensor(rng.integers(1, vocab, (args.batch, length)), device=device)
    tokens = torch.cat([cond, torch.zeros_like(cond)])

    @torch.no_grad()
    def generate() -> None:
        context = text(tokens).last_hidden_state
        latents = torch.randn((args.batch, 4, latent, latent), device=device, dtype=dtype)
        scheduler.set_timesteps(args.steps)
        for t in scheduler.timesteps:
            out = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample
            out_c, out_u = out.chunk(2)
            eps = out_u + args.guidance * (out_c - out_u)
            latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
        images = vae.decode(latents / 0.18215).sample.clamp(-1, 1)
        images.float().cpu()

    t0 = time.perf_counter()
    generate()
    first = time.perf_counter() - t0
    times = harness.time_runs(generate, args.runs, warmup=0)
    return {"compile_s": first, "times": times, "rss_mib": harness.peak_rss_mib()}


def worker_args(args: argparse.Namespace, fw: str, compile_only: int = 0) -> list[str]:
    out = ["--size", args.size, "--framework", fw, "--steps", str(args.steps), "--batch", str(args.batch)]
    out += ["--guidance", str(args.guidance), "--runs", str(args.runs), "--threads", str(args.threads)]
    out += ["--device", args.device, "--compile-only", str(compile_only)]
    return out + (["--attention", args.attention] if args.attention else [])


COLUMNS = [
    ("framework", "framework"),
    ("images_s", "images/s"),
    ("batch_s", "s / batch (median)"),
    ("range_s", "min–max s"),
    ("n", "runs"),
    ("compile_s", "compile / 1st call s"),
    ("rss_mib", "peak RSS MiB"),
    ("gflops", "GFLOP/s"),
    ("peak_frac", "of peak"),
    ("speedup", "ours faster ×"),
    ("load", "load avg"),
]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        load = harness.load_average()
        out = ours(args) if args.framework == "ours" else diffusers_loop(args)
        harness.emit({**out, "load_before": load})
        return
    header = harness.run_header(sys.argv, args.device)
    env = harness.limit_threads(args.threads)
    if args.device == "gpu":
        env |= harness.gpu_worker_env(0.9)
    frameworks = [f for f in args.frameworks.split(",") if f]
    results: dict[str, list[dict]] = {fw: [] for fw in frameworks}
    for _ in range(args.rounds):
        for fw in frameworks:
            res = harness.run_worker(__file__, worker_args(args, fw), env)
            results[fw].append(res)
            print(f"[{fw}] " + (res.get("error") or f"median {statistics.median(res['times']):.3f} s / batch"))
            print(f"[{fw}] raw {json.dumps(res)}", flush=True)
    ours_ok = [r for r in results.get("ours", []) if "times" in r]
    flops = ours_ok[0].get("flops", 0.0) if ours_ok else 0.0
    peak = statistics.median(r.get("matmul_peak_gflops", 0.0) for r in ours_ok) if ours_ok else 0.0
    rows = []
    for fw in frameworks:
        ok = [r for r in results[fw] if "times" in r]
        if not ok:
            rows.append({"framework": fw, "images_s": None, "load": (results[fw][0].get("error") or "")[:120]})
            continue
        times = [t for r in ok for t in r["times"]]
        med = statistics.median(times)
        rows.append(
            {
                "framework": fw,
                "images_s": args.batch / med,
                "batch_s": med,
                "range_s": f"{min(times):.2f}–{max(times):.2f}",
                "n": len(times),
                "compile_s": statistics.median(r["compile_s"] for r in ok),
                "rss_mib": max(r["rss_mib"] for r in ok),
                "gflops": flops / med / 1e9 if flops else None,
                "peak_frac": flops / med / 1e9 / peak if flops and peak else None,
                "load": "/".join(f"{r['load_before']:.1f}" for r in ok),
            }
        )
    ours_row = next((r for r in rows if r["framework"] == "ours" and r.get("batch_s")), None)
    for r in rows:
        if ours_row and r is not ours_row and r.get("batch_s"):
            r["speedup"] = r["batch_s"] / ours_row["batch_s"]
    text = harness.table(rows, COLUMNS)
    body = f"{text}\n\nDDIM {args.steps} steps, guidance {args.guidance}, batch {args.batch}"
    body += f" (UNet batch {2 * args.batch})."
    if flops:
        body += (
            f" GFLOP/s = {flops / 1e9:.1f} GFLOP per batch (XLA cost analysis of {args.steps} UNet calls at batch"
            f" {2 * args.batch}, the text encoder on {2 * args.batch} prompts and the decoder; credited to both) /"
            " median time per batch"
        )
        body += f"; peak = jnp.dot 2048² f32 in our worker, {peak:.0f} GFLOP/s." if peak else "."
    compile_rows = []
    if args.compile_steps:
        for steps in [int(s) for s in args.compile_steps.split(",")]:
            res = harness.run_worker(__file__, worker_args(args, "ours", compile_only=steps), env)
            compile_rows.append({"steps": steps, "compile_s": res.get("compile_s"), "load": res.get("load_before")})
            print(f"[compile {steps} steps] {res.get('compile_s', res.get('error'))}")
        base = compile_rows[0]["compile_s"]
        for r in compile_rows:
            r["ratio"] = r["compile_s"] / base if base and r["compile_s"] else None
        ctext = harness.table(
            compile_rows,
            [("steps", "DDIM steps"), ("compile_s", "lower+compile s"), ("ratio", "vs first"), ("load", "load avg")],
        )
        body += f"\n\nCompile time of our jitted sampler (one lax.scan) vs step count:\n\n{ctext}"
    print(body)
    if args.results:
        harness.append_section("bench/sample.py", f"{header}\n\n{body}", args.results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "compile": compile_rows, "raw": results, "header": header}, f, indent=1)


if __name__ == "__main__":
    main()

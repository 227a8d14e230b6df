"""Train-step benchmark: latentdiff (JAX) vs diffusers/PyTorch (eager, and torch.compile) with the same architecture.

    python bench/train_step.py --size tiny --stage ldm,ae_rec,ae_gan
    python bench/train_step.py --size small --stage ldm --runs 7
    python bench/train_step.py --device gpu --size paper --stage ldm --frameworks ours,torch --runs 5

Stages (ours -> the peer built here with the same architecture, batch and optimizer):
  ldm     LDMTask.train_step: frozen stage-1 encoder, caption dropout, text encoder + UNet, ε-MSE, AdamW with
          clipping, EMA -> diffusers AutoencoderKL.encode + LDMBertModel + UNet2DConditionModel, torch AdamW, EMA.
  ae_rec  AutoencoderTask.train_step_rec (before disc_start): KL autoencoder, L1 (+ LPIPS for `small`), KL, Adam
          -> diffusers AutoencoderKL (+ lpips.LPIPS with random VGG), torch Adam.
  ae_gan  AutoencoderTask.train_step_gan: + PatchGAN generator loss with the adaptive weight, discriminator hinge
          step -> the same in torch (torch.autograd.grad for the adaptive weight).
Reported per framework: median step time over --runs steps (after warm-up), compile time (ours: lower+compile;
torch: the first step), peak RSS of the worker process, achieved GFLOP/s (FLOPs from XLA's cost analysis of our step,
the same FLOPs credited to both) and its fraction of the machine's measured dense-matmul (CPU) or bf16 (GPU) peak.
Each framework runs in its own subprocess, one after the other, --rounds times.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import statistics
import sys
import time

import harness

STAGES = ("ldm", "ae_rec", "ae_gan")
FRAMEWORKS = ("ours", "torch", "torch_compile")
GPU_PEAK_TFLOPS = 989.0  # H100 SXM dense bf16 (datasheet); the GPU table also gives the measured matmul rate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", help="tiny | small (| paper with --device gpu)")
    p.add_argument("--stage", default="ldm,ae_rec,ae_gan", help=f"comma list of {STAGES}")
    p.add_argument("--frameworks", default="ours,torch", help=f"comma list of {FRAMEWORKS}")
    p.add_argument("--runs", type=int, default=7, help="timed steps per worker (median reported); >= 5")
    p.add_argument("--rounds", type=int, default=1, help="times each framework's worker is run, alternating")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch (XLA uses all cores)")
    p.add_argument("--batch", type=int, default=0, help="override the config's batch size (0 = keep)")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--attention", default="", help="GPU: unet.attention_impl for ours (xla | cudnn; default cudnn)")
    p.add_argument(
        "--peak-gflops",
        type=float,
        default=0.0,
        help="CPU: the dense-matmul peak to compare with (0 = measure jnp.dot 2048² in each JAX worker; noisy when "
        "the machine is shared)",
    )
    p.add_argument(
        "--model-gflops",
        type=float,
        default=0.0,
        help="FLOPs of one step without remat, if already known (skips lowering the no-remat step, which takes "
        "minutes at paper scale; bench/gpu.sh passes the CPU-lowered count recorded in RESULTS.md)",
    )
    p.add_argument(
        "--model-gflops-batch",
        type=int,
        default=0,
        help="the batch size --model-gflops was counted at (scaled linearly to --batch; 0 = the same batch)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        help="after timing, trace this many steps and print where the time goes: ours by XLA op (jax.profiler), "
        "torch on the CPU by aten op (torch.profiler, self CPU time); kind totals and the top ops, also in --json",
    )
    p.add_argument("--no-remat", action="store_true", help="ldm: turn the config's remat off (UNet and text encoder)")
    p.add_argument(
        "--optimizer-single-pass",
        action="store_true",
        help="ldm, ours: AdamW + EMA in one fused pass per leaf instead of three (latentdiff.train.optim; A/B)",
    )
    p.add_argument(
        "--hlo-out",
        default="",
        help="ours: write the compiled step's optimised HLO text here, gzipped (to study fusions and layouts offline; "
        "with several stages the last one's)",
    )
    p.add_argument("--results", default=harness.RESULTS, help="RESULTS.md to append to ('' = do not write)")
    p.add_argument("--json", default="", help="also write all worker results to this JSON file")
    p.add_argument(
        "--ab-groupnorm",
        action="store_true",
        help="instead: our step with flax.linen.GroupNorm+SiLU vs latentdiff.nn.norms in the UNet, in one process, "
        "steps interleaved (wall and CPU time)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--framework", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    for s in args.stage.split(","):
        if s not in STAGES:
            p.error(f"--stage {s!r} is not one of {STAGES}")
    for f in args.frameworks.split(","):
        if f not in FRAMEWORKS:
            p.error(f"--frameworks {f!r} is not one of {FRAMEWORKS}")
    if args.size not in (*harness.SIZES, "paper") or (args.size == "paper" and args.device != "gpu"):
        p.error("--size must be tiny | small, or paper with --device gpu")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Configs per device.


def ldm_config(args: argparse.Namespace):
    if args.size == "paper":
        from latentdiff.config_utils import load_config

        config = load_config(os.path.join(harness.REPO, "configs", "ldm_txt2img_kl8.py") + ":paper")
        config.batch_size = 32
    else:
        config = harness.ldm_config(args.size)
    if args.device == "gpu":
        config.unet.dtype = "bfloat16"
        config.text_encoder.dtype = "bfloat16"
        # cudnn: cuDNN flash attention for the self-attention; the 77-token cross-attention, which cuDNN's backward
        # does not take, stays on XLA (latentdiff.nn.attention.kernel_for). H100: 166 vs 182 ms per paper step.
        config.unet.attention_impl = args.attention or "cudnn"
    if args.batch:
        config.batch_size = args.batch
    if args.no_remat:
        config.unet.remat = False
        config.text_encoder.remat = False
    return config


def ae_config(args: argparse.Namespace):
    config = harness.ae_config("small" if args.size == "paper" else args.size)
    if args.size == "small":
        config.loss.perceptual_weight = 1.0  # LPIPS (random VGG weights: the cost is what matters here)
    if args.device == "gpu":
        config.autoencoder.dtype = "bfloat16"
        config.discriminator.dtype = "bfloat16"
        config.loss.lpips_dtype = "bfloat16"
    if args.batch:
        config.batch_size = args.batch
    return config


# ---------------------------------------------------------------------------------------------------------------
# Our side.


def _jax_step_result(
    step, state, batch_args, runs: int, model_flops: float, device: str, profile_steps: int = 0, hlo_out: str = ""
) -> dict:
    import jax

    t0 = time.perf_counter()
    lowered = step.lower(state, *batch_args(0))
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    if hlo_out:
        with gzip.open(hlo_out, "wt") as f:
            f.write(compiled.as_text())
    flops = harness.xla_flops(compiled) or float((lowered.cost_analysis() or {}).get("flops", 0.0))
    memory = compiled.memory_analysis()  # device buffers XLA assigned: what a larger batch would need
    memory_gib = (
        {k: getattr(memory, f"{k}_size_in_bytes") / 2**30 for k in ("argument", "output", "alias", "temp")}
        if memory is not None
        else None
    )
    holder = {"state": state, "i": 0}

    def one() -> None:
        holder["i"] += 1
        holder["state"], metrics = compiled(holder["state"], *batch_args(holder["i"]))
        jax.block_until_ready(metrics)

    times = harness.time_runs(one, runs, warmup=2)
    profile = harness.op_profile(one, compiled.as_text(), profile_steps) if profile_steps else None
    peak = harness.matmul_peak_gflops() if device == "cpu" else 0.0
    return {
        "profile": profile,
        "compile_s": compile_s,
        "times": times,
        "flops": flops,
        "model_flops": model_flops or flops,
        "matmul_peak_gflops": peak,
        "rss_mib": harness.peak_rss_mib(),
        "memory_gib": memory_gib,
        "backend": jax.default_backend(),
    }


def _model_flops(make_step, config, state, batch_args) -> float:
    """FLOPs of the step without rematerialisation (XLA cost analysis of the lowered, unoptimised HLO)."""
    if not (config.get("unet") is not None and config.unet.remat):
        return 0.0
    config = config.copy_and_resolve_references()
    config.unet.remat = False
    config.text_encoder.remat = False
    step = make_step(config)
    try:  # the unoptimised HLO's cost analysis exists on CPU; some GPU builds return None (then 0: use the compiled)
        return float((step.lower(state, *batch_args(0)).cost_analysis() or {}).get("flops", 0.0))
    except Exception:
        return 0.0


def ours_ldm(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from latentdiff.first_stage import FirstStage, abstract_autoencoder_variables
    from latentdiff.nn.autoencoder import build_autoencoder
    from latentdiff.train.ldm import LDMState, LDMTask

    config = ldm_config(args)
    ae_cfg = harness.stage1_for(config)
    first_stage_variables = harness.random_like(abstract_autoencoder_variables(ae_cfg), seed=1)
    first_stage = FirstStage(config=ae_cfg, module=build_autoencoder(ae_cfg), variables=first_stage_variables)
    # GPU: the frozen encoder in bf16 (config.first_stage.dtype), as diffusers' vae.encode under bf16 autocast
    first_stage = first_stage.with_compute_dtype("bfloat16" if args.device == "gpu" else "")
    null = np.zeros((config.text_encoder.max_length,), np.int32)

    def make_task(c):
        task = LDMTask(c, first_stage, null, 0.18215)
        if args.optimizer_single_pass:
            task.tx = dataclasses.replace(task.tx, single_pass=True)
        return task

    task = make_task(config)
    abstract = jax.eval_shape(task.init_state, jax.random.key(0))
    params = jax.device_put(harness.random_like(abstract.params, seed=0))
    state = LDMState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=jax.jit(task.tx.init)(params),
        ema_params=jax.tree.map(jnp.copy, params),
        scale_factor=jnp.float32(0.18215),
        nonfinite_count=jnp.zeros((), jnp.int32),
        nonfinite_streak=jnp.zeros((), jnp.int32),
    )
    b, r = config.batch_size, config.data.resolution
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.uniform(-1, 1, (b, r, r, 3)).astype(np.float32)),
        "tokens": jnp.asarray(rng.integers(1, config.text_encoder.vocab_size, (b, config.text_encoder.max_length))),
    }
    first_stage_variables = jax.device_put(first_stage_variables)
    batch_args = lambda i: (batch, jax.random.key(i), first_stage_variables)
    make_step = lambda c: jax.jit(make_task(c).train_step, donate_argnums=0)
    known = args.model_gflops * 1e9 * b / (args.model_gflops_batch or b)  # scaled to this step's batch
    model_flops = known or _model_flops(make_step, config, abstract, batch_args)
    out = _jax_step_result(
        make_step(config), state, batch_args, args.runs, model_flops, args.device, args.profile, args.hlo_out
    )
    out["params_m"] = harness.count_params(abstract.params) / 1e6
    out["batch"] = b
    return out


def ours_ae(args: argparse.Namespace, gan: bool) -> dict:
    import jax
    import numpy as np

    from latentdiff.nn.lpips import abstract_lpips_params
    from latentdiff.train.autoencoder import AutoencoderTask

    config = ae_config(args)
    task = AutoencoderTask(config)
    abstract = jax.eval_shape(task.init_state, jax.random.key(0))
    filled = harness.random_like(abstract, seed=0)
    opt_states = {"gen_opt_state": task.gen_tx.init(filled.gen_params)}
    opt_states["disc_opt_state"] = task.disc_tx.init(filled.disc_params)
    state = jax.device_put(filled.replace(**opt_states))
    lpips = jax.device_put(harness.random_like(abstract_lpips_params(), 2)) if config.loss.perceptual_weight else None
    b, r = config.batch_size, config.autoencoder.resolution
    batch = {"image": jax.device_put(np.random.default_rng(0).uniform(-1, 1, (b, r, r, 3)).astype(np.float32))}
    fn = task.train_step_gan if gan else task.train_step_rec
    batch_args = lambda i: (batch, jax.random.key(i), lpips)
    step = jax.jit(fn, donate_argnums=0)
    out = _jax_step_result(step, state, batch_args, args.runs, 0.0, args.device, args.profile, args.hlo_out)
    out["params_m"] = harness.count_params(abstract.gen_params) / 1e6
    out["batch"] = b
    return out


# ---------------------------------------------------------------------------------------------------------------
# The PyTorch / diffusers peer.


def torch_patchgan(cfg, torch):
    """The PatchGAN of latentdiff/nn/discriminator.py (taming NLayerDiscriminator) in torch."""
    nn = torch.nn
    ndf, n_layers = cfg.ndf, cfg.n_layers
    layers = [nn.Conv2d(cfg.in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
    for n in range(1, n_layers + 1):
        stride = 2 if n < n_layers else 1
        cin, cout = ndf * min(2 ** (n - 1), 8), ndf * min(2**n, 8)
        layers += [nn.Conv2d(cin, cout, 4, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
    layers.append(nn.Conv2d(ndf * min(2**n_layers, 8), 1, 4, 1, 1))
    return nn.Sequential(*layers)


def _torch_timed(step, runs: int, device, compiled: bool, profile_steps: int) -> dict:
    t0 = time.perf_counter()
    step()
    harness.torch_sync(device)
    first = time.perf_counter() - t0

    def one() -> None:
        step()
        harness.torch_sync(device)

    times = harness.time_runs(one, runs, warmup=2 if compiled else 1)
    profile = harness.torch_op_profile(one, profile_steps) if profile_steps and device.type == "cpu" else None
    return {"compile_s": first, "times": times, "rss_mib": harness.peak_rss_mib(), "profile": profile}


def torch_ldm(args: argparse.Namespace, compiled: bool) -> dict:
    device = harness.torch_setup(args.threads, args.device)
    import numpy as np
    import torch

    config = ldm_config(args)
    unet, text, vae = harness.torch_models(config, device, torch.float32)
    vae.requires_grad_(False).eval()
    unet.train()
    text.train()
    if config.unet.remat:  # the same memory/compute trade as our remat
        unet.enable_gradient_checkpointing()
    if config.text_encoder.remat and getattr(text, "supports_gradient_checkpointing", False):
        text.gradient_checkpointing_enable()
    trainable = [*unet.parameters(), *text.parameters()]
    o = config.optim
    opt = torch.optim.AdamW(trainable, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    ema = [p.detach().clone() for p in trainable]
    unet_fn = torch.compile(unet) if compiled else unet
    text_fn = torch.compile(text) if compiled else text
    alphas = torch.tensor(harness.ddim_alphas(config), dtype=torch.float32, device=device)
    b, r, length = config.batch_size, config.data.resolution, config.text_encoder.max_length
    gen = np.random.default_rng(0)
    images = torch.tensor(gen.uniform(-1, 1, (b, 3, r, r)), dtype=torch.float32, device=device)
    tokens = torch.tensor(gen.integers(1, config.text_encoder.vocab_size, (b, length)), device=device)
    null = torch.zeros_like(tokens)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "gpu")

    def step() -> None:
        with torch.no_grad(), autocast:
            z0 = vae.encode(images).latent_dist.sample().float() * 0.18215
        drop = torch.rand(b, device=device) < config.diffusion.p_uncond
        cond = torch.where(drop[:, None], null, tokens)
        t = torch.randint(0, config.diffusion.timesteps, (b,), device=device)
        noise = torch.randn_like(z0)
        a = alphas[t][:, None, None, None]
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with autocast:
            context = text_fn(cond).last_hidden_state
            out = unet_fn(z_t, t, encoder_hidden_states=context).sample
        loss = torch.mean((out.float() - noise) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, o.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in trainable], 1.0 - config.ema.decay)

    out = _torch_timed(step, args.runs, device, compiled, args.profile)
    out["params_m"] = harness.torch_params([unet, text]) / 1e6
    return out


def torch_ae(args: argparse.Namespace, gan: bool, compiled: bool) -> dict:
    device = harness.torch_setup(args.threads, args.device)
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from latentdiff.convert.diffusers_vae import diffusers_config

    config = ae_config(args)
    torch.manual_seed(0)
    ae = AutoencoderKL(**diffusers_config(config.autoencoder)).to(device).train()
    disc = torch_patchgan(config.discriminator, torch).to(device).train()
    logvar = torch.nn.Parameter(torch.zeros((), device=device))
    lp = None
    if config.loss.perceptual_weight > 0:
        import lpips

        lp = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).to(device).eval()
        lp.requires_grad_(False)
    o, od = config.optim, config.disc_optim
    opt_g = torch.optim.Adam([*ae.parameters(), logvar], lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    opt_d = torch.optim.Adam(disc.parameters(), lr=od.lr, betas=(od.b1, od.b2), eps=od.eps)
    last = ae.decoder.conv_out.weight
    if compiled:
        ae.encoder, ae.decoder = torch.compile(ae.encoder), torch.compile(ae.decoder)
    disc_fn = torch.compile(disc) if compiled else disc
    b, r = config.batch_size, config.autoencoder.resolution
    x = torch.tensor(np.random.default_rng(0).uniform(-1, 1, (b, 3, r, r)), dtype=torch.float32, device=device)
    loss_cfg = config.loss
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "gpu")

    def step() -> None:
        with autocast:
            posterior = ae.encode(x).latent_dist
            x_rec = ae.decode(posterior.sample()).sample.float()
            rec = torch.abs(x - x_rec)
            if lp is not None:
                rec = rec + loss_cfg.perceptual_weight * lp(x, x_rec).float()
        nll = torch.sum(rec / torch.exp(logvar) + logvar) / b
        kl = torch.sum(posterior.kl()) / b
        loss = nll + loss_cfg.kl_weight * kl
        if gan:
            with autocast:
                g_loss = -torch.mean(disc_fn(x_rec).float())
            g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
            g_g = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
            d_weight = torch.clamp(torch.norm(g_nll) / (torch.norm(g_g) + 1e-4), 0.0, 1e4).detach()
            loss = loss + d_weight * loss_cfg.disc_weight * loss_cfg.disc_factor * g_loss
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        if gan:
            with autocast:
                real = disc_fn(x).float()
                fake = disc_fn(x_rec.detach()).float()
            d_loss = 0.5 * (torch.mean(torch.relu(1.0 - real)) + torch.mean(torch.relu(1.0 + fake)))
            opt_d.zero_grad(set_to_none=True)
            (loss_cfg.disc_factor * d_loss).backward()
            opt_d.step()

    out = _torch_timed(step, args.runs, device, compiled, args.profile)
    out["params_m"] = harness.torch_params([ae]) / 1e6
    return out


def worker(args: argparse.Namespace) -> dict:
    stage, fw = args.stage, args.framework
    if fw == "ours":
        import latentdiff  # noqa: F401  (applies the XLA CPU flags before JAX starts)

        return ours_ldm(args) if stage == "ldm" else ours_ae(args, gan=stage == "ae_gan")
    compiled = fw == "torch_compile"
    return torch_ldm(args, compiled) if stage == "ldm" else torch_ae(args, stage == "ae_gan", compiled)


def ab_groupnorm(args: argparse.Namespace) -> str:
    """Our train step twice — UNet GroupNorms as flax.linen.GroupNorm + SiLU (autodiff backward) and as
    latentdiff.nn.norms.GroupNorm (closed-form backward, fused SiLU) — steps interleaved. Returns a table."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import latentdiff  # noqa: F401
    import latentdiff.nn.unet as unet_module

    def flax_group_norm(x: jax.Array, name: str, activation: str) -> jax.Array:
        gn = nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, name=name)
        y = gn(x).astype(x.dtype)
        return nn.silu(y) if activation == "silu" else y

    global _jax_step_result, _model_flops
    saved = (_jax_step_result, _model_flops, unet_module._group_norm)
    captured: dict = {}

    def capture(step, state, batch_args, runs, model_flops, device) -> dict:
        t0 = time.perf_counter()
        captured["compiled"] = step.lower(state, *batch_args(0)).compile()
        captured.update(compile_s=time.perf_counter() - t0, state=state, batch_args=batch_args)
        return {}

    variants = {}
    _jax_step_result, _model_flops = capture, lambda *a: 0.0
    try:
        for name, fn in (("flax GroupNorm + SiLU", flax_group_norm), ("latentdiff.nn.norms", saved[2])):
            unet_module._group_norm = fn
            if args.stage == "ldm":
                ours_ldm(args)
            else:
                ours_ae(args, gan=args.stage == "ae_gan")
            variants[name] = dict(captured)
    finally:
        _jax_step_result, _model_flops, unet_module._group_norm = saved
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.runs + 1):  # the first round is warm-up
        for k, v in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            v["state"], metrics = v["compiled"](v["state"], *v["batch_args"](i))
            jax.block_until_ready(metrics)
            if i:
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    rows = [
        {
            "variant": k,
            "wall": statistics.median(wall[k]) * 1e3,
            "range": f"{min(wall[k]) * 1e3:.0f}–{max(wall[k]) * 1e3:.0f}",
            "cpu": statistics.median(cpu[k]) * 1e3,
            "compile": variants[k]["compile_s"],
        }
        for k in variants
    ]
    cols = [("variant", "UNet GroupNorm"), ("wall", "step ms (median)"), ("range", "min–max ms")]
    cols += [("cpu", "CPU ms (median)"), ("compile", "compile s")]
    return harness.table(rows, cols) + f"\n\n{args.runs} interleaved steps each; load average {harness.load_average()}."


# ---------------------------------------------------------------------------------------------------------------
# Parent: run the workers, print and record the table.


def worker_args(args: argparse.Namespace, stage: str, fw: str) -> list[str]:
    out = ["--size", args.size, "--stage", stage, "--framework", fw, "--runs", str(args.runs)]
    out += ["--threads", str(args.threads), "--device", args.device, "--batch", str(args.batch)]
    out += ["--model-gflops", str(args.model_gflops), "--model-gflops-batch", str(args.model_gflops_batch)]
    out += ["--profile", str(args.profile)]
    # The worker runs in the repository: a relative path is the caller's.
    out += ["--hlo-out", os.path.abspath(args.hlo_out)] if args.hlo_out and fw == "ours" else []
    out += ["--no-remat"] if args.no_remat else []
    out += ["--optimizer-single-pass"] if args.optimizer_single_pass else []
    return out + (["--attention", args.attention] if args.attention else [])


def row_for(stage: str, fw: str, results: list[dict], flops: float, peak_gflops: float, base: float | None) -> dict:
    ok = [r for r in results if "times" in r]
    if not ok:
        return {"stage": stage, "framework": fw, "note": results[0].get("error", "failed")[:160] if results else ""}
    times = [t for r in ok for t in r["times"]]
    med = statistics.median(times)
    gflops = flops / med / 1e9 if flops else None
    row = {
        "stage": stage,
        "framework": fw,
        "params_m": ok[0].get("params_m"),
        "step_ms": med * 1e3,
        "range_ms": f"{min(times) * 1e3:.0f}–{max(times) * 1e3:.0f}",
        "n": len(times),
        "compile_s": statistics.median(r["compile_s"] for r in ok),
        "rss_mib": max(r["rss_mib"] for r in ok),
        "gflops": gflops,
        "peak_frac": gflops / peak_gflops if gflops and peak_gflops else None,
        "speedup": base / med if base else None,
        "load": "/".join(f"{r['load_before']:.1f}" for r in ok),
    }
    return row


COLUMNS = [
    ("stage", "stage"),
    ("framework", "framework"),
    ("params_m", "params (M)"),
    ("step_ms", "step ms (median)"),
    ("range_ms", "min–max ms"),
    ("n", "runs"),
    ("compile_s", "compile / 1st step s"),
    ("rss_mib", "peak RSS MiB"),
    ("gflops", "GFLOP/s"),
    ("peak_frac", "of peak"),
    ("speedup", "ours faster ×"),
    ("load", "load avg"),
]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        out = worker(args)
        out["load_before"] = harness.load_average()
        harness.emit(out)
        return
    header = harness.run_header(sys.argv, args.device)
    if args.ab_groupnorm:
        args.stage = args.stage.split(",")[0]
        text = ab_groupnorm(args)
        print(text)
        if args.results:
            harness.append_section("latentdiff/nn/norms.py (GroupNorm A/B)", f"{header}\n\n{text}", args.results)
        return
    frameworks = args.frameworks.split(",")
    env = harness.limit_threads(args.threads)
    if args.device == "gpu":
        env |= harness.gpu_worker_env(0.9)
    rows, raw = [], {}
    for stage in args.stage.split(","):
        results: dict[str, list[dict]] = {fw: [] for fw in frameworks}
        for _ in range(args.rounds):
            for fw in frameworks:
                res = harness.run_worker(__file__, worker_args(args, stage, fw), env)
                results[fw].append(res)
                print(f"[{stage} {fw}] " + (res.get("error") or f"median {statistics.median(res['times']):.4f} s"))
                if res.get("profile"):
                    print(f"[{stage} {fw}] where the time goes:\n" + harness.op_profile_text(res["profile"]))
                brief = {k: v for k, v in res.items() if k != "profile"}  # the per-op table goes to --json only
                print(f"[{stage} {fw}] raw {json.dumps(brief)}", flush=True)
        raw[stage] = results
        ours_ok = [r for r in results.get("ours", []) if "times" in r]
        flops = ours_ok[0]["model_flops"] if ours_ok else 0.0
        if args.device == "cpu":
            measured = statistics.median(r["matmul_peak_gflops"] for r in ours_ok) if ours_ok else 0.0
            peak = args.peak_gflops or measured
        else:
            peak = GPU_PEAK_TFLOPS * 1e3
        stage_rows = {fw: row_for(stage, fw, results[fw], flops, peak, None) for fw in frameworks}
        ours_ms = stage_rows.get("ours", {}).get("step_ms")
        for fw in frameworks:
            r = stage_rows[fw]
            if fw != "ours" and ours_ms and r.get("step_ms"):
                r["speedup"] = r["step_ms"] / ours_ms
            rows.append(r)
        if ours_ok:
            print(f"[{stage}] XLA cost analysis: {flops / 1e9:.2f} GFLOP/step; peak used: {peak:.1f} GFLOP/s")
        raw[stage + "_peak_gflops"] = peak
        raw[stage + "_flops"] = flops
    text = harness.table(rows, COLUMNS)
    print(text)
    peak_note = (
        (
            f"matmul peak = {args.peak_gflops:.0f} GFLOP/s (given)"
            if args.peak_gflops
            else "matmul peak = jnp.dot 2048² f32 measured in each stage's JAX worker"
        )
        if args.device == "cpu"
        else f"peak = {GPU_PEAK_TFLOPS:.0f} TFLOP/s (H100 SXM dense bf16 datasheet)"
    )
    notes = (
        f"GFLOP/s = XLA cost-analysis FLOPs of our step (without remat) / median step time, credited to both "
        f"frameworks; {peak_note}. `ours faster ×` = peer step time / our step time. Load avg = 1-min load at "
        f"each worker's start. Torch threads: {args.threads}."
    )
    if args.results:
        harness.append_section("bench/train_step.py", f"{header}\n\n{text}\n\n{notes}", args.results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "raw": raw, "header": header}, f, indent=1, default=str)


if __name__ == "__main__":
    main()

"""Stage 1: the perceptual autoencoder (KL-f or VQ-f) trained with L1 + LPIPS + PatchGAN (DESIGN.md §4).

Two loss functions and two optax states — generator and discriminator — updated in one pure jitted step:
  generator:     nll + kl_weight·KL (or codebook_weight·VQ loss) + d_weight·disc_factor·(−mean D(x̂))
                 d_weight = clip(‖∇_L nll‖ / (‖∇_L g‖ + 1e-4), 0, 1e4)·disc_weight, L = decoder's last conv kernel
  discriminator: disc_factor·hinge(D(x), D(sg(x̂)))
Before `disc_start` a `lax.cond` takes the branch without the discriminator (it is not evaluated at all).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from latentdiff import config_utils, parallel
from latentdiff.errors import UserError
from latentdiff.imaging import to_uint8
from latentdiff.nn.autoencoder import build_autoencoder, last_layer_path
from latentdiff.nn.discriminator import NLayerDiscriminator
from latentdiff.nn.lpips import lpips_distance
from latentdiff.train import ae_losses, loop, optim, step_parts


@flax.struct.dataclass
class AEState:
    step: jax.Array
    gen_params: Any  # {'autoencoder': ..., 'logvar': []}
    gen_opt_state: Any
    disc_params: Any
    disc_batch_stats: Any
    disc_opt_state: Any
    model_state: Any  # the autoencoder's non-param collections (VQ EMA codebook stats); {} for KL
    nonfinite_count: jax.Array
    nonfinite_streak: jax.Array


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """PSNR in dB of images in [-1, 1] (data range 2), averaged over the batch."""
    mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))
    return jnp.mean(10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)))


def build_discriminator(cfg: ml_collections.ConfigDict) -> NLayerDiscriminator:
    return NLayerDiscriminator(
        in_channels=cfg.in_channels,
        ndf=cfg.ndf,
        n_layers=cfg.n_layers,
        use_batchnorm=cfg.use_batchnorm,
        dtype=step_parts.compute_dtype(cfg.dtype),
    )


def check_images(images: np.ndarray, cfg: ml_collections.ConfigDict) -> None:
    """A batch of the wrong size or channel count is a one-line error before anything compiles."""
    want = (cfg.resolution, cfg.resolution, cfg.in_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise UserError(
            f"autoencoder expects images [B, {want[0]}, {want[1]}, {want[2]}], got {tuple(images.shape)}; "
            "set data.resolution / autoencoder.resolution to match"
        )


class AutoencoderTask:
    """Builds the pure init/step functions of stage 1 from a config."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        self.config = config
        self.ae_cfg = config.autoencoder
        self.kind = config.autoencoder.kind
        self.ae = build_autoencoder(config.autoencoder)
        self.disc = build_discriminator(config.discriminator)
        self.gen_tx = optim.make_optimizer(config.optim, config.num_train_steps)
        self.disc_tx = optim.make_optimizer(config.disc_optim, config.num_train_steps)
        self.lpips_dtype = step_parts.compute_dtype(config.loss.lpips_dtype)

    # ----- init -----
    def init_state(self, rng: jax.Array) -> AEState:
        r = self.ae_cfg.resolution
        x = jnp.zeros((1, r, r, self.ae_cfg.in_channels), jnp.float32)
        k_ae, k_disc, k_sample = jax.random.split(rng, 3)
        if self.kind == "kl":
            variables = self.ae.init({"params": k_ae}, x, k_sample, True, False)
        else:
            variables = self.ae.init({"params": k_ae}, x, False)
        variables = dict(variables)
        ae_params = variables.pop("params")
        gen_params = {"autoencoder": ae_params, "logvar": jnp.asarray(self.config.loss.logvar_init, jnp.float32)}
        disc_vars = self.disc.init({"params": k_disc}, x, False)
        return AEState(
            step=jnp.zeros((), jnp.int32),
            gen_params=gen_params,
            gen_opt_state=self.gen_tx.init(gen_params),
            disc_params=disc_vars["params"],
            disc_batch_stats=disc_vars.get("batch_stats", {}),
            disc_opt_state=self.disc_tx.init(disc_vars["params"]),
            model_state=variables,
            nonfinite_count=jnp.zeros((), jnp.int32),
            nonfinite_streak=jnp.zeros((), jnp.int32),
        )

    # ----- forward pieces -----
    def reconstruct(
        self, gen_params: Any, model_state: Any, x: jax.Array, rng: jax.Array, train: bool
    ) -> tuple[jax.Array, jax.Array, dict, Any]:
        """-> (x_rec, regulariser loss (KL or VQ, already weighted), metrics, new model_state)."""
        k_sample, k_drop = jax.random.split(rng)
        variables = {"params": gen_params["autoencoder"], **model_state}
        rngs = {"dropout": k_drop}
        if self.kind == "kl":
            x_rec, posterior = self.ae.apply(variables, x, k_sample, train, train, rngs=rngs)
            kl = ae_losses.kl_loss(posterior.kl())
            return x_rec, self.config.loss.kl_weight * kl, {"kl": kl}, model_state
        mutable = ["vq_stats"] if (train and self.ae_cfg.ema_codebook) else []
        out = self.ae.apply(variables, x, train, rngs=rngs, mutable=mutable)
        (x_rec, q), new_state = out if mutable else (out, model_state)
        metrics = {"vq_loss": q.loss, "codebook_usage": q.usage, "perplexity": q.perplexity}
        return x_rec, self.config.loss.codebook_weight * q.loss, metrics, dict(new_state)

    def perceptual(self, lpips_params: Any | None, x: jax.Array, x_rec: jax.Array) -> jax.Array:
        """Per-example LPIPS [B] with frozen weights; zeros when the perceptual loss is off (lpips_params None)."""
        if lpips_params is None:
            return jnp.zeros((x.shape[0],), jnp.float32)
        return lpips_distance(lpips_params, x, x_rec, dtype=self.lpips_dtype)

    def disc_logits(self, disc_params: Any, batch_stats: Any, x: jax.Array) -> tuple[jax.Array, Any]:
        out, updates = self.disc.apply(
            {"params": disc_params, "batch_stats": batch_stats}, x, True, mutable=["batch_stats"]
        )
        return out, updates.get("batch_stats", batch_stats)

    # ----- the step -----
    def step_for(self, step: int) -> Any:
        """The step function for a given step: without the discriminator before disc_start, with it after.

        Two compiled functions rather than one `lax.cond`: XLA:CPU runs convolutions inside a conditional ~30x slower
        (measured with jaxlib 0.10.2, see bench/RESULTS.md), and the branch not taken would still cost compile time.
        """
        return self.train_step_gan if step >= self.config.loss.disc_start else self.train_step_rec

    def train_step_rec(self, state: AEState, batch: dict, rng: jax.Array, lpips_params: Any | None) -> tuple:
        """Reconstruction + regulariser only (before disc_start); the discriminator is not evaluated."""
        return self._train_step(state, batch, rng, lpips_params, use_disc=False)

    def train_step_gan(self, state: AEState, batch: dict, rng: jax.Array, lpips_params: Any | None) -> tuple:
        """Full generator + discriminator update (from disc_start)."""
        return self._train_step(state, batch, rng, lpips_params, use_disc=True)

    def _train_step(
        self, state: AEState, batch: dict, rng: jax.Array, lpips_params: Any | None, use_disc: bool
    ) -> tuple[AEState, dict]:
        cfg_loss = self.config.loss
        x = batch["image"]

        def reconstruction_terms(gen_params: Any) -> tuple[jax.Array, tuple]:
            """nll + regulariser, and aux (x_rec, regulariser metrics, new model state, mean LPIPS, nll)."""
            x_rec, reg, reg_metrics, new_model_state = self.reconstruct(gen_params, state.model_state, x, rng, True)
            p = self.perceptual(lpips_params, x, x_rec)
            nll = ae_losses.reconstruction_nll(x, x_rec, p, cfg_loss.perceptual_weight, gen_params["logvar"])
            return nll + reg, (x_rec, reg_metrics, new_model_state, jnp.mean(p), nll)

        def with_disc() -> tuple:
            def losses(gen_params: Any) -> tuple[tuple[jax.Array, jax.Array], tuple]:
                main, aux = reconstruction_terms(gen_params)
                logits_fake, _ = self.disc_logits(state.disc_params, state.disc_batch_stats, aux[0])
                return (main, ae_losses.generator_adv_loss(logits_fake)), aux

            factor = jnp.float32(cfg_loss.disc_factor)
            path = ("autoencoder", *last_layer_path(self.kind))
            grads, d_weight, main, g_loss, aux = ae_losses.weighted_generator_grads(
                losses, state.gen_params, path, cfg_loss.disc_weight, factor
            )
            x_rec = jax.lax.stop_gradient(aux[0])

            def d_loss_fn(disc_params: Any) -> tuple[jax.Array, tuple]:
                real, stats = self.disc_logits(disc_params, state.disc_batch_stats, x)
                fake, stats = self.disc_logits(disc_params, stats, x_rec)
                d_fn = ae_losses.hinge_d_loss if cfg_loss.disc_loss == "hinge" else ae_losses.vanilla_d_loss
                return factor * d_fn(real, fake), (stats, jnp.mean(real), jnp.mean(fake))

            (d_loss, (new_stats, real_mean, fake_mean)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
                state.disc_params
            )
            metrics = {"g_loss": g_loss, "d_weight": d_weight, "disc_loss": d_loss}
            metrics |= {"logits_real": real_mean, "logits_fake": fake_mean}
            return main, aux, grads, d_grads, new_stats, metrics

        def without_disc() -> tuple:
            (main, aux), grads = jax.value_and_grad(reconstruction_terms, has_aux=True)(state.gen_params)
            zero = jnp.zeros((), jnp.float32)
            metrics = {"g_loss": zero, "d_weight": zero, "disc_loss": zero, "logits_real": zero, "logits_fake": zero}
            return main, aux, grads, {}, state.disc_batch_stats, metrics

        main, aux, grads, d_grads, new_stats, metrics = with_disc() if use_disc else without_disc()
        x_rec, reg_metrics, new_model_state, lpips_mean, nll = aux

        grad_norm = step_parts.global_norm(grads)
        d_grad_norm = step_parts.global_norm(d_grads)
        finite = step_parts.all_finite(main, grad_norm + d_grad_norm)
        gen_params, gen_opt_state, _ = self.gen_tx.apply(
            grads, state.gen_opt_state, state.gen_params, grad_norm, finite
        )
        if use_disc:
            disc_params, disc_opt_state, _ = self.disc_tx.apply(
                d_grads, state.disc_opt_state, state.disc_params, d_grad_norm, finite
            )
        else:  # before disc_start the discriminator (and its Adam moments) do not move at all
            disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
        disc_batch_stats, model_state = step_parts.select_tree(
            finite, (new_stats, new_model_state), (state.disc_batch_stats, state.model_state)
        )
        count, streak = step_parts.count_skips(finite, state.nonfinite_count, state.nonfinite_streak)
        new_state = AEState(
            state.step + 1,
            gen_params,
            gen_opt_state,
            disc_params,
            disc_batch_stats,
            disc_opt_state,
            model_state,
            count,
            streak,
        )
        metrics = {
            "loss": main,
            "nll": nll,
            "l1": jnp.mean(jnp.abs(x - x_rec)),
            "lpips": lpips_mean,
            "psnr": psnr(x, x_rec),
            "logvar": state.gen_params["logvar"],
            "grad_norm": grad_norm,
            "update_skipped": 1.0 - finite.astype(jnp.float32),
            **reg_metrics,
            **metrics,
        }
        return new_state, loop.scalar_metrics(**metrics)

    # ----- evaluation -----
    def reconstruct_eval(self, state: AEState, x: jax.Array) -> jax.Array:
        """Deterministic reconstruction (posterior mode / quantised, no dropout)."""
        variables = {"params": state.gen_params["autoencoder"], **state.model_state}
        if self.kind == "kl":
            return self.ae.apply(variables, x, None, False, False)[0]
        return self.ae.apply(variables, x, False)[0]


def lpips_params_for(config: ml_collections.ConfigDict) -> Any | None:
    """Loads the frozen LPIPS weights when the perceptual loss is on (a clear error if they are missing)."""
    if config.loss.perceptual_weight <= 0:
        return None
    from latentdiff.convert.lpips_weights import require_lpips_params

    return require_lpips_params(config.loss.lpips_weights)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> AEState:
    """Trains stage 1 on config.data; checkpoints, logs and reconstruction grids go to `workdir`."""
    from latentdiff.data import input_pipeline

    parallel.init_distributed(
        config.distributed.coordinator,
        config.distributed.num_processes,
        config.distributed.process_id,
        timeout_s=config.distributed.timeout_s,
    )
    mesh = parallel.make_mesh(dict(config.mesh))
    lpips_params = lpips_params_for(config)
    if lpips_params is not None:
        lpips_params = jax.device_put(lpips_params, parallel.replicated(mesh))
    task = AutoencoderTask(config)

    def make_iter(split: str, train: bool) -> Any:
        return input_pipeline.make_dataset(
            config.data,
            split=split,
            tokenizer=None,
            global_batch_size=config.batch_size * config.grad_accum_steps if train else config.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            seed=config.seed,
            train=train,
        )

    eval_batches = _first_batches(make_iter(config.data.eval_split, False), config.num_eval_batches)
    for b in eval_batches:
        check_images(b["image"], config.autoencoder)
    recon = jax.jit(task.reconstruct_eval)
    lpips_eval = jax.jit(task.perceptual)
    eval_lpips_params = lpips_params
    if eval_lpips_params is None and config.evaluation.lpips_weights:  # LPIPS reported without the perceptual loss
        from latentdiff.convert.lpips_weights import require_lpips_params

        eval_lpips_params = jax.device_put(
            require_lpips_params(config.evaluation.lpips_weights), parallel.replicated(mesh)
        )

    rfid = None
    if config.evaluation.inception_weights:  # the originals go to the host only when rFID is computed
        originals = [loop.fetch(parallel.host_to_global({"image": b["image"]}, mesh)["image"]) for b in eval_batches]
        rfid = make_rfid(config.evaluation, [to_uint8(x) for x in originals])

    def evaluate(state: AEState) -> dict[str, float]:
        start = time.perf_counter()
        values = {"psnr": [], "lpips": []}
        reconstructions = []
        for b in eval_batches:
            x = parallel.host_to_global({"image": b["image"]}, mesh)["image"]
            x_rec = recon(state, x)
            values["psnr"].append(float(psnr(x, x_rec)))
            if eval_lpips_params is not None:
                values["lpips"].append(float(jnp.mean(lpips_eval(eval_lpips_params, x, x_rec))))
            if rfid is not None:
                reconstructions.append(to_uint8(loop.fetch(x_rec)))
        scores = {k: float(np.mean(v)) for k, v in values.items() if v}
        if rfid is not None:
            scores["rfid"] = rfid(np.concatenate(reconstructions))
        return scores | {"seconds": time.perf_counter() - start}

    def write_images(state: AEState, step: int, out_dir: str) -> None:
        b = eval_batches[0]
        x = parallel.host_to_global({"image": b["image"]}, mesh)["image"]
        x_rec = loop.fetch(recon(state, x))
        if jax.process_index() == 0:
            from latentdiff.imaging import save_pairs_grid

            os.makedirs(out_dir, exist_ok=True)
            x_host = loop.fetch(x)
            save_pairs_grid(to_uint8(x_host[:16]), to_uint8(x_rec[:16]), os.path.join(out_dir, f"recon_{step:07d}.png"))

    if config.grad_accum_steps != 1:
        raise UserError("grad_accum_steps > 1 is not supported for the GAN stage (d_weight needs whole-batch grads)")
    loop_task = loop.Task(
        init_state=task.init_state,
        step_for=task.step_for,
        batch_keys=("image",),
        constants=lpips_params,
        write_images=write_images,
        evaluate=evaluate,
    )
    state = loop.run(config, workdir, loop_task, lambda: make_iter(config.data.train_split, True), mesh)
    final = evaluate(state)
    if jax.process_index() == 0:
        report = {"step": int(jax.device_get(state.step)), **final}
        config_utils.atomic_write_text(os.path.join(workdir, "eval.json"), json.dumps(report, indent=2))
    return state


def make_rfid(evaluation: ml_collections.ConfigDict, originals: list[np.ndarray]) -> Any:
    """rfid(reconstructions uint8 [N, H, W, 3]) -> FID against `originals` (uint8 [n_i, H, W, 3], the validation
    batches; their Inception statistics computed once, here) with evaluation.inception_weights."""
    from latentdiff.evaluation import fid

    params = fid.load_inception_weights(evaluation.inception_weights)
    batch, preprocess = int(evaluation.inception_batch_size), evaluation.preprocess
    reference = fid.stats_of(fid.features(params, originals, batch, preprocess)[0], "the validation batches")

    def rfid(reconstructions: np.ndarray) -> float:
        pool = fid.features(params, [reconstructions], batch, preprocess)[0]
        return fid.fid_between(fid.stats_of(pool, "reconstructions"), reference, "reconstructions", "originals", pool)

    return rfid


def _first_batches(iterator: Any, n: int) -> list[dict]:
    out = []
    for batch in iterator:
        out.append(batch)
        if len(out) >= n:
            break
    if not out:
        raise UserError("the evaluation split yielded no batch; lower batch_size or enlarge the split")
    return out

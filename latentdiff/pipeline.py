"""A stage-2 workdir loaded into one text/class-to-image pipeline. sample.py, eval/, the demo and the interop tests
all generate through `Pipeline`, so the wiring (config, tokenizer, scale factor, first stage, EMA params) exists once.

    pipe = Pipeline.from_workdir("workdirs/ldm_tiny")
    images = pipe(["a red circle at the top left"], sampler="ddim", steps=50, guidance=3.0, seed=0)  # uint8 NHWC

Batches are padded to a multiple of the local device count and sharded over a 'data' mesh; params are replicated.
One compiled function per (sampler, steps, batch shape), cached.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from latentdiff import conditioning, config_utils, generation, parallel, trace_cache
from latentdiff import workdir as workdir_lib
from latentdiff.diffusion.schedules import make_schedule
from latentdiff.errors import UserError
from latentdiff.first_stage import FirstStage, load_first_stage_export
from latentdiff.imaging import to_uint8
from latentdiff.nn.text_encoder import build_text_encoder, null_label
from latentdiff.nn.unet import build_unet

OUTPUTS = ("uint8", "float", "latent")


@dataclasses.dataclass
class Pipeline:
    """Everything needed to generate: modules, params (host or device), tokenizer, schedule, scale factor."""

    config: ml_collections.ConfigDict
    first_stage: FirstStage
    unet: Any
    cond_encoder: Any
    tokenizer: Any  # None for class-conditional models
    params: dict | None  # {'unet', 'cond'} (None until load_params)
    scale_factor: float
    step: int
    resolution: int

    def __post_init__(self) -> None:
        d = self.config.diffusion
        self.schedule = make_schedule(d.schedule, d.timesteps, d.linear_start, d.linear_end)
        self.mesh = parallel.make_mesh({"data": -1})
        replicated = parallel.replicated(self.mesh)
        self._params = None if self.params is None else parallel.put_global(self.params, replicated)
        self._first_stage_variables = parallel.put_global(self.first_stage.variables, replicated)
        self._compiled: dict[tuple, Any] = {}
        self._lora_base: dict | None = None  # the weights before apply_lora merged adapters into them
        self.latent_shape = self.first_stage.latent_shape(self.resolution)

    def load_params(self, params: dict, step: int, scale_factor: float) -> None:
        """Generates with other weights of the same model from now on (e.g. the EMA params and latent scale factor of
        a training state: host or device arrays, any sharding); compiled functions are kept."""
        self.params, self.step, self.scale_factor = params, int(step), float(scale_factor)
        self._params = parallel.put_global(params, parallel.replicated(self.mesh))
        self._lora_base = None  # new base weights: adapters apply to these from now on

    def apply_lora(self, adapters: dict, scale: float) -> None:
        """Generates with LoRA adapters merged into the weights from now on: W + scale · A @ B for every adapted
        kernel (adapters: {'unet': ..., 'cond': ...} subtrees as latentdiff.lora builds them). The base weights are
        kept, so a second call replaces the adapters (scale 0: the base model again); compiled functions are kept."""
        from latentdiff import lora

        if self.params is None:
            raise UserError("load the base weights before applying LoRA adapters")
        unknown = sorted(set(adapters) - set(self.params))
        if unknown:
            raise UserError(f"LoRA adapters for {', '.join(unknown)}: this model has {', '.join(sorted(self.params))}")
        base = self._lora_base if self._lora_base is not None else self.params
        merged = {
            k: lora.merge(v, adapters[k], scale, keep_dtype=True) if k in adapters else v for k, v in base.items()
        }
        self.load_params(merged, self.step, self.scale_factor)
        self._lora_base = base  # load_params replaced self.params with the merged weights

    # ----- loading -----
    @classmethod
    def from_workdir(cls, workdir: str, *, use_ema: bool = True) -> Pipeline:
        """Loads config.json, tokenizer/, first_stage/ and the weights (EMA params by default): the latest checkpoint,
        or, for a workdir written by `latentdiff convert` (no checkpoints/), params/ema.safetensors."""
        config = config_utils.load_workdir_config(workdir)
        if config.stage != "ldm":
            raise UserError(f"{workdir!r} is a {config.stage!r} workdir; sampling needs a stage-2 (ldm) workdir")
        first_stage = load_first_stage_export(os.path.join(workdir, "first_stage"))
        tokenizer = None
        if config.text_encoder.kind in ("bert", "clip"):
            from latentdiff.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer"), config.tokenizer.max_length)
        if not workdir_lib.has_checkpoints(workdir) and workdir_lib.has_converted_params(workdir):
            loaded = workdir_lib.load_converted_params(workdir, config, use_ema=use_ema)
            params, scale_factor, step = loaded["params"], loaded["scale_factor"], loaded["step"]
        else:
            restored = workdir_lib.restore_stage2_params(workdir, config)
            params = restored["ema_params" if use_ema else "params"]
            scale_factor, step = float(restored["scale_factor"]), int(restored["step"])
        return cls(
            config=config,
            first_stage=first_stage,
            unet=build_unet(config.unet),
            cond_encoder=build_text_encoder(config.text_encoder),
            tokenizer=tokenizer,
            params=params,
            scale_factor=float(scale_factor),
            step=int(step),
            resolution=config.data.resolution,
        )

    # ----- conditioning -----
    @property
    def class_conditional(self) -> bool:
        return self.config.text_encoder.kind == "class"

    @property
    def unconditioned(self) -> bool:
        """True for models without τ_θ (text_encoder.kind 'none', e.g. super-resolution): prompts are ignored."""
        return self.config.text_encoder.kind == "none"

    def encode_condition(self, prompts: Sequence[str] | Sequence[int]) -> np.ndarray:
        """Prompts -> tokens [N, L] int32, class labels -> [N] int32 (range-checked), or dummy labels [N] (zeros) for
        a model without conditioning."""
        if self.unconditioned:
            return np.zeros((len(prompts),), np.int32)
        if self.class_conditional:
            labels = np.asarray([int(p) for p in prompts], np.int32)
            n = self.config.text_encoder.num_classes
            if labels.size and (labels.min() < 0 or labels.max() >= n):
                raise UserError(f"class labels must be in [0, {n}), got {labels.min()}..{labels.max()}")
            return labels
        return np.asarray(self.tokenizer.encode([str(p) for p in prompts]), np.int32)

    def unconditional(self, negative_prompt: str) -> np.ndarray:
        """The guidance baseline: the negative prompt's tokens (default "") or the null class; shape [1, ...]."""
        if self.unconditioned:
            return np.zeros((1,), np.int32)
        if self.class_conditional:
            return np.asarray([null_label(self.config.text_encoder)], np.int32)
        return np.asarray(self.tokenizer.encode([negative_prompt]), np.int32)

    # ----- generation -----
    @property
    def concat(self) -> str:
        """The model's concat conditioning: 'none' (text/class-to-image), 'inpaint' or 'sr'."""
        return conditioning.concat_kind(self.config)

    @property
    def low_res_shape(self) -> tuple[int, int, int]:
        """[h, w, 3] of the low-resolution input of a super-resolution model at the training resolution."""
        return self.low_res_shape_for((self.resolution, self.resolution))

    def low_res_shape_for(self, size: tuple[int, int]) -> tuple[int, int, int]:
        """[H/k, W/k, 3] of the low-resolution input for an output of `size` (H, W), k = conditioning.sr_factor."""
        if self.concat != "sr":
            raise UserError(
                f"low_res is for super-resolution models; this model's concat conditioning is {self.concat!r}"
            )
        k = int(self.config.conditioning.sr_factor)
        return (size[0] // k, size[1] // k, 3)

    @property
    def size_stride(self) -> int:
        """Output sides must be multiples of this: the first stage's factor f times the UNet's downsampling."""
        return self.first_stage.downsample_factor * 2 ** (len(self.config.unet.channel_mult) - 1)

    def output_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(H, W) of the images to generate: the training resolution where not given. The model is convolutional,
        so any multiple of size_stride works (the paper's sampling beyond the training size); UserError otherwise."""
        size = (height or self.resolution, width or self.resolution)
        stride, factor = self.size_stride, self.first_stage.downsample_factor
        for name, side in zip(("height", "width"), size, strict=True):
            if side <= 0 or side % stride:
                raise UserError(
                    f"{name} {side} is not a positive multiple of {stride} (first-stage factor {factor} x UNet "
                    f"downsampling {stride // factor}); "
                    f"use e.g. {max(stride, side // stride * stride)}"
                )
        return size

    def latent_shape_for(self, size: tuple[int, int]) -> tuple[int, int, int]:
        """[H/f, W/f, c] of the latents of images of `size` (H, W)."""
        f = self.first_stage.downsample_factor
        return (size[0] // f, size[1] // f, self.latent_shape[2])

    def _generate_fn(self, sampler: str, steps: int, start_step: int = 0, blend: bool = False) -> Any:
        key = (sampler, steps, start_step, blend)
        if key not in self._compiled:
            generate = generation.make_generate(
                unet=self.unet,
                cond_encoder=self.cond_encoder,
                first_stage=self.first_stage,
                schedule=self.schedule,
                parameterization=self.config.diffusion.parameterization,
                sampler=sampler,
                num_steps=steps,
                start_step=start_step,
                blend=blend,
                concat=self.concat,
                return_latents=True,
            )
            settings = {
                "program": "generate",
                "static": list(key),
                "config": config_utils.to_json(self.config),
                "first_stage": config_utils.to_json(self.first_stage.config),
                "modules": [repr(self.unet), repr(self.cond_encoder), repr(self.first_stage.module)],
                "mesh": str(self.mesh.shape),
            }
            self._compiled[key] = trace_cache.exported(jax.jit(parallel.under_mesh(generate, self.mesh)), settings)
        return self._compiled[key]

    def autoencode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images [N, H, W, 3] (uint8, or float in [-1, 1]) -> (z0 = E(x).mode·scale_factor [N, h, w, c], the
        reconstruction D(z0 / scale_factor) [N, H, W, 3] float in [-1, 1]): what image modification starts from."""
        x = _image_array(images, "images", len(images), (self.resolution, self.resolution))
        if "autoencode" not in self._compiled:

            def run(first_stage_variables: dict, scale_factor: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
                z = self.first_stage.encode(first_stage_variables, x, None, False) * scale_factor
                return z, self.first_stage.decode(first_stage_variables, z / scale_factor)

            self._compiled["autoencode"] = jax.jit(run)
        z, rec = self._compiled["autoencode"](
            self._first_stage_variables, jnp.float32(self.scale_factor), jnp.asarray(x)
        )
        return np.asarray(z), np.asarray(rec)

    def modification_inputs(
        self,
        n: int,
        init_image: np.ndarray | None,
        strength: float | None,
        mask: np.ndarray | None,
        low_res: np.ndarray | None,
        blend: bool | None,
        size: tuple[int, int] | None = None,
    ) -> tuple[float, bool, dict[str, np.ndarray]]:
        """Checks the image-modification arguments against this model -> (strength, blend, inputs) where inputs holds
        the host arrays the jitted function needs: 'image' [N,H,W,3] and 'mask' [N,H,W,1] (1 = repaint) float32,
        'low_res' [N,h,w,3] float32 in [-1, 1]. strength 1 with nothing else to do returns no inputs (text-to-image)."""
        kind = self.concat
        if strength is not None and init_image is None:
            raise UserError("strength needs init_image (the image to modify)")
        if mask is not None and init_image is None:
            raise UserError("mask needs init_image (the image whose masked region is repainted)")
        if blend and mask is None:
            raise UserError("blend needs a mask")
        if kind == "inpaint" and (init_image is None or mask is None):
            raise UserError("this is an inpainting model (concat conditioning 'inpaint'): pass init_image and mask")
        if kind == "sr" and low_res is None:
            raise UserError("this is a super-resolution model (concat conditioning 'sr'): pass low_res")
        if kind != "sr" and low_res is not None:
            raise UserError(f"low_res is for super-resolution models; this model's concat conditioning is {kind!r}")
        if init_image is not None and strength is None:
            if mask is None and kind != "inpaint":
                raise UserError("img2img needs strength in (0, 1] (the fraction of the sampling steps to run)")
            strength = 1.0
        if strength is not None and not 0.0 < strength <= 1.0:
            raise UserError(f"strength must be in (0, 1], got {strength}")
        blend = (mask is not None and kind != "inpaint") if blend is None else bool(blend)
        inputs: dict[str, np.ndarray] = {}
        size = size or (self.resolution, self.resolution)
        if init_image is not None:
            inputs["image"] = _image_array(init_image, "init_image", n, size)
        if mask is not None:
            inputs["mask"] = _mask_array(mask, n, size)
        if low_res is not None:
            inputs["low_res"] = _image_array(low_res, "low_res", n, self.low_res_shape_for(size)[:2])
        return (1.0 if strength is None else float(strength)), blend, inputs

    def __call__(
        self,
        prompts: Sequence[str] | Sequence[int],
        *,
        sampler: str,
        steps: int,
        guidance: float,
        eta: float = 0.0,
        seed: int = 0,
        negative_prompt: str = "",
        batch_size: int = 0,
        x_T: np.ndarray | None = None,
        progress: Any = None,
        output: str = "uint8",
        init_image: np.ndarray | None = None,
        strength: float | None = None,
        mask: np.ndarray | None = None,
        low_res: np.ndarray | None = None,
        blend: bool | None = None,
        keep_unmasked: bool | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> np.ndarray:
        """Generates one image per prompt -> [N, H, W, 3]: uint8 (output 'uint8'), float32 in [0, 1] ('float',
        diffusers' output_type 'np'), or the final latents [N, h, w, c] ('latent', scaled as the UNet sees them).
        batch_size 0 = all at once (padded to the device count). Image i depends only on (seed, i, its prompt and
        inputs). `x_T` [N, h, w, c] overrides the initial noise (with init_image: the noise it is noised with).
        height, width: the output size (default: the training resolution); any multiple of `size_stride`, non-square
        and larger than the training size included (the UNet is convolutional); the image inputs below then have
        that size (low_res a k-th of it).

        Image modification (arrays [H, W, C] are used for every prompt, [N, H, W, C] one per prompt):
          init_image [H, W, 3] uint8 or float in [-1, 1], at the model's resolution; strength in (0, 1]: img2img /
            SDEdit runs the last round(strength·steps) steps from E(init_image) noised to that level. strength 1
            (or any value that rounds to every step) starts from pure noise: exactly text-to-image, unless a mask
            or the model's concat conditioning uses the image.
          mask [H, W] or [H, W, 1], 1 (or 255, True) = repaint, 0 = keep; with init_image (strength defaults to 1).
            blend (default: True unless the model is a concat 'inpaint' model) replaces the kept latents at every
            step (RePaint); latents whose f×f cell holds any repainted pixel are regenerated.
            keep_unmasked (default: True with a mask) composites the decoded image with init_image by the mask,
            mask·generated + (1 − mask)·init_image, so kept pixels are the input's exactly: the decoder's GroupNorm
            and attention would otherwise shift them by up to the autoencoder's error (more for large masks).
          low_res [H/k, W/k, 3] (k = config.conditioning.sr_factor; uint8 or [-1, 1]) for super-resolution ('sr')
            models; the output is k times larger.
        """
        generation.check_sampling_args(sampler, steps, self.schedule.num_timesteps, guidance, eta)
        if output not in OUTPUTS:
            raise UserError(f"output must be one of {OUTPUTS}, got {output!r}")
        if len(prompts) == 0:
            raise UserError("no prompts given")
        n = len(prompts)
        size = self.output_size(height, width)
        latent_shape = self.latent_shape_for(size)
        strength, blend, inputs = self.modification_inputs(n, init_image, strength, mask, low_res, blend, size)
        if keep_unmasked and mask is None:
            raise UserError("keep_unmasked needs a mask (the region to repaint; the rest is kept)")
        keep = (mask is not None) if keep_unmasked is None else bool(keep_unmasked)
        composite = (inputs["image"], inputs["mask"]) if keep and output != "latent" else None
        start_step = generation.start_for_strength(sampler, self.schedule, steps, strength)[0]
        if start_step == 0 and not blend and self.concat != "inpaint":
            inputs.pop("image", None)  # nothing uses the image: plain text-to-image from x_T
        cond_all = self.encode_condition(prompts)
        uncond = self.unconditional(negative_prompt)
        devices = self.mesh.shape["data"]
        batch = batch_size or n
        batch = -(-batch // devices) * devices
        if x_T is None:
            x_T = np.asarray(generation.initial_noise(seed, jnp.arange(n), latent_shape))
        elif tuple(x_T.shape) != (n, *latent_shape):
            raise UserError(f"x_T must be [{n}, {', '.join(map(str, latent_shape))}], got {tuple(x_T.shape)}")
        generate = self._generate_fn(sampler, steps, start_step, blend)
        sharded = parallel.sampling_batch_sharding(self.mesh)
        out = []
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            pad = batch - (stop - start)
            cond = _pad(cond_all[start:stop], pad)
            noise = _pad(x_T[start:stop], pad)
            batch_inputs = {k: parallel.put_global(_pad(v[start:stop], pad), sharded) for k, v in inputs.items()}
            keys = parallel.put_global(generation.sampler_keys(seed, jnp.arange(start, start + batch)), sharded)
            scale_factor, uncond_global, guidance_scale, eta_scalar = parallel.put_global(
                (np.float32(self.scale_factor), np.asarray(uncond), np.float32(guidance), np.float32(eta)),
                parallel.replicated(self.mesh),
            )
            images, latents = generate(
                self._params,
                self._first_stage_variables,
                scale_factor,
                parallel.put_global(cond, sharded),
                uncond_global,
                guidance_scale,
                eta_scalar,
                parallel.put_global(noise, sharded),
                keys,
                batch_inputs,
            )
            if output == "latent":
                out.append(np.asarray(parallel.to_host(latents))[: stop - start].astype(np.float32))
            else:
                images = np.asarray(parallel.to_host(images))[: stop - start]
                if composite is not None:
                    images = keep_unmasked_pixels(images, *(c[start:stop] for c in composite))
                out.append(to_uint8(images) if output == "uint8" else (images.astype(np.float32) + 1.0) / 2.0)
            if progress is not None:
                progress(stop - start)
        return np.concatenate(out, axis=0)


def keep_unmasked_pixels(generated: np.ndarray, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """generated, image [N, H, W, 3] in [-1, 1], mask [N, H, W, 1] in [0, 1] (1 = repaint) ->
    mask·generated + (1 − mask)·image: the kept region is the input image itself."""
    return (mask * generated + (1.0 - mask) * image).astype(generated.dtype)


def _pad(x: np.ndarray, pad: int) -> np.ndarray:
    """Repeats the last row `pad` times (padding rows are generated and dropped)."""
    if pad == 0:
        return np.asarray(x)
    return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)


def _per_prompt(x: np.ndarray, name: str, n: int, ndim: int) -> np.ndarray:
    """[...] with `ndim` dims (one for every prompt) or [1 or n, ...] -> [n, ...]."""
    if x.ndim == ndim:
        x = x[None]
    if x.ndim != ndim + 1 or x.shape[0] not in (1, n):
        raise UserError(f"{name} must be one array for all {n} prompts or one per prompt, got shape {x.shape}")
    return np.broadcast_to(x, (n, *x.shape[1:]))


def _image_array(images: Any, name: str, n: int, size: tuple[int, int]) -> np.ndarray:
    """uint8 [0, 255] or float [-1, 1] images [H, W, 3] / [1 or n, H, W, 3] -> float32 [n, H, W, 3] in [-1, 1]."""
    x = _per_prompt(np.asarray(images), name, n, 3)
    if x.shape[-1] != 3:
        raise UserError(f"{name} must have 3 (RGB) channels, got shape {x.shape}")
    if tuple(x.shape[1:3]) != tuple(size):
        got, want = f"{x.shape[1]}x{x.shape[2]}", f"{size[0]}x{size[1]}"
        raise UserError(f"{name} is {got} but this model needs {want}: resize it (sample.py --resize)")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 127.5 - 1.0
    if not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"{name} must be uint8 in [0, 255] or float in [-1, 1], got dtype {x.dtype}")
    if not np.isfinite(x).all() or x.min() < -1.0 - 1e-3 or x.max() > 1.0 + 1e-3:
        raise UserError(f"{name} floats must lie in [-1, 1] (pass uint8 for [0, 255] images)")
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def _mask_array(mask: Any, n: int, size: tuple[int, int]) -> np.ndarray:
    """[H, W], [H, W, 1] or [1 or n, H, W(, 1)] with 1 / 255 / True = repaint -> float32 [n, H, W, 1] in [0, 1]."""
    m = np.asarray(mask)
    if m.ndim in (3, 4) and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim not in (2, 3):
        raise UserError(f"mask must be [H, W] or [N, H, W] (single channel: 1 = repaint), got shape {m.shape}")
    m = _per_prompt(m, "mask", n, 2)
    if tuple(m.shape[1:3]) != tuple(size):
        raise UserError(f"mask is {m.shape[1]}x{m.shape[2]} but the image is {size[0]}x{size[1]}: make them equal")
    if m.dtype == np.uint8:
        m = m.astype(np.float32) / 255.0
    m = m.astype(np.float32)
    if not np.isfinite(m).all() or m.min() < 0.0 or m.max() > 1.0:
        raise UserError("mask values must lie in [0, 1] (1 = repaint), or be uint8 with 255 = repaint")
    return m[..., None]

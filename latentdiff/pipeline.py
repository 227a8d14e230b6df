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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from latentdiff import config_utils, first_stage, parallel, sampling
from latentdiff.diffusion.schedules import make_schedule
from latentdiff.imaging import to_uint8
from latentdiff.nn.text_encoder import build_text_encoder, null_label
from latentdiff.nn.unet import build_unet

OUTPUTS = ("uint8", "float")


@dataclasses.dataclass
class Pipeline:
    """Everything needed to generate: modules, params (host or device), tokenizer, schedule, scale factor."""

    config: ml_collections.ConfigDict
    fs: first_stage.FirstStage
    unet: Any
    cond_encoder: Any
    tokenizer: Any  # None for class-conditional models
    params: dict  # {'unet', 'cond'}
    scale_factor: float
    step: int
    resolution: int

    def __post_init__(self) -> None:
        d = self.config.diffusion
        self.schedule = make_schedule(d.schedule, d.timesteps, d.linear_start, d.linear_end)
        self.mesh = parallel.make_mesh({"data": -1})
        replicated = parallel.replicated(self.mesh)
        self._params = jax.device_put(self.params, replicated)
        self._fs_variables = jax.device_put(self.fs.variables, replicated)
        self._compiled: dict[tuple, Any] = {}
        self.latent_shape = self.fs.latent_shape(self.resolution)

    # ----- loading -----
    @classmethod
    def from_workdir(cls, workdir: str, *, use_ema: bool = True) -> Pipeline:
        """Loads config.json, tokenizer/, first_stage/ and the weights (EMA params by default): the latest checkpoint,
        or, for a workdir written by `python -m latentdiff.convert` (no checkpoints/), params/ema.safetensors."""
        from latentdiff.convert.workdir import has_converted_params, load_converted_params

        config = config_utils.load_workdir_config(workdir)
        if config.stage != "ldm":
            raise ValueError(f"{workdir!r} is a {config.stage!r} workdir; sampling needs a stage-2 (ldm) workdir")
        fs = first_stage.load_export(os.path.join(workdir, "first_stage"))
        tokenizer = None
        if config.text_encoder.kind in ("bert", "clip"):
            from latentdiff.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer"), config.tokenizer.max_length)
        if not _has_checkpoints(workdir) and has_converted_params(workdir):
            loaded = load_converted_params(workdir, config, use_ema=use_ema)
            params, scale_factor, step = loaded["params"], loaded["scale_factor"], loaded["step"]
        else:
            from latentdiff.train.ldm import null_condition, restore_params

            restored = restore_params(workdir, config, fs, null_condition(config, tokenizer))
            params = restored["ema_params" if use_ema else "params"]
            scale_factor, step = float(restored["scale_factor"]), int(restored["step"])
        return cls(
            config=config,
            fs=fs,
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

    def encode_condition(self, prompts: Sequence[str] | Sequence[int]) -> np.ndarray:
        """Prompts -> tokens [N, L] int32, or class labels -> [N] int32 (range-checked)."""
        if self.class_conditional:
            labels = np.asarray([int(p) for p in prompts], np.int32)
            n = self.config.text_encoder.num_classes
            if labels.size and (labels.min() < 0 or labels.max() >= n):
                raise ValueError(f"class labels must be in [0, {n}), got {labels.min()}..{labels.max()}")
            return labels
        return np.asarray(self.tokenizer.encode([str(p) for p in prompts]), np.int32)

    def unconditional(self, negative_prompt: str) -> np.ndarray:
        """The guidance baseline: the negative prompt's tokens (default "") or the null class; shape [1, ...]."""
        if self.class_conditional:
            return np.asarray([null_label(self.config.text_encoder)], np.int32)
        return np.asarray(self.tokenizer.encode([negative_prompt]), np.int32)

    # ----- generation -----
    def _generate_fn(self, sampler: str, steps: int) -> Any:
        key = (sampler, steps)
        if key not in self._compiled:
            generate = sampling.make_generate(
                unet=self.unet,
                cond_encoder=self.cond_encoder,
                fs=self.fs,
                schedule=self.schedule,
                parameterization=self.config.diffusion.parameterization,
                sampler=sampler,
                num_steps=steps,
            )
            self._compiled[key] = jax.jit(generate)
        return self._compiled[key]

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
    ) -> np.ndarray:
        """Generates one image per prompt -> [N, H, W, 3]: uint8 (output 'uint8'), or float32 in [0, 1] ('float',
        diffusers' output_type 'np'). batch_size 0 = all at once (padded to the device count). Image i depends only
        on (seed, i, its prompt) for eta 0. `x_T` [N, h, w, c] overrides the initial noise."""
        sampling.check_sampling_args(sampler, steps, self.schedule.num_timesteps, guidance, eta)
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        cond_all = self.encode_condition(prompts)
        uncond = self.unconditional(negative_prompt)
        n = len(prompts)
        devices = self.mesh.shape["data"]
        batch = batch_size or n
        batch = -(-batch // devices) * devices
        if x_T is None:
            x_T = np.asarray(sampling.initial_noise(seed, jnp.arange(n), self.latent_shape))
        elif tuple(x_T.shape) != (n, *self.latent_shape):
            raise ValueError(f"x_T must be [{n}, {', '.join(map(str, self.latent_shape))}], got {tuple(x_T.shape)}")
        generate = self._generate_fn(sampler, steps)
        sharded = NamedSharding(self.mesh, P("data"))
        out = []
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            pad = batch - (stop - start)
            cond = _pad(cond_all[start:stop], pad)
            noise = _pad(x_T[start:stop], pad)
            images = generate(
                self._params,
                self._fs_variables,
                jnp.float32(self.scale_factor),
                jax.device_put(cond, sharded),
                jnp.asarray(uncond),
                jnp.float32(guidance),
                jnp.float32(eta),
                jax.device_put(noise, sharded),
                jax.random.fold_in(jax.random.key(seed), start),
            )
            images = np.asarray(jax.device_get(images))[: stop - start]
            out.append(to_uint8(images) if output == "uint8" else (images.astype(np.float32) + 1.0) / 2.0)
            if progress is not None:
                progress(stop - start)
        return np.concatenate(out, axis=0)


def _has_checkpoints(workdir: str) -> bool:
    """True when workdir/checkpoints holds at least one entry (a training run saved something)."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and bool(os.listdir(directory))


def _pad(x: np.ndarray, pad: int) -> np.ndarray:
    """Repeats the last row `pad` times (padding rows are generated and dropped)."""
    if pad == 0:
        return np.asarray(x)
    return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)

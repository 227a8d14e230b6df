"""The frozen stage-1 autoencoder as stage 2 and sampling use it: encode images to latents, decode latents.

An *export* directory holds `autoencoder.json` (the autoencoder config) and `params.safetensors` (its variables:
'params' and, for VQ with an EMA codebook, 'vq_stats'). Stage-2 training copies the export into its own workdir
(`workdir/first_stage/`), so a stage-2 workdir alone is enough to sample.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from latentdiff import config_utils, params_io, trace_cache
from latentdiff.nn.autoencoder import build_autoencoder


@dataclasses.dataclass(frozen=True)
class FirstStage:
    """A stage-1 model: its config, module and (host or device) variables."""

    config: ml_collections.ConfigDict
    module: Any
    variables: dict

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        f = self.downsample_factor
        return (resolution // f, resolution // f, self.config.embed_dim)

    def encode(self, variables: dict, images: jax.Array, rng: jax.Array | None, sample: bool) -> jax.Array:
        """images [B,H,W,3] in [-1,1] -> unscaled latents [B,H/f,W/f,C]. KL: posterior sample (or mode); VQ:
        pre-quantisation latents."""
        encoded = self.module.apply(variables, images, False, method=type(self.module).encode)
        if self.config.kind == "kl":
            return encoded.sample(rng) if sample else encoded.mode()
        return encoded.astype(jnp.float32)

    def decode(self, variables: dict, latents: jax.Array) -> jax.Array:
        """Unscaled latents [B,h,w,C] -> images [B,H,W,3] clipped to [-1, 1]."""
        return jnp.clip(self.module.apply(variables, latents, False, method=type(self.module).decode), -1.0, 1.0)

    def with_compute_dtype(self, dtype: str) -> FirstStage:
        """The same frozen model computing in `dtype` ('float32' | 'bfloat16'; '' keeps the model's own). Variables
        are shared, not cast: flax casts them per call. Stage 2 uses it to encode in bf16 on accelerators."""
        if not dtype or dtype == self.config.dtype:
            return self
        config = self.config.copy_and_resolve_references()
        config.dtype = dtype
        return FirstStage(config=config, module=build_autoencoder(config), variables=self.variables)


def abstract_autoencoder_variables(config: ml_collections.ConfigDict) -> dict:
    """{'params': ..., other collections} of the autoencoder as jax.ShapeDtypeStruct (cached by `trace_cache`)."""
    return trace_cache.abstract_tree(
        ["autoencoder", config_utils.to_json(config)], lambda: _abstract_autoencoder_variables(config)
    )


def _abstract_autoencoder_variables(config: ml_collections.ConfigDict) -> dict:
    module = build_autoencoder(config)
    x = jax.ShapeDtypeStruct((1, config.resolution, config.resolution, config.in_channels), jnp.float32)
    if config.kind == "kl":
        init = lambda x: module.init(jax.random.key(0), x, None, False, False)
    else:
        init = lambda x: module.init(jax.random.key(0), x, False)
    return dict(jax.eval_shape(init, x))


def save_first_stage_export(
    config: ml_collections.ConfigDict, variables: dict, directory: str, metadata: dict[str, str] | None = None
) -> None:
    """Writes autoencoder.json + params.safetensors into `directory` (atomically, file by file)."""
    os.makedirs(directory, exist_ok=True)
    params_io.save_params(os.path.join(directory, "params.safetensors"), jax.device_get(variables), metadata)
    config_utils.atomic_write_text(os.path.join(directory, "autoencoder.json"), config_utils.to_json(config))


def load_first_stage_export(directory: str) -> FirstStage:
    """Reads an export directory (shape-checked against its config)."""
    cfg_path = os.path.join(directory, "autoencoder.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(
            f"no stage-1 autoencoder at {directory!r} (autoencoder.json missing); point first_stage.workdir "
            "at a trained stage-1 workdir"
        )
    with open(cfg_path) as f:
        config = config_utils.from_json(f.read())
    variables = params_io.load_params(
        os.path.join(directory, "params.safetensors"), abstract_autoencoder_variables(config)
    )
    return FirstStage(config=config, module=build_autoencoder(config), variables=variables)

"""Pretrained weights in and out: diffusers / transformers / CompVis state dicts <-> latentdiff params.

    module, variables = from_diffusers("unet", state_dict, unet_cfg)     # one component, numpy state dict
    state_dict = to_diffusers("unet", variables, unet_cfg)               # and back (bit-exact round trip)

Whole models (CLI: `latentdiff convert --help`):
    latentdiff.convert.diffusers_pipeline.convert_diffusers_pipeline(src, workdir)  diffusers pipeline -> workdir
    latentdiff.convert.compvis.convert_compvis_checkpoint(ckpt, workdir, ...)  CompVis .ckpt -> workdir
    latentdiff.convert.diffusers_pipeline.export_diffusers(workdir, out)         workdir -> diffusers pipeline

Components (diffusers pipeline attribute names): 'unet' (UNet2DConditionModel), 'vae' / 'vqvae' (AutoencoderKL or
VQModel, by the config's kind), 'bert' (LDMBertModel), 'text_encoder' (transformers CLIPTextModel). Every converter
uses an explicit key table, checks every shape and raises ConversionError listing missing / unexpected keys.
Submodules are imported lazily: importing this package costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from latentdiff.errors import UserError

COMPONENTS = ("unet", "vae", "vqvae", "bert", "text_encoder")


def _check_component(component: str) -> None:
    if component not in COMPONENTS:
        raise UserError(f"unknown component {component!r}; one of {COMPONENTS}")


def from_diffusers(component: str, state_dict: Mapping[str, np.ndarray], config: Mapping) -> tuple[Any, dict]:
    """A diffusers/transformers state dict (numpy arrays) of `component` -> (Flax module, {'params': ...}).

    `config` is our config block for that component (unet, autoencoder, or text_encoder fields)."""
    _check_component(component)
    if component == "unet":
        from latentdiff.convert.diffusers_unet import convert_unet

        return convert_unet(state_dict, config)
    if component in ("vae", "vqvae"):
        import ml_collections

        from latentdiff.convert.diffusers_vae import convert_vae, convert_vq

        config = ml_collections.ConfigDict(dict(config))
        module, params = (convert_vae if config.kind == "kl" else convert_vq)(state_dict, config)
        return module, {"params": params}
    if component == "bert":
        from latentdiff.convert.diffusers_text import convert_bert

        return convert_bert(state_dict, config)
    from latentdiff.convert.diffusers_clip import convert_clip

    return convert_clip(state_dict, config)


def to_diffusers(component: str, variables: Mapping, config: Mapping) -> dict[str, np.ndarray]:
    """Our params ({'params': ...} or the inner dict) of `component` -> its diffusers/transformers state dict."""
    _check_component(component)
    params = variables.get("params", variables)
    if component == "unet":
        from latentdiff.convert.diffusers_unet import export_unet

        return export_unet(params, config)
    if component in ("vae", "vqvae"):
        import ml_collections

        from latentdiff.convert.diffusers_vae import export_vae

        return export_vae(params, ml_collections.ConfigDict(dict(config)))
    if component == "bert":
        from latentdiff.convert.diffusers_text import export_bert

        return export_bert(params, config)
    from latentdiff.convert.diffusers_clip import export_clip

    return export_clip(params, config)

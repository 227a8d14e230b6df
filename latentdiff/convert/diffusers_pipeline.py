"""diffusers pipeline directories <-> latentdiff workdirs (`latentdiff convert diffusers` / `export`).

Directories: `LDMTextToImagePipeline` (vqvae = AutoencoderKL | VQModel, bert = LDMBertModel, unet, scheduler,
tokenizer) and `StableDiffusionPipeline` v1 (vae, text_encoder = CLIPTextModel, unet, scheduler, tokenizer;
safety_checker / feature_extractor are not converted). Weights are read from safetensors, or from .bin files with
torch.load(weights_only=True). Each component's config and weights are translated by its own module
(diffusers_unet, diffusers_vae, diffusers_text, diffusers_clip, scheduler); the workdir is written by
latentdiff/convert/workdir.py. `export_diffusers` writes a workdir back as such a directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from latentdiff import config_utils, params_io
from latentdiff.convert import workdir as wd
from latentdiff.convert.diffusers_text import bert_config_from_diffusers, diffusers_bert_config
from latentdiff.convert.diffusers_unet import diffusers_unet_config, unet_config_from_diffusers
from latentdiff.convert.diffusers_vae import vae_config_from_diffusers
from latentdiff.convert.key_tables import ConversionError
from latentdiff.convert.scheduler import diffusers_scheduler_config, diffusion_from_scheduler
from latentdiff.convert.weight_files import load_state_dict, read_json
from latentdiff.errors import UserError

# diffusers' AutoencoderKL / VQModel class default, used when a vae config.json has no `scaling_factor` (older files).
DIFFUSERS_DEFAULT_SCALING = 0.18215


# LDMTextToImagePipeline tokenizes to this fixed length (padding "max_length", max_length=77).
LDM_TOKEN_LENGTH = 77


PIPELINES = {
    "LDMTextToImagePipeline": {"vae": "vqvae", "text": "bert"},
    "StableDiffusionPipeline": {"vae": "vae", "text": "text_encoder"},
}


def component_state_dict(directory: str, variant: str = "") -> dict[str, np.ndarray]:
    """The weights of one diffusers/transformers component directory (single or sharded, safetensors or .bin)."""
    stems = ("diffusion_pytorch_model", "model", "pytorch_model")
    suffix = f".{variant}" if variant else ""
    for stem in stems:
        for ext in (".safetensors", ".bin"):
            single = os.path.join(directory, f"{stem}{suffix}{ext}")
            if os.path.isfile(single):
                return load_state_dict(single)
            index = f"{single}.index.json"
            if os.path.isfile(index):
                shards = sorted(set(read_json(index)["weight_map"].values()))
                out: dict[str, np.ndarray] = {}
                for shard in shards:
                    out.update(load_state_dict(os.path.join(directory, shard)))
                return out
    files = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    hint = " (pass --variant for files like model.fp16.safetensors)" if any(".fp16." in f for f in files) else ""
    raise FileNotFoundError(f"no weight file in {directory!r}{hint}; found {files}")


def read_pipeline(src: str) -> tuple[str, dict]:
    """(pipeline class name, model_index.json) of a diffusers pipeline directory we can convert."""
    if not os.path.isfile(os.path.join(src, "model_index.json")):
        raise FileNotFoundError(f"{src!r} is not a diffusers pipeline directory (no model_index.json)")
    index = read_json(os.path.join(src, "model_index.json"))
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ConversionError(f"{src!r} is a {name!r}; supported pipelines: {sorted(PIPELINES)}")
    return name, index


def convert_diffusers_pipeline(
    src: str, workdir: str, *, scale_factor: float = 0.0, variant: str = "", overwrite: bool = False
) -> ml_collections.ConfigDict:
    """A diffusers LDMTextToImagePipeline / StableDiffusionPipeline directory -> a converted workdir; returns config.

    scale_factor 0 = the vae config's `scaling_factor` (diffusers' default 0.18215 where the file has none)."""
    from latentdiff.convert import from_diffusers
    from latentdiff.convert.diffusers_clip import clip_config
    from latentdiff.data.tokenizer import load_tokenizer

    wd.check_target(workdir, overwrite)
    name, _ = read_pipeline(src)
    parts = PIPELINES[name]
    vae_dir, text_dir = os.path.join(src, parts["vae"]), os.path.join(src, parts["text"])
    vae_json = read_json(os.path.join(vae_dir, "config.json"))
    vae_class = vae_json.get("_class_name")
    if vae_class not in ("AutoencoderKL", "VQModel"):
        raise ConversionError(f"{parts['vae']} is a {vae_class!r}; AutoencoderKL or VQModel expected")
    first_stage_config = ml_collections.ConfigDict(
        vae_config_from_diffusers(vae_json, "kl" if vae_class == "AutoencoderKL" else "vq")
    )
    unet_json = read_json(os.path.join(src, "unet", "config.json"))
    unet_cfg = unet_config_from_diffusers(unet_json)
    text_json = read_json(os.path.join(text_dir, "config.json"))
    text_cfg = bert_config_from_diffusers(text_json) if name == "LDMTextToImagePipeline" else clip_config(text_json)
    diffusion = diffusion_from_scheduler(read_json(os.path.join(src, "scheduler", "scheduler_config.json")))

    _, first_stage_variables = from_diffusers(parts["vae"], component_state_dict(vae_dir, variant), first_stage_config)
    _, unet_vars = from_diffusers("unet", component_state_dict(os.path.join(src, "unet"), variant), unet_cfg)
    _, text_vars = from_diffusers(parts["text"], component_state_dict(text_dir, variant), text_cfg)

    tok_dir = os.path.join(src, "tokenizer")
    if name == "LDMTextToImagePipeline":
        length = LDM_TOKEN_LENGTH
    else:
        length = int(read_json(os.path.join(tok_dir, "tokenizer_config.json"))["model_max_length"])
    if length != text_cfg["max_length"]:
        raise ConversionError(
            f"the pipeline tokenizes to {length} tokens but the text encoder has {text_cfg['max_length']} positions"
        )
    tokenizer = load_tokenizer(os.path.abspath(tok_dir), length)
    if tokenizer.vocab_size > text_cfg["vocab_size"]:
        raise ConversionError(f"tokenizer has {tokenizer.vocab_size} ids, the text encoder {text_cfg['vocab_size']}")

    if scale_factor <= 0:
        scale_factor = float(vae_json.get("scaling_factor", DIFFUSERS_DEFAULT_SCALING))
    f = 2 ** (len(first_stage_config.ch_mult) - 1)
    sample = unet_json["sample_size"]
    sample = int(sample[0] if isinstance(sample, (list, tuple)) else sample)
    config = wd.stage2_config(
        unet=unet_cfg,
        text_encoder=text_cfg,
        tokenizer=wd.tokenizer_block(tokenizer, os.path.abspath(tok_dir)),
        diffusion=diffusion,
        scale_factor=scale_factor,
        resolution=sample * f,
        sampling=wd.sampling_block(wd.TEXT_PROMPTS, 7.5 if name == "StableDiffusionPipeline" else 5.0),
    )
    params = {"unet": unet_vars["params"], "cond": text_vars["params"]}
    wd.write_workdir(
        workdir,
        config=config,
        first_stage_config=first_stage_config,
        first_stage_variables=first_stage_variables,
        ema_params=params,
        params=None,
        tokenizer=tokenizer,
        source=f"diffusers:{os.path.abspath(src)}",
        step=0,
        overwrite=overwrite,
    )
    return config


def _save_component(directory: str, config: Mapping, state_dict: Mapping[str, np.ndarray], weights: str) -> None:
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state_dict.items()}
    params_io.write_safetensors(os.path.join(directory, weights), arrays, {"format": "pt"})
    config_utils.atomic_write_text(os.path.join(directory, "config.json"), json.dumps(dict(config), indent=2))


def export_diffusers(workdir: str, out: str, *, use_ema: bool = True, overwrite: bool = False) -> str:
    """A text-to-image workdir (converted or trained) -> a diffusers pipeline directory; returns the pipeline class.

    kind 'bert' -> LDMTextToImagePipeline (vqvae, bert, ...), kind 'clip' -> StableDiffusionPipeline (no safety
    checker). Weights are float32 safetensors; the scheduler is DDIMScheduler configured as latentdiff's DDIM. The
    LDMBert output projection `to_logits` (unused for conditioning) is not written; diffusers reports it missing.
    """
    from latentdiff.convert import to_diffusers
    from latentdiff.convert.diffusers_clip import hf_clip_config
    from latentdiff.convert.diffusers_vae import diffusers_config
    from latentdiff.pipeline import Pipeline

    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UserError(f"{out!r} is not empty; pass --overwrite or choose a new directory")
    pipe = Pipeline.from_workdir(workdir, use_ema=use_ema)
    config = pipe.config
    kind = config.text_encoder.kind
    if kind not in ("bert", "clip"):
        raise ConversionError(f"export needs a text model (text_encoder.kind 'bert' or 'clip'), got {kind!r}")
    if kind == "bert" and config.text_encoder.max_length < LDM_TOKEN_LENGTH:
        # Refused rather than written: the pipeline would load and then fail at its first prompt (IndexError), and
        # widening the position table would change what the model computes (prompts padded to 77, no mask).
        raise ConversionError(
            f"diffusers' LDMTextToImagePipeline pads every prompt to {LDM_TOKEN_LENGTH} tokens, but this text encoder "
            f"has {config.text_encoder.max_length} positions, so diffusers could not run the export; export a model "
            f"trained with --config.text_encoder.max_length={LDM_TOKEN_LENGTH} "
            f"--config.tokenizer.max_length={LDM_TOKEN_LENGTH}, and use latentdiff's sample.py for this one"
        )
    name = "LDMTextToImagePipeline" if kind == "bert" else "StableDiffusionPipeline"
    parts = PIPELINES[name]
    params = jax.device_get(pipe.params)
    first_stage_config = pipe.first_stage.config
    os.makedirs(out, exist_ok=True)
    latent = pipe.latent_shape[0]
    _save_component(
        os.path.join(out, "unet"),
        diffusers_unet_config(config.unet, latent),
        to_diffusers("unet", params["unet"], config.unet),
        "diffusion_pytorch_model.safetensors",
    )
    vae_json = {
        "_class_name": "AutoencoderKL" if first_stage_config.kind == "kl" else "VQModel",
        **diffusers_config(first_stage_config),
        "scaling_factor": float(pipe.scale_factor),
    }
    vae_json = {k: list(v) if isinstance(v, tuple) else v for k, v in vae_json.items()}
    first_stage_params = jax.device_get(pipe.first_stage.variables)["params"]
    _save_component(
        os.path.join(out, parts["vae"]),
        vae_json,
        to_diffusers(parts["vae"], first_stage_params, first_stage_config),
        "diffusion_pytorch_model.safetensors",
    )
    hf = pipe.tokenizer.hf
    if kind == "bert":
        text_json = diffusers_bert_config(config.text_encoder)
    else:
        text_json = hf_clip_config(
            config.text_encoder,
            bos_token_id=hf.bos_token_id,
            eos_token_id=hf.eos_token_id,
            pad_token_id=hf.pad_token_id,
        )
    _save_component(
        os.path.join(out, parts["text"]),
        text_json,
        to_diffusers(parts["text"], params["cond"], config.text_encoder),
        "model.safetensors",
    )
    pipe.tokenizer.save(os.path.join(out, "tokenizer"))
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    config_utils.atomic_write_text(
        os.path.join(out, "scheduler", "scheduler_config.json"),
        json.dumps(diffusers_scheduler_config(config.diffusion), indent=2),
    )
    tok_class = type(hf).__name__
    index: dict[str, Any] = {
        "_class_name": name,
        "unet": ["diffusers", "UNet2DConditionModel"],
        parts["vae"]: ["diffusers", vae_json["_class_name"]],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "tokenizer": ["transformers", tok_class],
    }
    if kind == "bert":
        index["bert"] = ["latent_diffusion", "LDMBertModel"]
    else:
        index.update(
            text_encoder=["transformers", "CLIPTextModel"],
            safety_checker=[None, None],
            feature_extractor=[None, None],
            requires_safety_checker=False,
        )
    config_utils.atomic_write_text(os.path.join(out, "model_index.json"), json.dumps(index, indent=2))
    return name

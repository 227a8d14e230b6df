"""A whole CompVis latent-diffusion checkpoint (`.ckpt` / `.safetensors`) -> a converted latentdiff workdir.

Key groups of a CompVis `LatentDiffusion` state dict, and where each goes:
  first_stage_model.*        AutoencoderKL / VQModelInterface (diffusers_vae.convert_vae_compvis; `loss.*` skipped)
  model.diffusion_model.*    the UNet (diffusers_unet.convert_unet_compvis)
  model_ema.*                LitEma copy of the UNet: `model_ema.` + ('diffusion_model.' + key) with the dots removed,
                             plus `model_ema.decay` / `model_ema.num_updates`; optional (EMA-only releases have
                             the EMA weights under model.diffusion_model.* and at most the two counters)
  cond_stage_model.*         BERTEmbedder (x-transformers), FrozenCLIPEmbedder (`transformer.text_model.*`, HF CLIP) or
                             ClassEmbedder (`embedding.weight`, n_classes rows; the last row is the null class)
  betas, alphas_cumprod ...  the registered schedule: `betas` is checked against the config's schedule
  scale_factor               present when the model was trained with scale_by_std
Every key is accounted for: anything else raises ConversionError listing it.

The architecture comes from the model's CompVis YAML config (`--compvis_config`) or from a preset, a YAML file in
compvis_presets/ with the fields of the public YAMLs: 'txt2img-f8-large' (configs/latent-diffusion/
txt2img-1p4B-eval.yaml, the paper's LDM-KL-8-G), 'cin256-v2' (configs/latent-diffusion/cin256-v2.yaml,
class-conditional ImageNet, VQ-f4) and 'sd-v1' (configs/stable-diffusion/v1-inference.yaml). Fields a YAML omits
take the CompVis class defaults in COMPVIS_DEFAULTS.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import ml_collections
import numpy as np

from latentdiff.convert import scheduler
from latentdiff.convert import workdir as wd
from latentdiff.convert.key_tables import ConversionError, Rule, apply_table
from latentdiff.convert.weight_files import read_json, read_weights
from latentdiff.errors import UserError

# Constructor defaults of the CompVis classes, applied where a YAML leaves a field out.
COMPVIS_DEFAULTS = {
    "LatentDiffusion": dict(
        timesteps=1000,
        beta_schedule="linear",
        linear_start=1e-4,
        linear_end=2e-2,
        parameterization="eps",
        scale_factor=1.0,
        conditioning_key=None,
    ),
    "UNetModel": dict(
        num_heads=-1,
        num_head_channels=-1,
        transformer_depth=1,
        dropout=0.0,
        use_linear_in_transformer=False,
        resblock_updown=False,
        use_scale_shift_norm=False,
        conv_resample=True,
        dims=2,
        num_classes=None,
        n_embed=None,
        use_spatial_transformer=False,
    ),
    "BERTEmbedder": dict(vocab_size=30522, max_seq_len=77),
    "FrozenCLIPEmbedder": dict(version="openai/clip-vit-large-patch14", max_length=77),
}
# x-transformers Encoder defaults used by BERTEmbedder: 8 heads of 64, FF x4 (GELU).
BERT_HEADS, BERT_HEAD_DIM, BERT_FF_MULT = 8, 64, 4
# The text tower of OpenAI CLIP ViT-L/14 (FrozenCLIPEmbedder's default version).
CLIP_L14_NAME = "openai/clip-vit-large-patch14"
CLIP_L14 = dict(vocab_size=49408, width=768, depth=12, num_heads=12, head_dim=64, mlp_ratio=4)

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compvis_presets")


def preset_names() -> list[str]:
    """The presets shipped in PRESET_DIR: one CompVis YAML each, named after the file."""
    return sorted(name[: -len(".yaml")] for name in os.listdir(PRESET_DIR) if name.endswith(".yaml"))


def load_preset(name: str) -> dict:
    """A preset's CompVis YAML (read at run time, as --compvis_config would read the file)."""
    if name not in preset_names():
        raise UserError(f"unknown preset {name!r}; one of {preset_names()} (or pass --compvis_config)")
    return load_compvis_yaml(os.path.join(PRESET_DIR, f"{name}.yaml"))


SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "lvlb_weights",
    "logvar",
)
EMA_PREFIX = "model_ema."
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")
PREFIXES = {"first_stage": "first_stage_model.", "unet": "model.diffusion_model.", "cond": "cond_stage_model."}


def load_compvis_yaml(path: str) -> dict:
    """A CompVis model YAML (yaml.safe_load: data only)."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--compvis_config {path!r} not found")
    with open(path, encoding="utf-8") as f:
        try:
            loaded = yaml.safe_load(f)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1} column {where.column + 1}" if where is not None else ""
            raise ConversionError(f"--compvis_config {path}: not valid YAML{at}; pass the model's .yaml file") from None
    if not isinstance(loaded, dict):
        raise ConversionError(f"--compvis_config {path}: holds a {type(loaded).__name__}, expected a YAML mapping")
    return loaded


def _class(target: str) -> str:
    return str(target).rsplit(".", 1)[-1]


def _params(block: Mapping, defaults_of: str | None) -> dict:
    return {**COMPVIS_DEFAULTS.get(defaults_of or "", {}), **dict(block.get("params") or {})}


def architecture(compvis: Mapping) -> dict:
    """A CompVis YAML dict -> {'unet', 'text_encoder', 'first_stage', 'diffusion', 'latent_size', 'scale_factor',
    'cond_target'} in latentdiff config form. ConversionError for anything our modules do not implement."""
    model = compvis["model"]
    if _class(model["target"]) != "LatentDiffusion":
        raise ConversionError(f"model.target {model['target']!r}: only LatentDiffusion checkpoints are supported")
    p = _params(model, "LatentDiffusion")
    if p["conditioning_key"] != "crossattn":
        raise ConversionError(f"conditioning_key {p['conditioning_key']!r}: only 'crossattn' models are supported")
    if p["beta_schedule"] not in ("linear", "cosine"):
        raise ConversionError(f"beta_schedule {p['beta_schedule']!r}: 'linear' (sqrt-space) or 'cosine' supported")

    u = _params(p["unet_config"], "UNetModel")
    fixed = dict(use_spatial_transformer=True, resblock_updown=False, use_scale_shift_norm=False, conv_resample=True)
    fixed.update(dims=2, num_classes=None, n_embed=None)
    bad = [f"unet {k}={u[k]!r} (supported: {v!r})" for k, v in fixed.items() if u[k] != v]
    if bad:
        raise ConversionError("unsupported UNet settings: " + "; ".join(bad))
    cond = p["cond_stage_config"]
    cond_class = _class(cond["target"])
    c = _params(cond, cond_class)
    if cond_class == "BERTEmbedder":
        text = dict(
            kind="bert",
            vocab_size=int(c["vocab_size"]),
            max_length=int(c["max_seq_len"]),
            width=int(c["n_embed"]),
            depth=int(c["n_layer"]),
            num_heads=BERT_HEADS,
            head_dim=BERT_HEAD_DIM,
            mlp_ratio=BERT_FF_MULT,
        )
    elif cond_class == "FrozenCLIPEmbedder":
        text = {**_clip_architecture(str(c["version"])), "max_length": int(c["max_length"])}
    elif cond_class == "ClassEmbedder":
        n = int(c["n_classes"])
        text = dict(kind="class", num_classes=n - 1, width=int(c["embed_dim"]))
        text.update(vocab_size=0, max_length=0, depth=0, num_heads=0, head_dim=0, mlp_ratio=0)
    else:
        raise ConversionError(
            f"cond_stage_config {cond['target']!r}: BERTEmbedder, FrozenCLIPEmbedder or ClassEmbedder"
        )
    text.setdefault("num_classes", 0)
    text.update(dtype="float32", remat=False, attention_impl="xla")

    first_stage = p["first_stage_config"]
    first_stage_class = _class(first_stage["target"])
    if first_stage_class not in ("AutoencoderKL", "VQModelInterface", "VQModel"):
        raise ConversionError(
            f"first_stage_config {first_stage['target']!r}: AutoencoderKL or VQModelInterface supported"
        )
    f = dict(first_stage["params"])
    dd = f["ddconfig"]
    vq = first_stage_class != "AutoencoderKL"
    first = dict(
        kind="vq" if vq else "kl",
        in_channels=int(dd["in_channels"]),
        out_channels=int(dd["out_ch"]),
        resolution=int(dd["resolution"]),
        ch=int(dd["ch"]),
        ch_mult=tuple(int(m) for m in dd["ch_mult"]),
        num_res_blocks=int(dd["num_res_blocks"]),
        attn_resolutions=tuple(int(r) for r in dd["attn_resolutions"]),
        dropout=float(dd.get("dropout", 0.0)),
        z_channels=int(dd["z_channels"]),
        double_z=bool(dd["double_z"]),
        embed_dim=int(f["embed_dim"]),
        n_embed=int(f["n_embed"]) if vq else 0,
        beta=0.25,
        ema_codebook=False,
        ema_decay=0.99,
        dtype="float32",
    )
    unet = dict(
        in_channels=int(u["in_channels"]),
        out_channels=int(u["out_channels"]),
        model_channels=int(u["model_channels"]),
        channel_mult=tuple(int(m) for m in u["channel_mult"]),
        num_res_blocks=int(u["num_res_blocks"]),
        attention_resolutions=tuple(int(r) for r in u["attention_resolutions"]),
        num_heads=int(u["num_heads"]),
        num_head_channels=int(u["num_head_channels"]),
        transformer_depth=int(u["transformer_depth"]),
        context_dim=int(u["context_dim"]),
        num_classes=0,
        dropout=float(u["dropout"]),
        use_linear_proj=bool(u["use_linear_in_transformer"]),
        dtype="float32",
        remat=False,
        attention_impl="xla",
    )
    if unet["num_head_channels"] != -1:  # openaimodel: num_head_channels wins, heads = channels // it
        unet["num_heads"] = -1
    schedule = "linear" if p["beta_schedule"] == "linear" else "cosine"
    diffusion = scheduler.schedule_fields(
        schedule, p["timesteps"], p["linear_start"], p["linear_end"], str(p["parameterization"])
    )
    return dict(
        unet=unet,
        text_encoder=text,
        first_stage=first,
        diffusion=diffusion,
        latent_size=int(p["image_size"]),
        scale_factor=float(p["scale_factor"]),
        cond_target=cond_class,
    )


def _clip_architecture(version: str) -> dict:
    """FrozenCLIPEmbedder(version): CLIP ViT-L/14's text tower, or the config.json of a local CLIPTextModel dir."""
    from latentdiff.convert.diffusers_clip import clip_config

    if version == CLIP_L14_NAME:
        return dict(kind="clip", **CLIP_L14)
    config_path = os.path.join(version, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(
            f"FrozenCLIPEmbedder version {version!r}: {CLIP_L14_NAME!r} or a local CLIPTextModel directory expected"
        )
    c = clip_config(read_json(config_path))
    return {k: c[k] for k in ("kind", "vocab_size", "width", "depth", "num_heads", "head_dim", "mlp_ratio")}


def default_tokenizer(arch: Mapping) -> str:
    """The tokenizer the CompVis code loads for this conditioning model ('' for class labels)."""
    cond = arch["model"]["params"]["cond_stage_config"]
    cls = _class(cond["target"])
    if cls == "BERTEmbedder":
        return "bert-base-uncased"  # ldm.modules.encoders.modules.BERTTokenizer
    if cls == "FrozenCLIPEmbedder":
        return str(_params(cond, cls)["version"])
    return ""


def _ema_table(unet_cfg: Mapping) -> list[Rule]:
    """LitEma names of the UNet params: 'model_ema.' + ('diffusion_model.' + compvis key) without dots."""
    from latentdiff.convert.diffusers_unet import unet_table

    rules = [
        Rule(EMA_PREFIX + ("diffusion_model." + r.src).replace(".", ""), r.dst, r.transform)
        for r in unet_table(unet_cfg, "compvis")
    ]
    if len({r.src for r in rules}) != len(rules):
        raise ConversionError("two UNet keys collapse to one LitEma name; this architecture cannot be read from EMA")
    return rules


def _check_schedule(state_dict: Mapping[str, np.ndarray], diffusion: Mapping) -> None:
    from latentdiff.diffusion.schedules import make_betas

    if "betas" not in state_dict:
        return
    got = np.asarray(state_dict["betas"], np.float64)
    want = make_betas(diffusion["schedule"], diffusion["timesteps"], diffusion["linear_start"], diffusion["linear_end"])
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-8):
        raise ConversionError(
            f"the checkpoint's betas (T={got.size}, {got[0]:.6g}..{got[-1]:.6g}) differ from the config's schedule "
            f"{diffusion['schedule']} (T={want.size}, {want[0]:.6g}..{want[-1]:.6g}); use the model's own YAML"
        )


def convert_state_dict(state_dict: Mapping[str, np.ndarray], arch: Mapping) -> dict:
    """A CompVis state dict (numpy) + architecture() -> {'first_stage_variables', 'params', 'ema_params' (None without
    model_ema), 'scale_factor' (the checkpoint's buffer or None)}. Every key must be used or known."""
    from latentdiff.convert.diffusers_text import convert_bert_compvis
    from latentdiff.convert.diffusers_unet import abstract_unet, convert_unet_compvis
    from latentdiff.convert.diffusers_vae import convert_vae_compvis

    text_kind = arch["text_encoder"]["kind"]
    first_stage_config = ml_collections.ConfigDict(arch["first_stage"])
    _, first_stage_params = convert_vae_compvis(state_dict, first_stage_config, PREFIXES["first_stage"])
    _, unet_vars = convert_unet_compvis(state_dict, arch["unet"], PREFIXES["unet"])
    if text_kind == "bert":
        _, cond_vars = convert_bert_compvis(state_dict, arch["text_encoder"], PREFIXES["cond"])
        cond_prefix = PREFIXES["cond"]
    elif text_kind == "clip":
        from latentdiff.convert.diffusers_clip import COMPVIS_PREFIX, convert_clip_compvis

        _, cond_vars = convert_clip_compvis(state_dict, arch["text_encoder"], COMPVIS_PREFIX)
        cond_prefix = COMPVIS_PREFIX
    else:
        cond_vars = {"params": _convert_class(state_dict, arch["text_encoder"])}
        cond_prefix = PREFIXES["cond"]

    ema_keys = {k: v for k, v in state_dict.items() if k.startswith(EMA_PREFIX) and k not in EMA_COUNTERS}
    ema_unet = None
    if ema_keys:
        _, abstract = abstract_unet(arch["unet"])
        ema_unet = apply_table(_ema_table(arch["unet"]), ema_keys, abstract, what="CompVis model_ema (LitEma)")
    _check_schedule(state_dict, arch["diffusion"])
    known = (PREFIXES["first_stage"], PREFIXES["unet"], cond_prefix, EMA_PREFIX)
    unexpected = sorted(
        k for k in state_dict if not k.startswith(known) and k not in SCHEDULE_BUFFERS and k != "scale_factor"
    )
    if unexpected:
        raise ConversionError(
            f"{len(unexpected)} unexpected checkpoint keys (not first stage/UNet/conditioning/EMA/schedule):\n  "
            + "\n  ".join(unexpected[:50])
        )
    live = {"unet": unet_vars["params"], "cond": cond_vars["params"]}
    ema = None if ema_unet is None else {"unet": ema_unet, "cond": cond_vars["params"]}
    scale = float(np.asarray(state_dict["scale_factor"]).reshape(())) if "scale_factor" in state_dict else None
    return {
        "first_stage_variables": {"params": first_stage_params},
        "params": live,
        "ema_params": ema,
        "scale_factor": scale,
    }


def _convert_class(state_dict: Mapping[str, np.ndarray], text: Mapping) -> dict:
    """CompVis ClassEmbedder (`cond_stage_model.embedding.weight`, [n_classes, D]) -> our ClassEmbedder params."""
    import jax

    from latentdiff.nn.text_encoder import build_text_encoder, init_tokens

    sub = {k: v for k, v in state_dict.items() if k.startswith(PREFIXES["cond"])}
    module = build_text_encoder(text)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), init_tokens(text, 1)))["params"]
    table = [Rule(PREFIXES["cond"] + "embedding.weight", "embedding/embedding")]
    return apply_table(table, sub, abstract, what="CompVis ClassEmbedder state dict")


def export_state_dict(
    *,
    unet_cfg: Mapping,
    text_cfg: Mapping,
    first_stage_config: ml_collections.ConfigDict,
    first_stage_params: Mapping,
    params: Mapping,
    ema: Mapping | None,
) -> dict[str, np.ndarray]:
    """Our model -> a CompVis-layout state dict (numpy) through the inverse of every key table used on import.

    `params`/`ema` are {'unet', 'cond'}; with `ema`, its UNet is written as LitEma `model_ema.*` keys."""
    from latentdiff.convert.diffusers_text import export_bert_compvis
    from latentdiff.convert.diffusers_unet import _INVERSES, export_table, export_unet_compvis
    from latentdiff.convert.diffusers_vae import build_table
    from latentdiff.convert.key_tables import INVERSES, invert_table

    vae = export_table(invert_table(build_table(first_stage_config, "compvis"), INVERSES), first_stage_params)
    out = {PREFIXES["first_stage"] + k: v for k, v in vae.items()}
    out.update(export_unet_compvis(params["unet"], unet_cfg, PREFIXES["unet"]))
    kind = text_cfg["kind"]
    if kind == "bert":
        out.update(export_bert_compvis(params["cond"], text_cfg, PREFIXES["cond"]))
    elif kind == "clip":
        from latentdiff.convert.diffusers_clip import COMPVIS_PREFIX, export_clip

        out.update(export_clip(params["cond"], text_cfg, COMPVIS_PREFIX))
    else:
        out[PREFIXES["cond"] + "embedding.weight"] = np.asarray(params["cond"]["embedding"]["embedding"])
    if ema is not None:
        out.update(export_table(invert_table(_ema_table(unet_cfg), _INVERSES), ema["unet"]))
    return out


def convert_compvis_checkpoint(
    path: str,
    workdir: str,
    arch: str | Mapping,
    *,
    tokenizer: str = "",
    scale_factor: float = 0.0,
    overwrite: bool = False,
) -> ml_collections.ConfigDict:
    """A CompVis checkpoint -> a converted workdir; returns its config.

    arch: a PRESETS name or a CompVis YAML dict. tokenizer: directory or cached HF name; '' = the one the CompVis
    code loads (bert-base-uncased for BERTEmbedder, the FrozenCLIPEmbedder version, e.g.
    openai/clip-vit-large-patch14), which must then be in the local Hugging Face cache. scale_factor 0 = the
    checkpoint's `scale_factor` buffer, else the YAML's (CompVis default 1.0)."""
    from latentdiff.data.tokenizer import load_tokenizer

    if isinstance(arch, str):
        arch = load_preset(arch)
    wd.check_target(workdir, overwrite)
    a = architecture(arch)
    text = a["text_encoder"]
    tok = None
    if text["kind"] in ("bert", "clip"):
        tokenizer = tokenizer or default_tokenizer(arch)
        tok = load_tokenizer(tokenizer, text["max_length"])
        if tok.vocab_size > text["vocab_size"]:
            raise ConversionError(f"tokenizer has {tok.vocab_size} ids, the text encoder {text['vocab_size']}")
    state_dict, step = read_weights(path)
    converted = convert_state_dict(state_dict, a)
    scale = scale_factor if scale_factor > 0 else converted["scale_factor"] or a["scale_factor"]
    f = 2 ** (len(a["first_stage"]["ch_mult"]) - 1)
    if text["kind"] == "class":
        sampling = wd.sampling_block((88, 301, 980, 207), 3.0)
    else:
        sampling = wd.sampling_block(wd.TEXT_PROMPTS, 5.0 if text["kind"] == "bert" else 7.5)
    config = wd.stage2_config(
        unet=a["unet"],
        text_encoder=text,
        tokenizer=wd.tokenizer_block(tok, tokenizer),
        diffusion=a["diffusion"],
        scale_factor=scale,
        resolution=a["latent_size"] * f,
        sampling=sampling,
    )
    ema = converted["ema_params"]
    wd.write_workdir(
        workdir,
        config=config,
        first_stage_config=ml_collections.ConfigDict(a["first_stage"]),
        first_stage_variables=converted["first_stage_variables"],
        ema_params=ema if ema is not None else converted["params"],
        params=converted["params"] if ema is not None else None,
        tokenizer=tok,
        source=f"compvis:{os.path.abspath(path)}",
        step=step,
        overwrite=overwrite,
    )
    return config

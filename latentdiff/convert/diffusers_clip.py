"""CLIP text model weights: Hugging Face `CLIPTextModel` (Stable Diffusion's `text_encoder/`) and CompVis
`FrozenCLIPEmbedder` checkpoints <-> our `TextEncoder` (variant "clip", latentdiff/nn/text_encoder.py).

  ours                    HF CLIPTextModel (under the layout's prefix)
  token_emb/embedding     embeddings.token_embedding.weight
  pos_emb/embedding       embeddings.position_embedding.weight
  block_{i}/norm1         encoder.layers.{i}.layer_norm1
  block_{i}/attn/to_q|k|v encoder.layers.{i}.self_attn.q_proj|k_proj|v_proj      (weight and bias)
  block_{i}/attn/to_out   encoder.layers.{i}.self_attn.out_proj
  block_{i}/norm2         encoder.layers.{i}.layer_norm2
  block_{i}/fc1|fc2       encoder.layers.{i}.mlp.fc1|fc2
  final_norm              final_layer_norm
Prefixes: 'text_model.' in the published SD checkpoints (transformers 4), none in files saved by transformers 5,
'cond_stage_model.transformer.text_model.' in CompVis SD checkpoints. The `embeddings.position_ids` buffer (arange)
that older files carry is ignored by name. Export writes the 'text_model.' layout, which both transformers 4 and 5 load.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import numpy as np
from flax import traverse_util

from latentdiff.convert.diffusers_unet import export_table, freeze_config
from latentdiff.convert.key_tables import (
    HF_GENERIC_INERT,
    INVERSES,
    ConversionError,
    Rule,
    apply_table,
    dense_kernel,
    field_problems,
    field_table,
    identity,
    invert_table,
)
from latentdiff.errors import UserError
from latentdiff.nn.text_encoder import TextEncoder, build_text_encoder, init_tokens, text_encoder_fields

HF_PREFIX = "text_model."
COMPVIS_PREFIX = "cond_stage_model.transformer.text_model."
POSITION_IDS = "embeddings.position_ids"

_TOP = {
    "token_emb": "embeddings.token_embedding",
    "pos_emb": "embeddings.position_embedding",
    "final_norm": "final_layer_norm",
}
_LAYER = {"norm1": "layer_norm1", "norm2": "layer_norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}


def _module_key(path: tuple[str, ...]) -> str:
    """Our module path (without the leaf) -> the HF module key (without prefix)."""
    if path[0] in _TOP:
        return _TOP[path[0]]
    layer = f"encoder.layers.{int(path[0].split('_')[1])}"
    if path[1] == "attn":
        return f"{layer}.self_attn.{_ATTN[path[2]]}"
    return f"{layer}.{_LAYER[path[1]]}"


@functools.lru_cache(maxsize=16)
def _abstract_params(frozen: tuple) -> dict:
    c = dict(frozen)
    module = build_text_encoder(c)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), init_tokens(c, 1)))["params"]


def abstract_clip(cfg: Mapping) -> tuple[TextEncoder, dict]:
    """(TextEncoder, abstract params) via jax.eval_shape (cached per config); cfg.kind must be 'clip'."""
    c = text_encoder_fields(cfg)
    if c["kind"] != "clip":
        raise UserError(f"the CLIP converters need text_encoder.kind='clip', got {c['kind']!r}")
    return build_text_encoder(c), _abstract_params(freeze_config(c))


def clip_table(cfg: Mapping, prefix: str = "") -> list[Rule]:
    """The explicit key table: one Rule per param of our TextEncoder, source keys under `prefix`."""
    _, abstract = abstract_clip(cfg)
    rules = []
    for path in traverse_util.flatten_dict(abstract):
        leaf = path[-1]
        src = f"{prefix}{_module_key(path[:-1])}.{_LEAF[leaf]}"
        rules.append(Rule(src, "/".join(path), dense_kernel if leaf == "kernel" else identity))
    return rules


def _check_position_ids(state_dict: Mapping[str, np.ndarray], key: str) -> None:
    if key in state_dict:
        ids = np.asarray(state_dict[key]).reshape(-1)
        if not np.array_equal(ids, np.arange(ids.size)):
            raise ConversionError(f"{key!r} is not arange(n): this CLIP text model uses custom positions")


def hf_prefix(state_dict: Mapping[str, np.ndarray]) -> str:
    """'text_model.' (transformers 4 files, the published SD weights) or '' (files saved by transformers 5)."""
    return HF_PREFIX if f"{HF_PREFIX}{_TOP['token_emb']}.weight" in state_dict else ""


def convert_clip(state_dict: Mapping[str, np.ndarray], cfg: Mapping) -> tuple[TextEncoder, dict]:
    """HF CLIPTextModel state dict (numpy; with or without the 'text_model.' prefix) -> (module, {'params': ...})."""
    prefix = hf_prefix(state_dict)
    module, abstract = abstract_clip(cfg)
    _check_position_ids(state_dict, prefix + POSITION_IDS)
    params = apply_table(
        clip_table(cfg, prefix),
        state_dict,
        abstract,
        ignored=(prefix + POSITION_IDS,),
        what=f"CLIPTextModel state dict (prefix {prefix!r})",
    )
    return module, {"params": params}


def convert_clip_compvis(
    state_dict: Mapping[str, np.ndarray], cfg: Mapping, prefix: str = COMPVIS_PREFIX
) -> tuple[TextEncoder, dict]:
    """CompVis FrozenCLIPEmbedder weights (keys under `prefix`; other keys are skipped) -> (module, variables)."""
    sub = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not sub:
        raise ConversionError(f"no key of the checkpoint starts with prefix {prefix!r}; pass the CLIP model's prefix")
    module, abstract = abstract_clip(cfg)
    _check_position_ids(sub, prefix + POSITION_IDS)
    params = apply_table(
        clip_table(cfg, prefix),
        sub,
        abstract,
        ignored=(prefix + POSITION_IDS,),
        what=f"CompVis FrozenCLIPEmbedder state dict (prefix {prefix!r})",
    )
    return module, {"params": params}


def export_clip(params: Mapping, cfg: Mapping, prefix: str = HF_PREFIX) -> dict[str, np.ndarray]:
    """Our TextEncoder params -> CLIPTextModel state dict (numpy, keys under `prefix`, no position_ids)."""
    params = params.get("params", params)
    return export_table(invert_table(clip_table(cfg, prefix), INVERSES), params)


# CLIPTextConfig fields read into our config, by clip_config.
CLIP_MAPPED = (
    "vocab_size",
    "max_position_embeddings",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
# Fields whose only implemented value is given: SD v1's OpenAI CLIP.
CLIP_FIXED = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "pruned_heads": {}}
# Fields that leave the last hidden state (what the UNet cross-attends to) unchanged, with the reason.
CLIP_INERT = {
    "projection_dim": "CLIPTextModelWithProjection's text_projection only; CLIPTextModel has none",
    "attention_dropout": "training only: the converted encoder runs without dropout",
    "dropout": "training only (older config files): the converted encoder runs without dropout",
    "initializer_range": "initialisation only",
    "initializer_factor": "initialisation only",
    "pad_token_id": "the tokenizer's business: the encoder masks nothing (causal mask only)",
    "bos_token_id": "the tokenizer's business",
    "eos_token_id": "picks the pooled output's token; the last hidden state does not use it",
} | HF_GENERIC_INERT


def clip_field_table() -> dict[str, str]:
    """Every CLIPTextConfig field latentdiff knows -> 'mapped' | 'fixed' | 'inert'; any other field is refused."""
    return field_table(CLIP_FIXED, CLIP_MAPPED, CLIP_INERT)


def clip_config(hf: Mapping) -> dict:
    """A transformers CLIPTextConfig dict (text_encoder/config.json) -> our text_encoder config (kind 'clip').

    Raises ConversionError for variants our module does not implement (activation, LayerNorm eps, fields it does not
    know...).
    """
    problems = field_problems(hf, CLIP_FIXED, clip_field_table())
    width, heads, inner = int(hf["hidden_size"]), int(hf["num_attention_heads"]), int(hf["intermediate_size"])
    if width % heads:
        problems.append(f"hidden_size {width} not divisible by num_attention_heads {heads}")
    if inner % width:
        problems.append(f"intermediate_size {inner} is not a multiple of hidden_size {width}")
    if problems:
        raise ConversionError("unsupported CLIP text config: " + "; ".join(problems))
    return dict(
        kind="clip",
        vocab_size=int(hf["vocab_size"]),
        max_length=int(hf["max_position_embeddings"]),
        width=width,
        depth=int(hf["num_hidden_layers"]),
        num_heads=heads,
        head_dim=width // heads,
        mlp_ratio=inner // width,
        num_classes=0,
        dtype="float32",
        remat=False,
        attention_impl="xla",
    )


def hf_clip_config(cfg: Mapping, *, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> dict:
    """Our text_encoder config (kind 'clip') -> a transformers CLIPTextConfig dict (for text_encoder/config.json)."""
    c = text_encoder_fields(cfg)
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": int(c["vocab_size"]),
        "max_position_embeddings": int(c["max_length"]),
        "hidden_size": int(c["width"]),
        "intermediate_size": int(c["width"]) * int(c["mlp_ratio"]),
        "num_hidden_layers": int(c["depth"]),
        "num_attention_heads": int(c["num_heads"]),
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": int(c["width"]),
        "bos_token_id": int(bos_token_id),
        "eos_token_id": int(eos_token_id),
        "pad_token_id": int(pad_token_id),
        "torch_dtype": "float32",
    }

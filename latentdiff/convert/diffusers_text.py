"""Text encoder weights: diffusers LDMBertModel and CompVis BERTEmbedder checkpoints <-> our `TextEncoder`.

  ours                      diffusers LDMBertModel                 CompVis (cond_stage_model.) x-transformers
  token_emb/embedding       model.embed_tokens.weight              transformer.token_emb.weight
  pos_emb/embedding         model.embed_positions.weight           transformer.pos_emb.emb.weight
  block_{i}/norm1           model.layers.{i}.self_attn_layer_norm  transformer.attn_layers.layers.{2i}.0
  block_{i}/attn/to_q|k|v   model.layers.{i}.self_attn.q|k|v_proj  transformer.attn_layers.layers.{2i}.1.to_q|k|v
  block_{i}/attn/to_out     model.layers.{i}.self_attn.out_proj    transformer.attn_layers.layers.{2i}.1.to_out
  block_{i}/norm2           model.layers.{i}.final_layer_norm      transformer.attn_layers.layers.{2i+1}.0
  block_{i}/fc1             model.layers.{i}.fc1                   transformer.attn_layers.layers.{2i+1}.1.net.0.0
  block_{i}/fc2             model.layers.{i}.fc2                   transformer.attn_layers.layers.{2i+1}.1.net.2
  final_norm                model.layer_norm                       transformer.norm
The output projection (`to_logits.*` / `transformer.to_logits.*`) is not part of our model and is ignored by name.
In x-transformers every layer is a (norm, module, residual) triple; the residual has no weights, 'a' and 'f'
layers alternate, hence the 2i / 2i+1 indices.
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

LAYOUTS = ("diffusers", "compvis")

_TOP = {
    "diffusers": {
        "token_emb": "model.embed_tokens",
        "pos_emb": "model.embed_positions",
        "final_norm": "model.layer_norm",
    },
    "compvis": {
        "token_emb": "transformer.token_emb",
        "pos_emb": "transformer.pos_emb.emb",
        "final_norm": "transformer.norm",
    },
}
_IGNORED = {
    "diffusers": ("to_logits.weight", "to_logits.bias"),
    "compvis": ("transformer.to_logits.weight", "transformer.to_logits.bias"),
}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}
_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_DIFFUSERS_LAYER = {"norm1": "self_attn_layer_norm", "norm2": "final_layer_norm", "fc1": "fc1", "fc2": "fc2"}


def _module_key(path: tuple[str, ...], layout: str) -> str:
    """Our module path (without the leaf) -> the source module key."""
    if path[0] in _TOP[layout]:
        return _TOP[layout][path[0]]
    i = int(path[0].split("_")[1])
    sub = path[1:]
    if layout == "diffusers":
        layer = f"model.layers.{i}"
        if sub[0] == "attn":
            return f"{layer}.self_attn.{_ATTN[sub[1]]}"
        return f"{layer}.{_DIFFUSERS_LAYER[sub[0]]}"
    attn_layer, ff_layer = f"transformer.attn_layers.layers.{2 * i}", f"transformer.attn_layers.layers.{2 * i + 1}"
    if sub[0] == "attn":
        return f"{attn_layer}.1.{sub[1]}"
    return {
        "norm1": f"{attn_layer}.0",
        "norm2": f"{ff_layer}.0",
        "fc1": f"{ff_layer}.1.net.0.0",
        "fc2": f"{ff_layer}.1.net.2",
    }[sub[0]]


@functools.lru_cache(maxsize=16)
def _abstract_params(frozen: tuple) -> dict:
    c = dict(frozen)
    module = build_text_encoder(c)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), init_tokens(c, 1)))["params"]


def abstract_text_encoder(cfg: Mapping) -> tuple[TextEncoder, dict]:
    """(TextEncoder, abstract params) via jax.eval_shape (cached per config); cfg.kind must be 'bert'."""
    c = text_encoder_fields(cfg)
    if c["kind"] != "bert":
        raise UserError(f"the BERT converters need text_encoder.kind='bert', got {c['kind']!r}")
    return build_text_encoder(c), _abstract_params(freeze_config(c))


def bert_table(cfg: Mapping, layout: str) -> list[Rule]:
    """The explicit key table for `layout` ('diffusers' | 'compvis'): one Rule per param of our TextEncoder."""
    if layout not in LAYOUTS:
        raise UserError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _, abstract = abstract_text_encoder(cfg)
    rules = []
    for path in traverse_util.flatten_dict(abstract):
        leaf = path[-1]
        src = f"{_module_key(path[:-1], layout)}.{_LEAF[leaf]}"
        rules.append(Rule(src, "/".join(path), dense_kernel if leaf == "kernel" else identity))
    return rules


def _convert(state_dict: Mapping[str, np.ndarray], cfg: Mapping, layout: str, what: str) -> tuple[TextEncoder, dict]:
    module, abstract = abstract_text_encoder(cfg)
    params = apply_table(bert_table(cfg, layout), state_dict, abstract, ignored=_IGNORED[layout], what=what)
    return module, {"params": params}


def convert_bert(state_dict: Mapping[str, np.ndarray], cfg: Mapping) -> tuple[TextEncoder, dict]:
    """diffusers LDMBertModel state dict (numpy) -> (TextEncoder, {'params': ...}). to_logits.* is ignored."""
    return _convert(state_dict, cfg, "diffusers", "diffusers LDMBertModel state dict")


def convert_bert_compvis(
    state_dict: Mapping[str, np.ndarray], cfg: Mapping, prefix: str = "cond_stage_model."
) -> tuple[TextEncoder, dict]:
    """CompVis BERTEmbedder weights (keys under `prefix`; other keys are skipped) -> (TextEncoder, variables)."""
    sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not sub:
        raise ConversionError(f"no key of the checkpoint starts with prefix {prefix!r}; pass the text encoder's prefix")
    return _convert(sub, cfg, "compvis", f"CompVis BERTEmbedder state dict (prefix {prefix!r})")


def export_bert(params: Mapping, cfg: Mapping) -> dict[str, np.ndarray]:
    """Our TextEncoder params -> LDMBertModel state dict without to_logits (load with strict=False), numpy."""
    params = params.get("params", params)
    return export_table(invert_table(bert_table(cfg, "diffusers"), INVERSES), params)


def export_bert_compvis(params: Mapping, cfg: Mapping, prefix: str = "cond_stage_model.") -> dict[str, np.ndarray]:
    """Our TextEncoder params -> CompVis BERTEmbedder keys (with `prefix`, no to_logits), numpy."""
    params = params.get("params", params)
    out = export_table(invert_table(bert_table(cfg, "compvis"), INVERSES), params)
    return {prefix + k: v for k, v in out.items()}


# --------------------------------------------------------------------------------------------- LDMBertConfig <-> ours


# LDMBertConfig fields read into our config, by bert_config_from_diffusers.
_BERT_MAPPED = (
    "vocab_size",
    "max_position_embeddings",
    "encoder_layers",
    "encoder_ffn_dim",
    "encoder_attention_heads",
    "head_dim",
    "d_model",
)


# Fields whose only implemented value is given (the CompVis BERTEmbedder that LDMBert reproduces).
_BERT_FIXED = {"activation_function": "gelu", "scale_embedding": False, "pruned_heads": {}}


# Fields that leave the encoder's output unchanged at inference, with the reason.
_BERT_INERT = {
    "dropout": "training only: the converted encoder runs without dropout",
    "attention_dropout": "training only",
    "activation_dropout": "training only",
    "encoder_layerdrop": "training only (skips whole layers at random while training)",
    "classifier_dropout": "no classifier head",
    "init_std": "initialisation only",
    "use_cache": "decoder key/value caching; the encoder has no cache",
    "num_hidden_layers": "a copy of encoder_layers that LDMBertConfig writes; the model builds encoder_layers layers",
    "pad_token_id": "the padding row of the embedding table: initialisation and gradients only, loaded as is",
} | HF_GENERIC_INERT


def bert_field_table() -> dict[str, str]:
    """Every LDMBertConfig field latentdiff knows -> 'mapped' | 'fixed' | 'inert'; any other field is refused."""
    return field_table(_BERT_FIXED, _BERT_MAPPED, _BERT_INERT)


def bert_config_from_diffusers(d: Mapping) -> dict:
    """LDMBertConfig config.json -> our text_encoder config (kind 'bert')."""
    problems = field_problems(d, _BERT_FIXED, bert_field_table())
    width, ffn = int(d["d_model"]), int(d["encoder_ffn_dim"])
    if ffn % width:
        problems.append(f"encoder_ffn_dim {ffn} is not a multiple of d_model {width}")
    if problems:
        raise ConversionError("unsupported LDMBert config: " + "; ".join(problems))
    return dict(
        kind="bert",
        vocab_size=int(d["vocab_size"]),
        max_length=int(d["max_position_embeddings"]),
        width=width,
        depth=int(d["encoder_layers"]),
        num_heads=int(d["encoder_attention_heads"]),
        head_dim=int(d["head_dim"]),
        mlp_ratio=ffn // width,
        num_classes=0,
        dtype="float32",
        remat=False,
        attention_impl="xla",
    )


def diffusers_bert_config(text: Mapping) -> dict:
    """Our text_encoder config (kind 'bert') -> LDMBertConfig config.json."""
    return {
        "architectures": ["LDMBertModel"],
        "model_type": "ldmbert",
        "vocab_size": int(text["vocab_size"]),
        "max_position_embeddings": int(text["max_length"]),
        "encoder_layers": int(text["depth"]),
        "encoder_ffn_dim": int(text["width"]) * int(text["mlp_ratio"]),
        "encoder_attention_heads": int(text["num_heads"]),
        "head_dim": int(text["head_dim"]),
        "d_model": int(text["width"]),
        "activation_function": "gelu",
        "scale_embedding": False,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }

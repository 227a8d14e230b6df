"""The weight converters' explicit key tables and config field tables, with strict checks.

A converter builds a *table*: a list of `Rule(src, dst, transform)` where `src` is a key of the source state dict
(PyTorch layout, numpy arrays) and `dst` is a '/'-joined path into our Flax params. `apply_table` checks every
converted array against the abstract params from `jax.eval_shape(init)`, and raises `ConversionError` listing every
missing, unexpected or mis-shaped key: nothing is renamed heuristically and nothing is silently dropped (keys a
converter deliberately ignores are passed as `ignored`). A config translation classifies every field of the source
config as mapped, fixed (must hold a value we support) or inert (`field_table`, `field_problems`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from latentdiff.errors import UserError


class ConversionError(UserError):
    """Raised when a state dict does not map one-to-one onto our params."""


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight [O, I, kh, kw] -> Flax kernel [kh, kw, I, O]."""
    return np.transpose(w, (2, 3, 1, 0))


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch linear weight [O, I] -> Flax kernel [I, O]. A 1x1 conv weight [O, I, 1, 1] is accepted too."""
    if w.ndim == 4:
        w = w[:, :, 0, 0]
    return np.transpose(w, (1, 0))


def identity(w: np.ndarray) -> np.ndarray:
    """Biases, norm scales and embeddings keep their layout."""
    return w


def inverse_conv_kernel(k: np.ndarray) -> np.ndarray:
    """Flax kernel [kh, kw, I, O] -> PyTorch conv weight [O, I, kh, kw]."""
    return np.transpose(k, (3, 2, 0, 1))


def inverse_dense_kernel(k: np.ndarray) -> np.ndarray:
    """Flax kernel [I, O] -> PyTorch linear weight [O, I]."""
    return np.transpose(k, (1, 0))


@dataclass(frozen=True)
class Rule:
    """One source key mapped to one destination param path ('a/b/kernel') through `transform`."""

    src: str
    dst: str
    transform: Callable[[np.ndarray], np.ndarray] = identity


# Keys a transformers PretrainedConfig (config.json of a text encoder) may carry besides its model's own fields,
# generation settings of older files included: none changes an encoder's last hidden state ('pruned_heads' does, and
# is checked by the converters as a fixed field).
HF_GENERIC_INERT = {
    **dict.fromkeys(
        ("architectures", "model_type", "transformers_version", "name_or_path", "_name_or_path"), "metadata"
    ),
    **dict.fromkeys(("dtype", "torch_dtype", "use_bfloat16"), "storage precision: the converter reads float32"),
    **dict.fromkeys(
        ("output_hidden_states", "output_attentions", "return_dict", "torchscript", "use_return_dict"),
        "which outputs PyTorch returns, not their values",
    ),
    **dict.fromkeys(
        ("chunk_size_feed_forward", "_attn_implementation", "attn_implementation"),
        "how PyTorch schedules the same computation",
    ),
    **dict.fromkeys(
        ("id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "task_specific_params", "prefix"),
        "classification / task heads the text encoder has none of",
    ),
    **dict.fromkeys(
        (
            "is_encoder_decoder",
            "is_decoder",
            "add_cross_attention",
            "cross_attention_hidden_size",
            "tie_encoder_decoder",
            "tie_word_embeddings",
            "decoder_start_token_id",
            "sep_token_id",
            "tokenizer_class",
            "max_length",
            "min_length",
            "do_sample",
            "early_stopping",
            "num_beams",
            "num_beam_groups",
            "diversity_penalty",
            "temperature",
            "top_k",
            "top_p",
            "typical_p",
            "repetition_penalty",
            "length_penalty",
            "no_repeat_ngram_size",
            "encoder_no_repeat_ngram_size",
            "bad_words_ids",
            "num_return_sequences",
            "output_scores",
            "return_dict_in_generate",
            "forced_bos_token_id",
            "forced_eos_token_id",
            "remove_invalid_values",
            "exponential_decay_length_penalty",
            "suppress_tokens",
            "begin_suppress_tokens",
            "tf_legacy_loss",
        ),
        "text generation / decoder settings: an encoder's forward pass does not read them",
    ),
}


def field_table(fixed: Iterable[str], mapped: Iterable[str], inert: Iterable[str]) -> dict[str, str]:
    """Every config field a converter knows -> 'fixed' | 'mapped' | 'inert' (field_problems refuses the others)."""
    return dict.fromkeys(fixed, "fixed") | dict.fromkeys(mapped, "mapped") | dict.fromkeys(inert, "inert")


def field_problems(config: Mapping, fixed: Mapping[str, object], known: Iterable[str]) -> list[str]:
    """What of a model's config.json the converter does not reproduce: each `fixed` field present with another value
    (`fixed[f]` is the value latentdiff implements), and every field outside `known` (a newer library may add fields
    that change the forward pass: they are refused, never ignored). Keys starting with '_' are metadata."""
    problems = [
        f"{field}={config[field]!r} (latentdiff implements {want!r})"
        for field, want in fixed.items()
        if field in config and config[field] != want
    ]
    known = set(known) | set(fixed)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        problems.append(f"fields latentdiff does not reproduce: {', '.join(unknown)}")
    return problems


def apply_table(
    table: Iterable[Rule],
    state_dict: Mapping[str, np.ndarray],
    abstract_params: Mapping,
    *,
    ignored: Iterable[str] = (),
    what: str = "state dict",
) -> dict:
    """Maps `state_dict` into a params pytree shaped like `abstract_params` (from jax.eval_shape).

    Raises ConversionError naming every missing source key, unexpected source key (not in the table and not
    `ignored`), shape mismatch, and every destination param the table leaves unset.
    """
    table = list(table)
    flat_target = {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(abstract_params)).items()}
    problems: list[str] = []
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for rule in table:
        if rule.src not in state_dict:
            problems.append(f"missing source key {rule.src!r} (for {rule.dst})")
            continue
        used.add(rule.src)
        if rule.dst not in flat_target:
            problems.append(f"table maps {rule.src!r} to unknown param {rule.dst!r}")
            continue
        value = np.asarray(rule.transform(np.asarray(state_dict[rule.src])))
        expected = tuple(flat_target[rule.dst].shape)
        if value.shape != expected:
            problems.append(f"shape mismatch for {rule.src!r} -> {rule.dst}: got {value.shape}, expected {expected}")
            continue
        if rule.dst in out:
            problems.append(f"param {rule.dst} assigned twice (second from {rule.src!r})")
        out[rule.dst] = value.astype(flat_target[rule.dst].dtype)
    ignored = set(ignored)
    unexpected = sorted(set(state_dict) - used - ignored)
    problems += [f"unexpected source key {k!r}" for k in unexpected]
    unset = sorted(set(flat_target) - set(out))
    problems += [f"param {k} not set by any source key" for k in unset]
    if problems:
        head = f"{what} does not match the model config ({len(problems)} problems):\n  "
        raise ConversionError(head + "\n  ".join(problems[:50]) + ("\n  ..." if len(problems) > 50 else ""))
    return traverse_util.unflatten_dict({tuple(k.split("/")): jax.numpy.asarray(v) for k, v in out.items()})


def invert_table(table: Iterable[Rule], inverse: Mapping[Callable, Callable]) -> list[Rule]:
    """The export table: dst -> src with each transform replaced by its inverse (`inverse[transform]`)."""
    return [Rule(r.dst, r.src, inverse[r.transform]) for r in table]


INVERSES: dict[Callable, Callable] = {
    conv_kernel: inverse_conv_kernel,
    dense_kernel: inverse_dense_kernel,
    identity: identity,
}


def field_problem(field: str, got: Any, want: Any) -> str:
    return f"{field}={got!r} (latentdiff implements {want!r})"


def attention_levels(down: list, up: list, attn_blocks: tuple[str, str], plain_blocks: tuple[str, str]) -> tuple:
    """diffusers' down/up block type lists -> (levels whose down block has attention, problems). attn_blocks and
    plain_blocks are (down type, up type) pairs; the up list must mirror the down list."""
    levels, problems = [], []
    for level, block in enumerate(down):
        if block not in (attn_blocks[0], plain_blocks[0]):
            problems.append(f"down_block_types[{level}]={block!r} ({attn_blocks[0]} or {plain_blocks[0]})")
        with_attn = block == attn_blocks[0]
        want_up = attn_blocks[1] if with_attn else plain_blocks[1]
        if len(up) != len(down) or up[len(down) - 1 - level] != want_up:
            problems.append(f"up_block_types {up} must mirror down_block_types {down}")
        if with_attn:
            levels.append(level)
    return levels, problems


def holds(got: object, want: object) -> bool:
    if isinstance(want, tuple):
        return any(holds(got, w) for w in want)
    if isinstance(want, float) and isinstance(got, int | float) and not isinstance(got, bool):
        return got == want
    return got == want

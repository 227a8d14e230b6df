"""A category classifier for labelled folder datasets (the emoji set's 10 categories, `latentdiff emoji`): a small
Flax CNN of our own, trained on the training split's images, that scores whether generated images show the category
of their caption (the share of images it assigns to that category).

    latentdiff eval category --train data/emoji/train --heldout data/emoji/heldout --out emoji_category.safetensors

Trains, prints the held-out accuracy (the classifier's own quality: read any generated-image score against it), and
writes the weights with their label names and resolution (safetensors; `load_classifier`).

Model: 4 stages of [3x3 conv, GroupNorm, SiLU] with 2x average pooling between them (width, 2x, 4x, 4x channels),
global average pooling, a linear layer to the classes. Training: AdamW with cosine decay; batches drawn with equal
weight per category (the emoji set is 60% People & Body, skin-tone variants included: drawn uniformly, the small
categories were barely learned, held-out balanced accuracy 0.57); random horizontal flips and shifts of up to 1/8 of
the image (the emoji are centred; generated ones need not be). The report gives plain and balanced (mean per
category) accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from latentdiff import errors, params_io
from latentdiff.data import folder as folder_lib
from latentdiff.errors import UserError
from latentdiff.output_paths import check_output_file

FORMAT = "latentdiff-category-classifier-1"
PREDICT_BATCH = 256  # images per forward pass when scoring


class CategoryCNN(nn.Module):
    """images [B, R, R, 3] in [-1, 1] -> class logits [B, num_classes]."""

    num_classes: int
    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for index, channels in enumerate((self.width, 2 * self.width, 4 * self.width, 4 * self.width)):
            if index:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
            x = nn.Conv(channels, (3, 3), padding="SAME")(x)
            x = nn.silu(nn.GroupNorm(num_groups=8)(x))
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def read_labelled_folder(folder: str, resolution: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images uint8 [N, R, R, 3], label ids int32 [N], label names) of a folder dataset whose rows carry labels."""
    index = folder_lib.scan_folder(folder)
    if not index.label_names:
        raise UserError(f"{folder} has no labels (captions.jsonl 'label'): a category classifier needs them")
    images = []
    for entry in index.entries:
        with Image.open(os.path.join(index.folder, entry.relpath)) as img:
            rgb = img.convert("RGB")
            if rgb.size != (resolution, resolution):
                rgb = rgb.resize((resolution, resolution), Image.Resampling.BICUBIC)
            images.append(np.asarray(rgb, np.uint8))
    labels = np.asarray([entry.label for entry in index.entries], np.int32)
    return np.stack(images), labels, index.label_names


def to_model_input(images: np.ndarray) -> jax.Array:
    """uint8 [N, R, R, 3] -> float32 in [-1, 1]."""
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def augment(rng: jax.Array, x: jax.Array) -> jax.Array:
    """Random horizontal flips and circular shifts of up to 1/8 of the size, per image ([B, R, R, 3])."""
    flip_rng, shift_rng = jax.random.split(rng)
    flips = jax.random.bernoulli(flip_rng, 0.5, (x.shape[0], 1, 1, 1))
    x = jnp.where(flips, x[:, :, ::-1], x)
    limit = max(1, x.shape[1] // 8)
    shifts = jax.random.randint(shift_rng, (x.shape[0], 2), -limit, limit + 1)
    return jax.vmap(lambda image, s: jnp.roll(image, (s[0], s[1]), axis=(0, 1)))(x, shifts)


def balanced_pick_probabilities(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-image probabilities float32 [N] that give every category present the same total (batches are drawn with
    them, so a category's share of the training signal does not follow its share of the images)."""
    counts = np.bincount(labels, minlength=num_classes)
    return (1.0 / counts[labels] / np.count_nonzero(counts)).astype(np.float32)


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    width: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> dict:
    """Trained params of CategoryCNN(num_classes, width) on images uint8 [N, R, R, 3] with label ids [N]."""
    if len(images) < batch_size:
        raise UserError(f"{len(images)} training images are fewer than one batch of {batch_size}; lower --batch_size")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    model = CategoryCNN(num_classes, width)
    rng = jax.random.key(seed)
    params = model.init(rng, to_model_input(images[:1]))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps)
    optimizer = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = optimizer.init(params)
    images_device, labels_device = jnp.asarray(images), jnp.asarray(labels)
    pick_weights = jnp.asarray(balanced_pick_probabilities(labels, num_classes))

    @jax.jit
    def step(params: Any, opt_state: Any, rng: jax.Array) -> tuple[Any, Any, jax.Array]:
        pick_rng, augment_rng = jax.random.split(rng)
        picks = jax.random.choice(pick_rng, len(images), (batch_size,), p=pick_weights)
        x = augment(augment_rng, to_model_input(images_device[picks]))

        def loss_fn(p: Any) -> jax.Array:
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels_device[picks]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for index in range(steps):
        params, opt_state, _ = step(params, opt_state, jax.random.fold_in(rng, index))
    return jax.device_get(params)


def predict(params: dict, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities [N, C] of images uint8 [N, R, R, 3]."""
    num_classes = params["Dense_0"]["kernel"].shape[-1]
    width = params["Conv_0"]["kernel"].shape[-1]
    apply = jax.jit(lambda p, x: jax.nn.softmax(CategoryCNN(num_classes, width).apply({"params": p}, x)))
    out = [
        np.asarray(apply(params, to_model_input(images[i : i + batch_size]))) for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out)


def accuracy(params: dict, images: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose most probable class is their label."""
    return float(np.mean(predict(params, images, PREDICT_BATCH).argmax(axis=-1) == labels))


def balanced_accuracy(params: dict, images: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the categories present in `labels` of the share of their images classified right."""
    correct = predict(params, images, PREDICT_BATCH).argmax(axis=-1) == labels
    return float(np.mean([correct[labels == k].mean() for k in np.unique(labels)]))


def save_classifier(path: str, params: dict, label_names: tuple[str, ...], resolution: int) -> None:
    metadata = {"format": FORMAT, "label_names": json.dumps(list(label_names)), "resolution": str(resolution)}
    params_io.save_params(path, params, metadata)


def load_classifier(path: str) -> tuple[dict, tuple[str, ...], int]:
    """(params, label names, resolution) of a file written by save_classifier (shape-checked)."""
    if not os.path.isfile(path):
        raise UserError(f"no category classifier at {path!r}; train one with `latentdiff eval category`")
    meta = params_io.read_metadata(path)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path!r} is not a category classifier file ({FORMAT!r})")
    names = tuple(json.loads(meta["label_names"]))
    resolution = int(meta["resolution"])
    params = params_io.load_params(path)
    width = params["Conv_0"]["kernel"].shape[-1]
    x = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
    abstract = jax.eval_shape(lambda x: CategoryCNN(len(names), width).init(jax.random.key(0), x), x)["params"]
    return params_io.load_params(path, abstract), names, resolution


def relabel(labels: np.ndarray, names: tuple[str, ...], reference: tuple[str, ...], where: str) -> np.ndarray:
    """Label ids over `names` -> ids over `reference` (the training split's names); an unknown name is an error."""
    unknown = sorted(set(names) - set(reference))
    if unknown:
        raise UserError(f"{where} has categories the training split lacks: {', '.join(unknown)}")
    return np.asarray([reference.index(names[i]) for i in labels], np.int32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="latentdiff eval category", description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True, help="labelled folder dataset to train on (e.g. data/emoji/train)")
    p.add_argument("--heldout", required=True, help="labelled folder dataset to report accuracy on")
    p.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    p.add_argument("--resolution", type=int, default=64, help="images are resized to this (px)")
    p.add_argument("--width", type=int, default=32, help="channels of the first stage")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Trains and saves the classifier; returns {'train_accuracy', 'heldout_accuracy', 'seconds', ...}."""
    if args.steps < 1 or args.batch_size < 1 or args.resolution < 16 or args.width < 8:
        raise UserError("--steps and --batch_size must be >= 1, --resolution >= 16 and --width >= 8")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr must be a positive number, got {args.lr}")
    if not args.out.endswith(".safetensors"):
        raise UserError(f"--out must name a .safetensors file, got {args.out!r}")
    check_output_file(args.out, "--out")  # before reading or training, not after
    start = time.perf_counter()
    images, labels, names = read_labelled_folder(args.train, args.resolution)
    held_images, held_labels, held_names = read_labelled_folder(args.heldout, args.resolution)
    held_labels = relabel(held_labels, held_names, names, args.heldout)
    params = train_classifier(
        images, labels, len(names), width=args.width, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed,
    )  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_classifier(args.out, params, names, args.resolution)
    report = {
        "train_accuracy": accuracy(params, images, labels),
        "heldout_accuracy": accuracy(params, held_images, held_labels),
        "heldout_balanced_accuracy": balanced_accuracy(params, held_images, held_labels),
        "train_images": len(images),
        "heldout_images": len(held_images),
        "categories": len(names),
        "seconds": round(time.perf_counter() - start, 1),
        "out": args.out,
    }
    print(json.dumps(report))
    return report


def main(argv: list[str]) -> None:
    arguments = parse_args(argv)
    errors.run_cli(lambda: run(arguments))

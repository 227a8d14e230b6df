"""Precomputed stage-1 latents (written by `latentdiff encode`) as a stage-2 data source.

A latents directory holds memory-mappable arrays, one `.npy` file each (read with np.load(mmap_mode="r"), so a
dataset of millions of examples is never loaded into RAM):
  KL first stage:  mean.npy, logvar.npy   float32 [N, h, w, c]  (posterior moments; stage 2 samples the posterior)
  VQ first stage:  latents.npy            float32 [N, h, w, c]  (pre-quantisation latents)
  labels.npy      int32 [N]               (only when the dataset has labels)
  captions.jsonl  one JSON string per line, N lines
  meta.json       {"format": "npy", "kind", "latent_shape", "embed_dim", "downsample_factor", "resolution",
                   "num", "scale_factor", "latent_std", "workdir", "step", "split"}

`LatentIterator` has the interface of the image pipeline's DataIterator: `next()` gives this process's share of each
global batch as numpy arrays {"moments": f32 [b, h, w, 2c] (mean then logvar on channels) | "latents": f32
[b, h, w, c], "caption": str [b], "tokens": i32 [b, L] (with a tokenizer), "label": i32 [b] (with labels)},
b = global_batch_size // process_count; `get_state()` / `set_state()` give and restore the exact position.
Training order: epoch e visits a permutation of the N examples drawn from (seed, e) and cut into N // global batches
(the last partial batch is dropped; the next epoch reshuffles, so every example is used); process p of P reads rows
[p·b, (p+1)·b) of each global batch. Eval order (shuffle=False): one pass in index order.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from latentdiff import config_utils
from latentdiff.data.errors import DataError
from latentdiff.data.tokenizer import Tokenizer

META = "meta.json"
CAPTIONS = "captions.jsonl"
LABELS = "labels.npy"
ARRAYS = {"kl": ("mean", "logvar"), "vq": ("latents",)}


def read_meta(directory: str) -> dict[str, Any]:
    """meta.json of a latents directory; DataError (one line) if it is not one written by latentdiff.encode."""
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        raise DataError(
            f"no {META} in first_stage.latents={directory!r}; write it with "
            f"latentdiff encode --workdir AE_WORKDIR --out {directory}"
        )
    meta = config_utils.read_json_file(path, "the latents' metadata")
    if meta.get("format") != "npy":  # a field of our own file: older versions wrote one latents.npz
        raise DataError(f"{directory!r} was written by an older latentdiff.encode (latents.npz); re-run the encoder")
    return meta


def open_arrays(directory: str) -> tuple[dict[str, np.ndarray], np.ndarray | None, list[str]]:
    """({name: memory-mapped [N, h, w, c]}, memory-mapped labels [N] or None, captions) of a latents directory."""
    meta = read_meta(directory)
    names = ARRAYS[meta["kind"]]
    arrays = {n: np.load(os.path.join(directory, f"{n}.npy"), mmap_mode="r") for n in names}
    num = int(meta["num"])
    for name, arr in arrays.items():
        if arr.shape != (num, *meta["latent_shape"]):
            raise DataError(
                f"{directory}/{name}.npy has shape {arr.shape}, meta.json says {[num, *meta['latent_shape']]}"
            )
    label_path = os.path.join(directory, LABELS)
    labels = np.load(label_path, mmap_mode="r") if os.path.isfile(label_path) else None
    with open(os.path.join(directory, CAPTIONS), encoding="utf-8") as f:
        captions = [json.loads(line) for line in f]
    if len(captions) != num or (labels is not None and len(labels) != num):
        raise DataError(f"{directory!r}: captions/labels do not have the {num} rows of meta.json; re-run the encoder")
    return arrays, labels, captions


class LatentIterator:
    """This process's batches of a latents directory (see the module docstring); exact get_state()/set_state()."""

    def __init__(
        self,
        directory: str,
        *,
        global_batch_size: int,
        process_index: int,
        process_count: int,
        seed: int,
        shuffle: bool,
        tokenizer: Tokenizer | None,
    ) -> None:
        if process_count < 1 or not 0 <= process_index < process_count:
            raise DataError(f"bad process_index={process_index} / process_count={process_count}")
        if global_batch_size < process_count or global_batch_size % process_count:
            raise DataError(f"global batch size {global_batch_size} is not a multiple of process_count={process_count}")
        if seed < 0:
            raise DataError(f"data seed must be >= 0, got {seed}")
        self.directory = directory
        self.meta = read_meta(directory)
        self._arrays, self._labels, self._captions = open_arrays(directory)
        self.num_examples = int(self.meta["num"])
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.seed = seed
        self.shuffle = shuffle
        self.tokenizer = tokenizer
        self.batches_per_epoch = self.num_examples // global_batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{directory!r} has {self.num_examples} examples, fewer than one global batch of {global_batch_size}"
            )
        self.num_batches = None if shuffle else self.batches_per_epoch  # as DataIterator: None = infinite
        self._epoch = 0
        self._batch = 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def __iter__(self) -> LatentIterator:
        return self

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            else:
                self._order = np.arange(self.num_examples)
            self._order_epoch = epoch
        return self._order

    def indices(self, epoch: int, batch: int) -> np.ndarray:
        """Example indices of this process's rows of global batch `batch` of `epoch` [b]."""
        start = batch * self.global_batch_size + self.process_index * self.local_batch_size
        return self._epoch_order(epoch)[start : start + self.local_batch_size]

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batch >= self.batches_per_epoch:
            if not self.shuffle:
                raise StopIteration
            self._epoch, self._batch = self._epoch + 1, 0
        idx = self.indices(self._epoch, self._batch)
        self._batch += 1
        return self.read(idx)

    def read(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The batch of examples `idx` [b] (rows are read in sorted order, the memory-map friendly way)."""
        order = np.argsort(idx, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        sorted_idx = idx[order]
        rows = {n: np.asarray(a[sorted_idx], np.float32)[inverse] for n, a in self._arrays.items()}
        out: dict[str, np.ndarray] = {}
        if "latents" in rows:
            out["latents"] = rows["latents"]
        else:
            out["moments"] = np.concatenate([rows["mean"], rows["logvar"]], axis=-1)
        out["caption"] = np.array([self._captions[i] for i in idx], dtype=str)
        if self._labels is not None:
            out["label"] = np.asarray(self._labels[sorted_idx], np.int32)[inverse]
        if self.tokenizer is not None:
            out["tokens"] = self.tokenizer.encode(out["caption"].tolist())
        return out

    def get_state(self) -> dict:
        """JSON-serialisable position: {"epoch", "batch"} (the next global batch to read) and the settings."""
        return {
            "epoch": self._epoch,
            "batch": self._batch,
            "num_examples": self.num_examples,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
        }

    def set_state(self, state: dict) -> None:
        """Continues from a position saved by get_state() of an iterator over the same latents and settings."""
        mine = self.get_state()
        if "num_examples" not in state:  # the checkpoint's run read images (data.*), not precomputed latents
            raise DataError(
                "this workdir was trained on images encoded on the fly, not on precomputed latents "
                "(--config.first_stage.latents): a workdir keeps its input; train from latents in a new --workdir, "
                "or drop --config.first_stage.latents to continue this one"
            )
        for key in ("num_examples", "global_batch_size", "seed"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"cannot restore the latent iterator: saved {key}={state.get(key)!r} but this run has "
                    f"{mine[key]!r} (different latents or settings?)"
                )
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])

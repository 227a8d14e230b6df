"""Shared builders of toy-size configs and workdirs for the tests (imported by test modules, not collected)."""

from __future__ import annotations

import os

from latentdiff.config_utils import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shrink_data(config, data_dir, *, num_train: int, num_validation: int, num_novel: int) -> None:
    """16 px shapes with the given split sizes, prepared under data_dir; no progress bars."""
    config.data.data_dir = str(data_dir)
    config.data.resolution = 16
    config.data.shapes_num_train = num_train
    config.data.shapes_num_validation = num_validation
    config.data.shapes_num_novel = num_novel
    config.progress_bar = False


def train_tiny_kl_f4(workdir, data_dir, *, steps: int, num_validation: int) -> None:
    """autoencoder_kl_f4:tiny at 16 px, 32 channels, batch 8, trained `steps` steps into workdir (no eval/images)."""
    from latentdiff.train import train_and_evaluate

    ae = load_config(os.path.join(ROOT, "configs/autoencoder_kl_f4.py:tiny"))
    shrink_data(ae, data_dir, num_train=64, num_validation=num_validation, num_novel=16)
    ae.autoencoder.resolution = 16
    ae.autoencoder.ch = 32
    ae.batch_size = 8
    ae.num_train_steps = steps
    ae.log_every = ae.checkpoint_every = steps
    ae.eval_every = ae.image_every = 10**9
    train_and_evaluate(ae, str(workdir))


# `--config.FIELD=VALUE` overrides that shrink configs/ldm_txt2img_kl8.py:tiny to a seconds-per-step model on 16 px
# shapes (train.py subprocess tests: resume, evaluation during training).
TINY_LDM_OVERRIDES = {
    "data.resolution": 16,
    "data.shapes_num_train": 256,
    "data.shapes_num_validation": 32,
    "data.shapes_num_novel": 32,
    "batch_size": 8,
    "log_every": 1,
    "image_every": 10**9,
    "progress_bar": False,
    "first_stage.scale_factor": 1.0,
    "unet.model_channels": 32,
    "unet.channel_mult": "(1,)",
    "unet.attention_resolutions": "()",
    "unet.num_heads": 2,
    "unet.context_dim": 32,
    "text_encoder.width": 32,
    "text_encoder.depth": 1,
    "text_encoder.num_heads": 2,
    "text_encoder.head_dim": 16,
    "text_encoder.max_length": 8,
    "tokenizer.max_length": 8,
    "text_encoder.vocab_size": 128,
    "tokenizer.vocab_size": 128,
}


def write_random_first_stage(directory) -> None:
    """A random 16 px KL-f8 stage-1 export (32 channels, one res block) in `directory` (a stage-2 workdir's
    first_stage/), the frozen model TINY_LDM_OVERRIDES runs train on: weights N(0, 0.05²), norm scales 1, biases 0."""
    import jax
    import numpy as np

    from latentdiff.first_stage import abstract_autoencoder_variables, save_first_stage_export

    ae = load_config(os.path.join(ROOT, "configs/autoencoder_kl_f8.py:tiny")).autoencoder
    ae.resolution, ae.ch, ae.ch_mult, ae.num_res_blocks = 16, 32, (1, 1, 1), 1
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("scale"):
            return np.ones(leaf.shape, leaf.dtype)
        if name.endswith("bias"):
            return np.zeros(leaf.shape, leaf.dtype)
        return (0.05 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, abstract_autoencoder_variables(ae))
    save_first_stage_export(ae, variables, str(directory))

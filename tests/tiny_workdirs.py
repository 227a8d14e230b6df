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

"""Every safetensors file latentdiff writes gets the user's umask mode, not safetensors' 0600 (issue 24 #6)."""

import os
import stat

import numpy as np

from latentdiff import params_io
from latentdiff.convert import inception_weights, lpips_weights


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_safetensors_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "a" / "w.safetensors"
        params_io.save_params(str(path), {"dense": {"kernel": np.ones((2, 3), np.float32)}}, {"format": "x"})
        assert mode_of(path) == 0o644
        assert params_io.load_params(str(path))["dense"]["kernel"].shape == (2, 3)
        assert not [p for p in os.listdir(path.parent) if ".tmp." in p]  # the temporary file was renamed
        os.umask(0o027)
        params_io.write_safetensors(str(tmp_path / "b.safetensors"), {"x": np.zeros(3)})
        assert mode_of(tmp_path / "b.safetensors") == 0o640
    finally:
        os.umask(old)


def test_converters_write_through_the_one_writer():
    """The converters own no safetensors writer of their own (one owner of the format)."""
    for module in (inception_weights, lpips_weights):
        source = open(module.__file__).read()
        assert "save_file" not in source and "params_io.write_safetensors" in source

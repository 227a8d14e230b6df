"""TorchScript archives are read as data: same tensors as torch.jit.load, without running the archive (issue 24 #1)."""

import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from latentdiff.convert import inception_weights as iw
from latentdiff.convert import torchscript_archive as ta
from latentdiff.convert.key_tables import ConversionError
from latentdiff.convert.safe_pickle import UnsafePickleError


class Inner(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.arange(4, dtype=torch.float64))
        self.register_buffer("steps", torch.tensor(7))
        # a non-contiguous view of a larger tensor: stored as (storage, offset, size, stride)
        self.register_buffer("strided", torch.arange(24.0).reshape(4, 6)[1:, ::2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.mean.float().view(1, -1, 1, 1)


class Outer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(Inner(), torch.nn.ReLU())
        self.head = torch.nn.Linear(4, 2).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(2, 3))


def scripted_file(tmp_path) -> str:
    torch.manual_seed(0)
    path = str(tmp_path / "module.pt")
    torch.jit.save(torch.jit.script(Outer()), path)
    return path


def test_reads_the_same_tensors_as_torch_without_loading_it(tmp_path, monkeypatch):
    path = scripted_file(tmp_path)
    reference = {k: v for k, v in torch.jit.load(path).state_dict().items()}

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.jit.load must not be called on a weight file")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    ours = ta.read_state_dict(path)
    assert sorted(ours) == sorted(reference)
    for name, tensor in reference.items():
        expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        got = ours[name].astype(np.float32) if tensor.dtype == torch.bfloat16 else ours[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    assert ours["net.0.strided"].tolist() == [[6.0, 8.0, 10.0], [12.0, 14.0, 16.0], [18.0, 20.0, 22.0]]
    # the inception loader goes through this reader too (and names the file when the keys are not Inception's)
    with pytest.raises(ConversionError, match="not an FID Inception-v3 state dict"):
        iw.load_inception_params(path)


class _RunsCommand:
    """Pickles as a call of os.system: what a crafted data.pkl would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def replace_data_pkl(path: str, out: str, data: bytes) -> None:
    """Copies the TorchScript zip at `path` to `out` with its `<root>/data.pkl` replaced."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, data if name.endswith("/data.pkl") else src.read(name))


def test_malicious_archive_is_refused_and_leaves_no_trace(tmp_path):
    marker = tmp_path / "pwned"
    evil = str(tmp_path / "evil.pt")
    replace_data_pkl(scripted_file(tmp_path), evil, pickle.dumps(_RunsCommand(f"touch {marker}"), protocol=2))
    with pytest.raises(UnsafePickleError, match=r"refusing global (posix|os)\.system"):
        ta.read_state_dict(evil)
    with pytest.raises(ConversionError, match=r"evil\.pt: refusing global"):
        iw.read_state_dict(evil)
    # the converter CLI: one line, exit 2, nothing written, nothing run
    out = tmp_path / "out.safetensors"
    cmd = [sys.executable, "-m", "latentdiff.convert.inception_weights", "--src", evil, "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode != 0 and result.stderr.strip().startswith("error:"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not out.exists()


def test_tensor_view_outside_its_storage_is_refused():
    storage = np.zeros(6, np.float32)
    with pytest.raises(UnsafePickleError, match="reaches past its storage"):
        ta._rebuild_tensor_v2(storage, 2, (2, 3), (3, 1))
    with pytest.raises(UnsafePickleError, match="malformed"):
        ta._rebuild_tensor_v2(storage, 0, (2,), (-1,))
    assert ta._rebuild_tensor_v2(storage, 0, (0, 3), (3, 1)).shape == (0, 3)

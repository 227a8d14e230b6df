"""latentdiff.evaluation (references, fid, txt2img, alignment) and its commands (eval/*.py, `latentdiff eval ...`).

Oracles: pytorch-fid's own directory pipeline (calculate_fid_given_paths with the same random weights), the shapes
generator (latentdiff.data.shapes.make_examples renders exactly what the prepared split holds), the grader's ceiling
on ground-truth images (~1.0 by construction of the data), and counts of pipeline calls. One Inception compile for
the whole file: every image is 32 px, every feature batch is 8, preprocessing 'pytorch_fid'.
"""

import functools
import glob
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_fid import fid_score
from pytorch_fid import inception as pfi

from latentdiff import metrics
from latentdiff.convert import inception_weights as iw
from latentdiff.data import shapes
from latentdiff.data.input_pipeline import default_data_config
from latentdiff.evaluation import alignment as alignment_protocol
from latentdiff.evaluation import fid as fid_cli
from latentdiff.evaluation import references
from latentdiff.evaluation import txt2img as txt2img_protocol
from latentdiff.generation import initial_noise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 32
BATCH = 8
PRE = "pytorch_fid"
SPLIT_SIZE = 8  # examples per shapes split in the test dataset


def fid_architecture():
    """pytorch-fid's fid_inception_v3() network without its weight download (torchvision Inception3 + FID blocks)."""
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
    return net


@functools.cache
def torch_state_dict() -> dict:
    """Random weights for the FID Inception (He-scaled kernels, plausible BN statistics)."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in fid_architecture().state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = v
        elif k.endswith("weight") and v.ndim > 1:
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / np.prod(v.shape[1:])) ** 0.5
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("bn.weight"):
            sd[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
    return sd


def pytorch_fid_net():
    """Replaces pytorch_fid.inception.fid_inception_v3: the same network with the random weights."""
    net = fid_architecture()
    net.load_state_dict(torch_state_dict())
    return net


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(params, path of a .safetensors written by the converter) for the same random weights."""
    params = iw.convert_state_dict({k: v.numpy() for k, v in torch_state_dict().items()})
    path = str(tmp_path_factory.mktemp("w") / "inception.safetensors")
    iw.save_params(params, path, "random")
    return params, path


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory) -> ml_collections.ConfigDict:
    cfg = default_data_config()
    cfg.update(
        dict(
            name="shapes",
            resolution=RES,
            data_dir=str(tmp_path_factory.mktemp("tfds")),
            shapes_num_train=SPLIT_SIZE,
            shapes_num_validation=SPLIT_SIZE,
            shapes_num_novel=SPLIT_SIZE,
            read_threads=1,
        )
    )
    return cfg


@pytest.fixture(scope="module")
def data_workdir(tmp_path_factory, data_cfg) -> str:
    """A directory whose config.json carries only the data section (what fid.py --workdir reads)."""
    d = tmp_path_factory.mktemp("wd")
    (d / "config.json").write_text(json.dumps({"data": data_cfg.to_dict()}))
    return str(d)


def split_images(split: str) -> tuple[np.ndarray, list[str]]:
    return shapes.make_examples(SPLIT_SIZE, RES, split, 0)


def fid_main(args: list[str]) -> dict:
    return fid_cli.main([*args, "--batch_size", str(BATCH), "--preprocess", PRE])


def error_of(args: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        fid_main(args)
    assert e.value.code == 2
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------------ fid.py


@pytest.fixture(scope="module")
def val_pool(weights) -> np.ndarray:
    """Our pool features of the validation split rendered directly by the shapes generator."""
    return metrics.inception_features(weights[0], split_images("validation")[0], BATCH, PRE)[0]


def fid_by_cross_gram(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID from features, written from the definition another way: with centred X1, X2, Σi = XiᵀXi/(ni−1) and
    Tr((Σ1Σ2)^½) = ‖X1 X2ᵀ‖_* / √((n1−1)(n2−1)) (nuclear norm: the eigenvalues of Σ1Σ2 are the squared singular
    values of X1X2ᵀ over (n1−1)(n2−1))."""
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    x1, x2 = f1 - f1.mean(0), f2 - f2.mean(0)
    n1, n2 = len(f1), len(f2)
    nuclear = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum()
    tr1, tr2 = (x1**2).sum() / (n1 - 1), (x2**2).sum() / (n2 - 1)
    return float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + tr1 + tr2 - 2 * nuclear / np.sqrt((n1 - 1) * (n2 - 1)))


@pytest.mark.parametrize("n", [5, 40, 100])  # fewer images than dimensions (singular Σ1) and more
def test_frechet_lowrank_matches_pytorch_fid(n):
    rng = np.random.default_rng(n)
    d = 64
    f1 = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3
    f2 = rng.normal(size=(70, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.5
    s2 = metrics.stats(f2)
    ref = fid_score.calculate_frechet_distance(*metrics.stats(f1), *s2)
    assert metrics.frechet_distance_lowrank(f1, s2) == pytest.approx(ref, rel=1e-6)
    assert metrics.frechet_distance_lowrank(f1, s2) == pytest.approx(fid_by_cross_gram(f1, f2), rel=1e-6)
    with pytest.raises(ValueError, match="different dimensions"):
        metrics.frechet_distance_lowrank(f1, (np.zeros(4), np.eye(4)))


def test_fid_dirs_match_pytorch_fid(tmp_path, weights, monkeypatch):
    """Two image directories: features and stats as pytorch-fid's own directory pipeline computes them."""
    _, wpath = weights
    dirs = []
    for split in ("train", "validation"):
        d = tmp_path / split
        d.mkdir()
        for i, im in enumerate(split_images(split)[0]):
            Image.fromarray(im).save(d / f"{i}.png")
        dirs.append(str(d))
    monkeypatch.setattr(pfi, "fid_inception_v3", pytorch_fid_net)
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    acts = [
        fid_score.get_activations(sorted(glob.glob(f"{d}/*.png")), model, BATCH, 2048, "cpu", num_workers=0)
        for d in dirs
    ]
    out, saved = str(tmp_path / "fid.json"), str(tmp_path / "gen_stats.npz")
    args = ["--generated", dirs[0], "--reference", dirs[1], "--inception_weights", wpath]
    result = fid_main([*args, "--json", out, "--save_stats", saved])
    assert result["fid"] == pytest.approx(fid_by_cross_gram(*acts), rel=1e-3)
    mu, sigma = references.load_stats(saved)
    scale = np.abs(acts[0]).max()
    np.testing.assert_allclose(mu, acts[0].mean(0), rtol=0, atol=2e-4 * scale)
    np.testing.assert_allclose(sigma, np.cov(acts[0], rowvar=False), rtol=0, atol=2e-4 * scale**2)
    saved_json = json.load(open(out))
    assert saved_json["n_generated"] == SPLIT_SIZE and saved_json["fid"] == result["fid"]
    assert "inception_score_mean" in result  # the weights have the fc layer
    # an unreadable file is skipped (with a warning) and counted
    (tmp_path / "train" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped 1"):
        image_set = references.load_image_set(dirs[0])
    assert image_set.skipped == 1 and sum(len(c) for c in image_set.chunks()) == SPLIT_SIZE


def test_fid_tfds_shapes_reference_is_the_split(tmp_path, weights, data_cfg, data_workdir, val_pool):
    """tfds:shapes/validation through the data loader = the split's images rendered directly (as a set)."""
    _, wpath = weights
    direct = str(tmp_path / "val_stats.npz")
    references.save_stats(direct, *metrics.stats(val_pool))
    saved = str(tmp_path / "loader_stats.npz")
    spec = "tfds:shapes/validation"
    args = ["--generated", spec, "--reference", direct, "--workdir", data_workdir, "--save_stats", saved]
    result = fid_main([*args, "--inception_weights", wpath])
    assert result["n_generated"] == SPLIT_SIZE
    trace = np.trace(metrics.stats(val_pool)[1])
    assert abs(result["fid"]) < 1e-5 * trace  # the same images
    np.testing.assert_allclose(references.load_stats(saved)[0], val_pool.mean(0), rtol=0, atol=1e-5 * trace)
    # --num_reference: the first examples only; another split gives other images
    four = references.load_image_set(spec, data_base=data_cfg, num=4)
    assert sum(len(c) for c in four.chunks()) == 4
    novel = references.load_image_set("tfds:shapes/novel", data_base=data_cfg)
    novel_images = np.concatenate(list(novel.chunks()))
    expected = split_images("novel")[0]
    assert sorted(map(bytes, novel_images)) == sorted(map(bytes, expected))  # same set, storage order aside


def test_fid_bad_inputs(tmp_path, weights):
    _, wpath = weights
    one = tmp_path / "one"
    one.mkdir()
    Image.fromarray(split_images("train")[0][0]).save(one / "0.png")
    two = str(tmp_path / "two.npz")
    np.savez(two, images=split_images("train")[0][:2])
    msg = error_of(["--generated", str(one), "--reference", two, "--inception_weights", wpath])
    assert str(one) in msg and "at least 2 images" in msg
    s64, s2048 = str(tmp_path / "s64.npz"), str(tmp_path / "s2048.npz")
    references.save_stats(s64, np.zeros(64), np.eye(64))
    references.save_stats(s2048, np.zeros(2048), np.eye(2048))
    msg = error_of(["--generated", s64, "--reference", s2048])
    assert s64 in msg and s2048 in msg and "64-d" in msg
    wrong = str(tmp_path / "wrong.safetensors")
    from safetensors.numpy import save_file

    save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, wrong)
    msg = error_of(["--generated", two, "--reference", two, "--inception_weights", wrong])
    assert wrong in msg and "pt_inception" in msg
    junk = str(tmp_path / "junk.safetensors")
    open(junk, "wb").write(b"\x00" * 64)
    msg = error_of(["--generated", two, "--reference", two, "--inception_weights", junk])
    assert junk in msg
    assert "no such" in error_of(["--generated", str(tmp_path / "missing"), "--reference", two])
    assert "tfds:NAME/SPLIT" in error_of(["--generated", two, "--reference", "tfds:shapes", "--resolution", "32"])
    assert "--resolution" in error_of(["--generated", two, "--reference", "tfds:shapes/novel"])
    # as a script: exit status 2 and exactly one line on stderr
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "eval", "fid.py"), "--generated", s64, "--reference", s2048],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")


# ------------------------------------------------------------------------------------------------------ txt2img


class StubPipeline:
    """Stands in for latentdiff.pipeline.Pipeline: images are a fixed function of each image's initial noise."""

    def __init__(self, data_cfg, lookup: dict | None = None):
        self.config = ml_collections.ConfigDict({"data": data_cfg.to_dict()})
        self.resolution = RES
        self.step = 7
        self.latent_shape = (4, 4, 4)
        self.lookup = lookup  # caption -> image (alignment tests); None: images from the noise
        self.calls = 0
        self.generated = 0
        self.batch_sizes = set()

    def __call__(self, prompts, *, sampler, steps, guidance, eta, seed, batch_size, x_T, progress=None):
        assert x_T.shape == (len(prompts), *self.latent_shape)
        if progress is not None:
            progress(len(prompts))
        self.calls += 1
        self.generated += len(prompts)
        self.batch_sizes.add(batch_size)
        if self.lookup is not None:
            return np.stack([self.lookup[p] for p in prompts])
        noise = np.asarray(x_T).reshape(len(prompts), -1)
        base = ((noise[:, :3] * 40 + 128) * guidance).clip(0, 255)  # one colour per image from its noise
        return np.broadcast_to(base[:, None, None, :], (len(prompts), RES, RES, 3)).astype(np.uint8).copy()


def txt2img(pipe, out, params, *, shard_size=3, guidance=1.5, num=SPLIT_SIZE):
    settings = txt2img_protocol.SampleSettings("ddim", 5, guidance, 0.0, 0)
    return txt2img_protocol.run_txt2img(
        pipe,
        reference="tfds:shapes/validation",
        num=num,
        out=out,
        settings=settings,
        shard_size=shard_size,
        batch_size=0,
        params=params,
        inception_batch_size=BATCH,
        preprocess=PRE,
    )


def shard_images(out: str) -> np.ndarray:
    names = sorted(os.listdir(os.path.join(out, "shards")))
    return np.concatenate([np.load(os.path.join(out, "shards", n))["images"] for n in names])


def test_txt2img_resumes_and_scores(tmp_path, weights, data_cfg, val_pool):
    params, _ = weights
    out = str(tmp_path / "run")
    pipe = StubPipeline(data_cfg)
    first = txt2img(pipe, out, params)
    assert (pipe.calls, pipe.generated, first["shards"], first["shards_generated"]) == (3, SPLIT_SIZE, 3, 3)
    assert pipe.batch_sizes == {3}  # the last shard (2 captions) is padded to the same batch: one compile
    assert np.isfinite(first["fid"]) and "inception_score_mean" in first
    assert json.load(open(os.path.join(out, "results.json")))["fid"] == first["fid"]
    before = shard_images(out)
    # captions: the validation split's, one per example; reference stats: that split's images
    captions = json.load(open(os.path.join(out, f"captions_n{SPLIT_SIZE}.json")))["captions"]
    assert sorted(captions) == sorted(split_images("validation")[1])
    ref_mu, _ = references.load_stats(os.path.join(out, f"reference_stats_n{SPLIT_SIZE}_{PRE}.npz"))
    np.testing.assert_allclose(ref_mu, val_pool.mean(0), rtol=0, atol=1e-5 * np.abs(val_pool).max())
    # second run: nothing regenerated
    again = txt2img(pipe, out, None)
    assert pipe.calls == 3 and again["shards_generated"] == 0
    # a lost shard is regenerated alone, identically (noise depends on the global image index only)
    os.remove(os.path.join(out, "shards", "00001.npz"))
    txt2img(pipe, out, None)
    assert pipe.calls == 4 and pipe.generated == SPLIT_SIZE + 3
    np.testing.assert_array_equal(shard_images(out), before)
    # another shard size in a fresh directory gives the same images
    other = str(tmp_path / "run4")
    txt2img(StubPipeline(data_cfg), other, None, shard_size=4)
    assert len(os.listdir(os.path.join(other, "shards"))) == 2
    after = shard_images(other)
    np.testing.assert_array_equal(after, before)
    expected_noise = np.asarray(initial_noise(0, jnp.arange(SPLIT_SIZE), (4, 4, 4))).reshape(SPLIT_SIZE, -1)
    colours = ((expected_noise[:, :3] * 40 + 128) * 1.5).clip(0, 255).astype(np.uint8)
    np.testing.assert_array_equal(after[:, 0, 0], colours)
    # other settings in the same directory: refused
    with pytest.raises(references.EvalError, match="other settings"):
        txt2img(pipe, out, None, guidance=3.0)


def test_an_unprepared_reference_fails_first_and_leaves_nothing_behind(tmp_path, weights, data_cfg, monkeypatch):
    """txt2img: no images, no settings.json (a next run with other settings is not refused); fid.py: the reference is
    checked before the generated set's features are computed; the hint names a flag that exists."""
    unprepared = data_cfg.copy_and_resolve_references()
    unprepared.name = "cifar10"
    pipe = StubPipeline(unprepared)
    out = tmp_path / "run"
    settings = txt2img_protocol.SampleSettings("ddim", 5, 1.5, 0.0, 0)
    kwargs = dict(num=4, shard_size=2, batch_size=0, params=None, inception_batch_size=BATCH, preprocess=PRE)
    for _ in range(2):
        with pytest.raises(Exception, match="is not prepared") as err:
            txt2img_protocol.run_txt2img(pipe, reference="tfds:cifar10/test", out=str(out),
                                            settings=settings, data_dir=str(tmp_path / "tfds"), **kwargs)  # fmt: skip
        assert "\n" not in str(err.value) and "--config.data.download=True" in str(err.value)
        assert pipe.calls == 0 and not out.exists()
        settings = txt2img_protocol.SampleSettings("ddim", 7, 3.0, 0.0, 0)  # other settings: still the same error

    computed = []
    monkeypatch.setattr(fid_cli, "features", lambda *a, **k: computed.append(1))
    two = str(tmp_path / "two.npz")
    np.savez(two, images=split_images("train")[0][:2])
    _, wpath = weights
    args = ["--generated", two, "--reference", "tfds:cifar10/test", "--resolution", "16"]
    msg = error_of([*args, "--data_dir", str(tmp_path / "tfds"), "--inception_weights", wpath])
    assert "is not prepared" in msg and computed == []


def test_txt2img_without_weights_skips_fid(tmp_path, data_cfg):
    result = txt2img(StubPipeline(data_cfg), str(tmp_path / "r"), None, num=4)
    assert result["fid_skipped"] == "no --inception_weights given" and "fid" not in result
    with pytest.raises(references.EvalError, match="has 8 examples"):
        txt2img(StubPipeline(data_cfg), str(tmp_path / "r2"), None, num=9)


# ------------------------------------------------------------------------------------------------------ alignment


def alignment(pipe, params, num=16):
    settings = txt2img_protocol.SampleSettings("ddim", 5, 3.0, 0.0, 0)
    return alignment_protocol.run_alignment(
        pipe,
        split="novel",
        num=num,
        data_seed=0,
        settings=settings,
        batch_size=0,
        params=params,
        inception_batch_size=BATCH,
        preprocess=PRE,
    )


def test_alignment_on_ground_truth_and_shuffled(weights, data_cfg):
    params, _ = weights
    images, captions = shapes.make_examples(16, RES, "novel", 0)
    truth = StubPipeline(data_cfg, lookup=dict(zip(captions, images)))
    report, generated, caps = alignment(truth, None)
    assert caps == captions and generated.shape == (16, RES, RES, 3)
    attrs = [k for k in ("colour", "shape", "size", "position") if k in report["alignment"]]
    assert attrs == ["colour", "shape", "size", "position"]
    for k in [*attrs, "all"]:
        assert report["alignment"][k] >= 0.9, (k, report["alignment"])  # the data itself: the grader's ceiling
        assert report["alignment"][k] == report["reference_alignment"][k]
    assert report["alignment"]["num_images"] == 16 and report["fid_skipped"] == "no --inception_weights given"
    assert "FID skipped" in alignment_protocol.format_alignment(report)
    # each caption paired with another caption's image: accuracy falls
    rolled = StubPipeline(data_cfg, lookup=dict(zip(captions, np.roll(images, 1, axis=0))))
    bad, _, _ = alignment(rolled, None)
    assert bad["alignment"]["all"] < 0.5 < bad["reference_alignment"]["all"]
    # with weights: FID against the split's images (the same images here: 0)
    eight, eight_captions = shapes.make_examples(8, RES, "novel", 0)
    scored, _, _ = alignment(StubPipeline(data_cfg, lookup=dict(zip(eight_captions, eight))), params, num=8)
    assert abs(scored["fid"]) < 1e-3 and scored["preprocess"] == PRE
    assert "FID vs shapes/novel" in alignment_protocol.format_alignment(scored)


def test_alignment_needs_shapes_model(data_cfg):
    cfg = data_cfg.copy_and_resolve_references()
    cfg.name = "coco_captions"
    with pytest.raises(references.EvalError, match="trained on 'coco_captions'"):
        alignment(StubPipeline(cfg), None)


def test_a_sample_set_is_what_its_manifest_lists(tmp_path, capsys):
    """eval reads exactly the manifest's images (a grid or a stray file is not a sample); sample.py refuses a folder
    with images it did not make, and replaces only its own previous set."""
    from latentdiff import sample_set
    from latentdiff.errors import UserError

    out = tmp_path / "samples"
    out.mkdir()
    images = split_images("train")[0][:3]
    for i, image in enumerate(images):
        Image.fromarray(image).save(out / sample_set.image_name(i))
    sample_set.write_manifest(str(out), [sample_set.image_name(i) for i in range(3)], ["a", "b", "c"], {"steps": "5"})
    Image.fromarray(images[0]).save(out / "stray.png")
    capsys.readouterr()
    loaded = references.load_image_set(str(out))
    assert sum(len(g) for g in loaded.chunks()) == 3
    assert "1 image file(s) not in its samples.json left out (e.g. stray.png)" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"already holds 1 image file\(s\) that no sample.py run made .*stray.png"):
        sample_set.check_directory(str(out))
    os.remove(out / "stray.png")
    assert sample_set.clear_previous(str(out)) == [sample_set.image_name(i) for i in range(3)]
    assert os.listdir(out) == []
    (out / sample_set.MANIFEST).write_text('{"images": 3}')
    with pytest.raises(UserError, match="is not a latentdiff-samples-1 manifest"):
        references.load_image_set(str(out))

"""Stage 2 from precomputed latents (`latentdiff encode` -> first_stage.latents): the step equals the
on-the-fly step, the memory-mapped iterator resumes exactly and shards per process, a run trains and checkpoints, and
latents of another first stage are a one-line error."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_workdirs import shrink_data, train_tiny_kl_f4

from latentdiff.config_utils import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_ldm_config(root, kind="class"):
    """ldm_cin256:tiny (class labels) or ldm_txt2img_kl8:tiny ('bert'), shrunk, on the KL-f4 stage 1 at root/ae."""
    spec = "configs/ldm_cin256.py:tiny" if kind == "class" else "configs/ldm_txt2img_kl8.py:tiny"
    c = load_config(os.path.join(ROOT, spec))
    shrink_data(c, root / "tfds", num_train=64, num_validation=32, num_novel=16)
    c.first_stage.workdir = str(root / "ae")
    c.first_stage.sample_posterior = True
    c.unet.in_channels = c.unet.out_channels = 4
    c.unet.model_channels = 32
    c.unet.channel_mult = (1,)
    c.unet.attention_resolutions = (1,)
    c.unet.num_heads, c.unet.num_head_channels = 2, -1
    c.unet.context_dim = c.text_encoder.width = 16
    if kind == "bert":
        c.text_encoder.depth, c.text_encoder.num_heads, c.text_encoder.head_dim = 1, 2, 8
    c.batch_size = 8
    c.num_train_steps = 2
    c.log_every = c.checkpoint_every = 2
    c.image_every = 10**9
    return c


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A KL-f4 stage-1 workdir (2 steps, 16 px) and its validation latents (32 images) in root/lat."""
    from latentdiff.encode_cli import encode_split

    root = tmp_path_factory.mktemp("latents")
    train_tiny_kl_f4(root / "ae", root / "tfds", steps=2, num_validation=32)
    encode_split(str(root / "ae"), str(root / "lat"), "validation", 0, 8, 0)
    return root


def test_encode_writes_memory_mappable_arrays(root):
    lat = root / "lat"
    assert {"mean.npy", "logvar.npy", "labels.npy", "captions.jsonl", "meta.json"} <= set(os.listdir(lat))
    assert not [f for f in os.listdir(lat) if ".tmp." in f]
    meta = json.load(open(lat / "meta.json"))
    assert meta["format"] == "npy" and meta["num"] == 32 and meta["latent_shape"] == [4, 4, 4]
    assert meta["kind"] == "kl" and meta["embed_dim"] == 4 and meta["downsample_factor"] == 4
    mean = np.load(lat / "mean.npy", mmap_mode="r")
    assert isinstance(mean, np.memmap) and mean.shape == (32, 4, 4, 4) and mean.dtype == np.float32
    assert np.load(lat / "labels.npy").shape == (32,)
    assert len(open(lat / "captions.jsonl").read().splitlines()) == 32
    # scale factor = 1 / std of posterior samples of all encoded latents (closed form check of the streaming std)
    logvar = np.load(lat / "logvar.npy")
    expected_var = np.var(mean) + np.mean(np.exp(logvar))  # Var[mean + std·ε] over elements and ε
    assert abs(meta["latent_std"] ** 2 / expected_var - 1) < 0.1


def test_precomputed_step_equals_on_the_fly_step(root):
    """Same images, same rng -> same posterior noise -> same loss and grads (within 1e-5)."""
    from latentdiff.data.input_pipeline import make_dataset
    from latentdiff.data.latents import LatentIterator
    from latentdiff.train.ldm import LDMTask
    from latentdiff.train.ldm_setup import null_condition, prepare_first_stage

    cfg_img = tiny_ldm_config(root)
    cfg_lat = tiny_ldm_config(root)
    cfg_lat.first_stage.latents = str(root / "lat")
    first_stage = prepare_first_stage(cfg_img, str(root / "ldm_eq"))
    null = null_condition(cfg_img, None)
    task_img, task_lat = LDMTask(cfg_img, first_stage, null, 0.7), LDMTask(cfg_lat, first_stage, null, 0.7)
    assert task_img.batch_keys == ("image", "label") and task_lat.batch_keys == ("moments", "label")

    images = next(make_dataset(cfg_img.data, split="validation", tokenizer=None, global_batch_size=8,
                               process_index=0, process_count=1, seed=0, train=False))  # fmt: skip
    it = LatentIterator(str(root / "lat"), global_batch_size=8, process_index=0, process_count=1, seed=0,
                        shuffle=False, tokenizer=None)  # fmt: skip
    latents = next(it)  # the first 8 validation images, in order
    np.testing.assert_array_equal(latents["label"], images["label"])

    params = jax.jit(task_img.init_state)(jax.random.key(1)).params
    rng = jax.random.key(7)

    @jax.jit
    def both(params, image, label, moments):
        g_img, m_img = task_img.grads(
            params, {"image": image, "label": label}, rng, first_stage.variables, jnp.float32(0.7)
        )
        g_lat, m_lat = task_lat.grads(params, {"moments": moments, "label": label}, rng, first_stage.variables, 0.7)
        return g_img, m_img["loss"], g_lat, m_lat["loss"]

    g_img, loss_img, g_lat, loss_lat = both(params, images["image"], images["label"], latents["moments"])
    assert np.isfinite(float(loss_img)) and float(loss_img) > 0
    np.testing.assert_allclose(float(loss_lat), float(loss_img), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_lat), jax.tree.leaves(g_img)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def _synthetic_latents(directory, num):
    """A latents directory whose example i has mean == i everywhere (identifiable rows)."""
    from latentdiff.data.latents import CAPTIONS, META

    os.makedirs(directory, exist_ok=True)
    mean = np.broadcast_to(np.arange(num, dtype=np.float32)[:, None, None, None], (num, 2, 2, 3)).copy()
    np.save(os.path.join(directory, "mean.npy"), mean)
    np.save(os.path.join(directory, "logvar.npy"), -mean)
    np.save(os.path.join(directory, "labels.npy"), np.arange(num, dtype=np.int32))
    with open(os.path.join(directory, CAPTIONS), "w") as f:
        f.writelines(json.dumps(f"caption {i}") + "\n" for i in range(num))
    meta = {"format": "npy", "kind": "kl", "num": num, "latent_shape": [2, 2, 3], "embed_dim": 3, "scale_factor": 1.0}
    with open(os.path.join(directory, META), "w") as f:
        json.dump(meta, f)


def _ids(batch):
    ids = batch["moments"][:, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(batch["label"], ids)  # rows of every array belong together
    np.testing.assert_array_equal(batch["moments"][..., 3:], -batch["moments"][..., :3])
    assert list(batch["caption"]) == [f"caption {i}" for i in ids]
    return ids.tolist()


def test_latent_iterator_epochs_resume_and_process_shards(tmp_path):
    from latentdiff.data.latents import LatentIterator

    directory = str(tmp_path / "syn")
    _synthetic_latents(directory, 24)

    def make(index=0, count=1, seed=3):
        return LatentIterator(directory, global_batch_size=8, process_index=index, process_count=count, seed=seed,
                              shuffle=True, tokenizer=None)  # fmt: skip

    it = make()
    epoch0 = [_ids(next(it)) for _ in range(3)]
    epoch1 = [_ids(next(it)) for _ in range(3)]
    for epoch in (epoch0, epoch1):
        assert sorted(i for batch in epoch for i in batch) == list(range(24))  # each example exactly once per epoch
    assert epoch0 != epoch1  # reshuffled
    assert [_ids(b) for b in [next(make(seed=3))]] == [epoch0[0]]  # deterministic from the seed
    assert _ids(next(make(seed=4))) != epoch0[0]

    # resume: a fresh iterator restored from get_state() continues exactly (here across the epoch boundary)
    it = make()
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [_ids(next(it)) for _ in range(4)]
    restored = make()
    restored.set_state(state)
    assert [_ids(next(restored)) for _ in range(4)] == expected

    # two processes read disjoint halves of each global batch; together they give the single-process batch
    p0, p1 = make(0, 2), make(1, 2)
    for global_ids in epoch0 + epoch1:
        a, b = _ids(next(p0)), _ids(next(p1))
        assert len(a) == len(b) == 4 and not set(a) & set(b)
        assert a + b == global_ids

    with pytest.raises(Exception, match="global_batch_size"):
        LatentIterator(directory, global_batch_size=4, process_index=0, process_count=1, seed=3, shuffle=True,
                       tokenizer=None).set_state(state)  # fmt: skip
    # a workdir trained on images (a grain iterator's state) asked to continue from latents: what to do, in one line
    grain_state = {"next_index": 96, "worker_count": 0}
    with pytest.raises(Exception, match=r"encoded on the fly.*new --workdir") as err:
        make().set_state(grain_state)
    assert "\n" not in str(err.value)


def test_train_from_latents_writes_a_checkpoint(root):
    """A text-conditioned run on precomputed latents (tokenizer built from captions.jsonl) trains and checkpoints."""
    from latentdiff.train import train_and_evaluate

    config = tiny_ldm_config(root, kind="bert")
    config.first_stage.latents = str(root / "lat")
    work = root / "ldm_lat"
    state = train_and_evaluate(config, str(work))
    assert int(state.step) == 2
    assert os.listdir(work / "checkpoints") == ["2"]
    meta = json.load(open(root / "lat" / "meta.json"))
    assert float(state.scale_factor) == pytest.approx(meta["scale_factor"])  # from meta.json (config: 0)
    rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
    assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["loss"])
    assert os.path.isfile(work / "tokenizer" / "tokenizer_config.json")


def test_latents_of_another_first_stage_are_a_one_line_error(root, tmp_path):
    from latentdiff.train import train_and_evaluate

    other = tmp_path / "lat_other"
    shutil.copytree(root / "lat", other)
    meta = json.load(open(other / "meta.json"))
    meta["embed_dim"], meta["latent_shape"] = 3, [4, 4, 3]
    (other / "meta.json").write_text(json.dumps(meta))
    config = tiny_ldm_config(root)
    config.first_stage.latents = str(other)
    with pytest.raises(ValueError) as err:
        train_and_evaluate(config, str(tmp_path / "w"))
    message = str(err.value)
    assert "\n" not in message and "embed_dim 3" in message and "embed_dim 4" in message

    config.conditioning.concat = "sr"
    config.conditioning.sr_factor = 4
    config.unet.in_channels = 7
    with pytest.raises(ValueError, match=r"needs images; unset first_stage\.latents"):
        train_and_evaluate(config, str(tmp_path / "w2"))

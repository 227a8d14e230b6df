"""Image modification through Pipeline / sample.py: img2img (SDEdit), inpainting by latent mask blending with any
text-to-image model, and concat-conditioned inpainting / super-resolution models (latentdiff.conditioning).

Tiny random models (f = 2 autoencoder at 16 px, latents 8x8x4, a one-level UNet) are written as converted workdirs
in a temporary directory; every call uses DDIM or DPM-Solver++ with 4 steps. Oracles: the closed forms of one DDIM
and one DPM-Solver++ step computed here from a separate, unbatched guided UNet call; the encoder's own latents
(`Pipeline.autoencode`, another compiled program); plain text-to-image with the same seed.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from latentdiff import conditioning, errors, generation
from latentdiff.config_utils import load_config
from latentdiff.convert.workdir import write_workdir
from latentdiff.data import shapes
from latentdiff.data.tokenizer import train_wordpiece
from latentdiff.diffusion import samplers
from latentdiff.first_stage import FirstStage, abstract_autoencoder_variables
from latentdiff.imaging import read_mask, resize_image, resize_mask
from latentdiff.nn.autoencoder import build_autoencoder
from latentdiff.nn.text_encoder import build_text_encoder
from latentdiff.nn.unet import build_unet, init_inputs
from latentdiff.pipeline import Pipeline
from latentdiff.sample_cli import parse_args
from latentdiff.sample_cli import run as sample_run
from latentdiff.workdir import abstract_stage2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES, STEPS, GUIDANCE, SEED = 16, 4, 2.0, 3
# The sampler copies the input's latents z0 into the kept region bit-exactly (tests/test_samplers.py); here z0 is
# recomputed by another compiled program (`Pipeline.autoencode`, batch 4 unsharded vs 8 sharded), whose float32
# convolutions round differently: measured ≤ 4e-6 absolute on latents of magnitude ~3.
Z_ATOL = 1e-5
PROMPTS = ["a red circle", "a blue square at the top", "a green triangle", "a large yellow circle"]


def random_fill(tree, seed: int):
    """Random values for abstract params: unit-variance fan-in scaled kernels, norms near 1, small biases."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return (1.0 + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)
        if name.endswith("['bias']"):
            return (0.05 * rng.standard_normal(x.shape)).astype(x.dtype)
        fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 1
        return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, tree)


def tiny_configs(concat: str = "none", text: str = "bert") -> tuple:
    """(stage-2 config, autoencoder config, tokenizer or None): the configs' tiny presets shrunk to 16 px, f = 2."""
    ae = load_config(os.path.join(ROOT, "configs/autoencoder_kl_f8.py:tiny")).autoencoder
    ae.resolution, ae.ch, ae.ch_mult = RES, 32, (1, 1)
    ldm = load_config(os.path.join(ROOT, "configs/ldm_txt2img_kl8.py:tiny"))
    ldm.data.resolution = RES
    ldm.unet.update(dict(model_channels=32, channel_mult=(1,), attention_resolutions=(1,), num_heads=2, context_dim=16))
    ldm.text_encoder.update(dict(width=16, depth=1, num_heads=2, head_dim=8))
    tokenizer = None
    if text == "bert":
        _, captions = shapes.make_examples(64, 32, "train", 0)
        tokenizer = train_wordpiece(list(captions), 128, ldm.tokenizer.max_length)
        ldm.tokenizer.vocab_size = ldm.text_encoder.vocab_size = tokenizer.vocab_size
    else:  # no τ_θ, as configs/ldm_sr4.py
        ldm.text_encoder.update(dict(kind="none", width=0))
        ldm.unet.context_dim = 0
    ldm.first_stage.workdir, ldm.first_stage.scale_factor = "", 0.7
    if concat != "none":
        ldm.conditioning = ml_collections.ConfigDict(dict(concat=concat))
        if concat == "sr":
            ldm.conditioning.sr_factor = 2
        ldm.unet.in_channels = ae.embed_dim + conditioning.concat_channels(concat, ae.embed_dim)
    return ldm, ae, tokenizer


def build_workdir(workdir: str, concat: str = "none", seed: int = 0) -> str:
    """A converted stage-2 workdir with random weights and a text encoder."""
    ldm, ae, tokenizer = tiny_configs(concat)
    write_workdir(
        workdir,
        config=ldm,
        first_stage_config=ae,
        first_stage_variables=random_fill(abstract_autoencoder_variables(ae), seed),
        ema_params=random_fill(abstract_stage2(ldm), seed + 1),
        params=None,
        tokenizer=tokenizer,
        source="test",
        step=0,
        overwrite=False,
    )
    return workdir


def build_sr_pipeline(seed: int = 0) -> Pipeline:
    """An in-memory super-resolution pipeline without τ_θ (text_encoder.kind 'none'), ×2 from 8 px."""
    ldm, ae, _ = tiny_configs("sr", text="none")
    unet = build_unet(ldm.unet)
    abstract = jax.eval_shape(lambda: unet.init(jax.random.key(0), **init_inputs(ldm.unet, 1, 2, 1))["params"])
    return Pipeline(
        config=ldm,
        first_stage=FirstStage(ae, build_autoencoder(ae), random_fill(abstract_autoencoder_variables(ae), seed)),
        unet=unet,
        cond_encoder=build_text_encoder(ldm.text_encoder),
        tokenizer=None,
        params={"unet": random_fill(abstract, seed + 1), "cond": {}},
        scale_factor=0.7,
        step=0,
        resolution=RES,
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("imgmod")


@pytest.fixture(scope="module")
def pipe(root):
    return Pipeline.from_workdir(build_workdir(str(root / "t2i")))


@pytest.fixture(scope="module")
def images():
    return shapes.make_examples(len(PROMPTS), RES, "validation", 0)[0]  # uint8 [4, 16, 16, 3]


def box_mask(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    """[RES, RES] float, 1 (repaint) inside rows top:bottom, cols left:right."""
    m = np.zeros((RES, RES), np.float32)
    m[top:bottom, left:right] = 1.0
    return m


def guided_eps(pipe: Pipeline, x: np.ndarray, t: int, extra: np.ndarray | None = None) -> np.ndarray:
    """ε̃ = ε_u + s·(ε_c − ε_u) from two separate UNet calls (the oracle for the batched guidance in the sampler)."""
    xin = jnp.asarray(x) if extra is None else jnp.concatenate([jnp.asarray(x), jnp.asarray(extra)], axis=-1)
    tt = jnp.full((len(x),), t, jnp.int32)

    @jax.jit
    def eps(p: dict, xin: jax.Array, tokens: jax.Array, null_tokens: jax.Array) -> jax.Array:
        if pipe.unconditioned:  # no τ_θ: no guidance
            return pipe.unet.apply({"params": p["unet"]}, xin, tt, None, None, False)
        context = pipe.cond_encoder.apply({"params": p["cond"]}, tokens)
        null = jnp.broadcast_to(pipe.cond_encoder.apply({"params": p["cond"]}, null_tokens), context.shape)
        eps_c = pipe.unet.apply({"params": p["unet"]}, xin, tt, context, None, False)
        eps_u = pipe.unet.apply({"params": p["unet"]}, xin, tt, null, None, False)
        return eps_u + GUIDANCE * (eps_c - eps_u)

    tokens, null_tokens = pipe.encode_condition(PROMPTS), pipe.unconditional("")
    return np.asarray(eps(pipe.params, xin, jnp.asarray(tokens), jnp.asarray(null_tokens)))


def noise() -> np.ndarray:
    return np.asarray(generation.initial_noise(SEED, jnp.arange(len(PROMPTS)), (RES // 2, RES // 2, 4)))


def run(pipe: Pipeline, sampler: str = "ddim", **kw) -> np.ndarray:
    return pipe(PROMPTS, sampler=sampler, steps=STEPS, guidance=GUIDANCE, seed=SEED, **kw)


# ------------------------------------------------------------------------------------------------------- img2img


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
def test_strength_one_is_text_to_image(pipe, images, sampler):
    for output in ("float", "latent"):
        plain = run(pipe, sampler, output=output)
        np.testing.assert_array_equal(run(pipe, sampler, output=output, init_image=images, strength=1.0), plain)


def test_smallest_strength_is_one_step_from_the_input(pipe, images):
    """strength → 0 runs one DDIM step from t = 1: x_1 = √ᾱ_1·z0 + √(1−ᾱ_1)·ε (ε: the seed's initial noise),
    out = √ᾱ_0·x̂0 + √(1−ᾱ_0)·ε̃ with x̂0 = (x_1 − √(1−ᾱ_1)·ε̃)/√ᾱ_1 (closed form, computed here)."""
    z0, rec = pipe.autoencode(images)
    ab = np.asarray(pipe.schedule.alphas_cumprod, np.float64)
    assert samplers.img2img_start(pipe.schedule, STEPS, 1e-3) == (STEPS - 1, 1)
    x1 = np.sqrt(ab[1]) * z0 + np.sqrt(1 - ab[1]) * noise()
    eps = guided_eps(pipe, x1.astype(np.float32), 1)
    x0_hat = (x1 - np.sqrt(1 - ab[1]) * eps) / np.sqrt(ab[1])
    want = np.sqrt(ab[0]) * x0_hat + np.sqrt(1 - ab[0]) * eps
    z = run(pipe, output="latent", init_image=images, strength=1e-3)
    np.testing.assert_allclose(z, want, atol=2e-5 * np.abs(want).max())
    # Reconstruction: the step moves z0 by (1 − √ᾱ_0)·z0 + √(ᾱ_0(1−ᾱ_1)/ᾱ_1)·(ε − ε̃) + √(1−ᾱ_0)·ε̃, coefficients
    # 4e-4, 0.041 and 0.029: for |ε|, |ε̃| ~ 1 a displacement ~0.05 against ~1.4 between z0 and a text-to-image latent
    # (strength 1). Decoded, the random decoder's gain on small perturbations is larger than on large ones: measured
    # 0.15 of the strength-1 distance in pixels (0.08 vs 0.54 in [-1, 1]); bounded here at 0.3.
    z_far = run(pipe, output="latent")
    assert np.abs(z - z0).mean() < 0.1 * np.abs(z_far - z0).mean()
    out = run(pipe, output="float", init_image=images, strength=1e-3) * 2 - 1
    far = np.abs(run(pipe, output="float") * 2 - 1 - rec).mean()
    assert np.abs(out - rec).mean() < 0.3 * far


def test_dpmpp_smallest_strength_is_the_data_prediction(pipe, images):
    """DPM-Solver++ from its last timestep t_S (≈ T/S) jumps to σ = 0: out = x̂0 = (x_t − √(1−ᾱ_t)·ε̃)/√ᾱ_t."""
    start, t = generation.start_for_strength("dpmpp2m", pipe.schedule, STEPS, 1e-3)
    assert (start, t) == (STEPS - 1, int(samplers.dpmpp_timesteps(pipe.schedule, STEPS, "linspace")[-1]))
    z0, _ = pipe.autoencode(images)
    a = float(pipe.schedule.alphas_cumprod[t])
    xt = (np.sqrt(a) * z0 + np.sqrt(1 - a) * noise()).astype(np.float32)
    want = (xt - np.sqrt(1 - a) * guided_eps(pipe, xt, t)) / np.sqrt(a)
    z = run(pipe, "dpmpp2m", output="latent", init_image=images, strength=1e-3)
    np.testing.assert_allclose(z, want, atol=2e-5 * np.abs(want).max())


# ---------------------------------------------------------------------------------------------------- inpainting


def test_latent_mask_is_the_max_over_each_cell():
    m = np.random.default_rng(0).random((2, 8, 12, 1)) > 0.8
    got = np.asarray(generation.latent_mask(jnp.asarray(m, jnp.float32), 4))
    want = np.array([[[[m[b, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].any()] for j in range(3)] for i in range(2)]
                     for b in range(2)], np.float32)  # fmt: skip
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_mask_blend_keeps_the_unmasked_region(pipe, images, strength):
    """Kept latents equal the input's latents exactly; the decoded kept pixels stay close to the reconstruction."""
    mask = box_mask(5, 3, 11, 10)  # pixel rows 5..10, cols 3..9 -> latent rows 2..5, cols 1..4 regenerated
    keep = np.ones((RES // 2, RES // 2), bool)
    keep[2:6, 1:5] = False
    z0, rec = pipe.autoencode(images)
    z = run(pipe, output="latent", init_image=images, mask=mask, strength=strength)
    np.testing.assert_allclose(z[:, keep], z0[:, keep], rtol=0, atol=Z_ATOL * np.abs(z0).max())
    assert np.abs(z[:, ~keep] - z0[:, ~keep]).mean() > 0.1  # the masked region was regenerated
    out = run(pipe, output="float", init_image=images, mask=mask, strength=strength, keep_unmasked=False) * 2 - 1
    decode = jax.jit(lambda v, z: pipe.first_stage.decode(v, z))
    decoded = np.asarray(decode(pipe.first_stage.variables, jnp.asarray(z) / pipe.scale_factor))
    np.testing.assert_allclose(out, decoded, atol=1e-4)  # the pixels are D(z) of those latents
    kept_px = np.kron(keep, np.ones((2, 2), bool))
    inside = np.abs(out - rec)[:, ~kept_px].mean()
    outside = np.abs(out - rec)[:, kept_px].mean()
    # Kept pixels still move: this random decoder is far from local (GroupNorm statistics and the mid-block
    # self-attention span the whole 8x8 latent), measured 0.6-0.75 of the change inside the mask. The trained demo
    # decoder is measured by bench/inpaint_colour.py (test_demo_inpainting_repaints_shapes_in_the_prompted_colour).
    assert outside < inside, (outside, inside)
    # By default the input is pasted back outside the mask: kept pixels are the input's exactly, repainted ones D(z).
    pasted = run(pipe, output="float", init_image=images, mask=mask, strength=strength) * 2 - 1
    px_mask = mask.astype(bool)
    image_f = images.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(pasted[:, ~px_mask], np.broadcast_to(image_f, pasted.shape)[:, ~px_mask], atol=1e-6)
    np.testing.assert_allclose(pasted[:, px_mask], out[:, px_mask], atol=1e-6)


def test_mask_all_keep_returns_the_input_latents(pipe, images):
    z0, _ = pipe.autoencode(images)
    z = run(pipe, output="latent", init_image=images, mask=np.zeros((RES, RES)), strength=1.0)
    np.testing.assert_allclose(z, z0, rtol=0, atol=Z_ATOL * np.abs(z0).max())


def test_image_modification_is_batch_independent(pipe, images):
    """With η = 1 (DDIM noise every step) and the blend's re-noising, image i depends on (seed, i), not on how the
    prompts are batched: 9 images as batches of 8 (8 + 1 padded) equal one batch of 16 (9 + 7 padded)."""
    prompts, inputs = PROMPTS * 2 + PROMPTS[:1], np.concatenate([images, images, images[:1]])
    kw = dict(sampler="ddim", steps=STEPS, guidance=GUIDANCE, seed=SEED, output="latent", eta=1.0)
    mask = box_mask(4, 4, 12, 12)
    split = pipe(prompts, init_image=inputs, mask=mask, batch_size=8, **kw)
    whole = pipe(prompts, init_image=inputs, mask=mask, batch_size=16, **kw)
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5)  # batch 8 vs 16: float rounding only
    assert np.abs(split[0] - split[4]).mean() > 0.1  # same prompt and image, other index: other noise


# ------------------------------------------------------------------------------------------- concat conditioning


@pytest.fixture(scope="module")
def sr_pipe():
    return build_sr_pipeline(seed=7)


@pytest.mark.parametrize("kind", ["inpaint", "sr"])
def test_concat_models_feed_the_condition_at_every_step(root, sr_pipe, images, kind):
    """One DPM-Solver++ step from x_T at t = 999 with the condition of latentdiff.conditioning.make_concat
    concatenated to z_t, in both guidance branches (the output x̂0 carries ε̃ with gain √(1−ᾱ)/√ᾱ ≈ 15). The
    inpainting model has a text encoder (guidance 2); the super-resolution one none (no guidance, no prompt)."""
    cpipe = Pipeline.from_workdir(build_workdir(str(root / kind), kind, seed=5)) if kind == "inpaint" else sr_pipe
    x = images.astype(np.float32) / 127.5 - 1.0
    mask = box_mask(4, 4, 12, 12)
    low_res = np.asarray(conditioning.low_res_from_image(jnp.asarray(x), 2))
    extra = conditioning.make_concat(
        kind,
        first_stage=cpipe.first_stage,
        first_stage_variables=cpipe.first_stage.variables,
        scale_factor=cpipe.scale_factor,
        latent_hw=(RES // 2, RES // 2),
        image=jnp.asarray(x),
        mask=jnp.broadcast_to(jnp.asarray(mask)[None, ..., None], (len(x), RES, RES, 1)),
        low_res=jnp.asarray(low_res),
    )
    inputs = dict(init_image=images, mask=mask) if kind == "inpaint" else dict(low_res=low_res)
    z = cpipe(PROMPTS, sampler="dpmpp2m", steps=1, guidance=GUIDANCE, seed=SEED, output="latent", **inputs)
    (t,) = samplers.dpmpp_timesteps(cpipe.schedule, 1, "linspace")
    a = float(cpipe.schedule.alphas_cumprod[t])
    eps = guided_eps(cpipe, noise(), int(t), np.asarray(extra))
    want = (noise() - np.sqrt(1 - a) * eps) / np.sqrt(a)
    np.testing.assert_allclose(z, want, atol=1e-4 * np.abs(want).max())
    missing = "init_image and mask" if kind == "inpaint" else "low_res"
    with pytest.raises(ValueError, match=missing):
        cpipe(PROMPTS, sampler="ddim", steps=1, guidance=GUIDANCE)


# ------------------------------------------------------------------------------------------------------ the CLI


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """sample.py in-process: (exit status, last stderr line)."""
    try:
        errors.run_cli(lambda: sample_run(parse_args(argv)))
        code = 0
    except SystemExit as e:
        code = e.code
    lines = capsys.readouterr().err.strip().splitlines()
    return code, (lines[-1] if lines else "")


@pytest.fixture(scope="module")
def files(root, images, pipe):  # pipe: builds root/t2i, whose config.json the CLI tests need
    d = root / "files"
    d.mkdir()
    Image.fromarray(images[0]).save(d / "img.png")
    Image.fromarray(np.kron(images[0], np.ones((2, 2, 1), np.uint8))).save(d / "img32.png")
    white = (box_mask(4, 4, 12, 12) * 255).astype(np.uint8)
    Image.fromarray(white).save(d / "mask.png")
    Image.fromarray(np.kron(white, np.ones((2, 2), np.uint8))).save(d / "mask32.png")
    Image.fromarray(np.stack([white] * 3, -1)).save(d / "mask_rgb.png")
    Image.fromarray(white > 0).save(d / "mask_1bit.png")
    Image.fromarray(np.stack([white, white // 2, white], -1)).save(d / "mask_colour.png")
    Image.fromarray(white[:8, :8]).save(d / "mask_small.png")
    Image.fromarray(images[0][::2, ::2]).save(d / "low.png")
    # the CLI checks its flags against the workdir's config.json before the (monkeypatched) model loads
    shutil.copy(root / "t2i" / "config.json", d / "config.json")
    (d / "broken.png").write_bytes(b"not a png")
    return d


def test_mask_files_accepted(files):
    want = box_mask(4, 4, 12, 12)
    for name in ("mask.png", "mask_rgb.png", "mask_1bit.png"):
        np.testing.assert_array_equal(read_mask(str(files / name), "--mask"), want)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--init_image", "img.png", "--strength", "0"], "--strength must be in (0, 1]"),
        (["--init_image", "img.png", "--strength", "1.5"], "--strength must be in (0, 1]"),
        (["--strength", "0.5"], "--strength needs --init_image"),
        (["--mask", "mask.png"], "--mask needs --init_image"),
        (["--init_image", "img.png", "--strength", "0.5", "--keep_unmasked"], "--no-keep_unmasked need --mask"),
        (["--init_image", "nothere.png", "--strength", "0.5"], "does not exist"),
        (["--init_image", "broken.png", "--strength", "0.5"], "is not a readable image"),
        (["--init_image", "img.png", "--mask", "broken.png"], "is not a readable image"),
        (["--init_image", "img.png", "--mask", "mask_small.png"], "make the mask the same size as the image"),
        (["--init_image", "img.png", "--mask", "mask_colour.png"], "a mask must be single-channel"),
        (["--init_image", "img32.png", "--mask", "mask32.png"], "resize it, or pass --resize"),
        (["--init_image", "img.png"], "img2img needs --strength"),
        (["--low_res", "low.png"], "--low_res is for super-resolution models"),
    ],
)
def test_cli_bad_input_is_one_line(pipe, files, monkeypatch, capsys, extra, message):
    monkeypatch.setattr(Pipeline, "from_workdir", classmethod(lambda cls, *a, **k: pipe))
    extra = [str(files / e) if e.endswith(".png") else e for e in extra]
    code, line = cli(["--workdir", str(files), "--prompt", "a red circle", *extra, "--out", str(files / "o")], capsys)
    assert code == 2 and line.startswith("error: ") and message in line, line
    if "png" in line:
        assert str(files) in line  # names the file


def test_cli_concat_models_name_the_missing_flag(root, sr_pipe, files, monkeypatch, capsys):
    img, out = str(files / "img.png"), str(files / "o")
    code, line = cli(["--workdir", build_workdir(str(root / "cli_inpaint"), "inpaint"), "--init_image", img], capsys)
    assert code == 2 and "pass --init_image IMG and --mask MASK" in line, line
    monkeypatch.setattr(Pipeline, "from_workdir", classmethod(lambda cls, *a, **k: sr_pipe))
    for argv, message in (
        ([], "pass --low_res IMG"),
        (["--low_res", img], f"--low_res {img!r} is 16x16 but this model needs 8x8: resize it, or pass --resize"),
        (["--low_res", str(files / "low.png"), "--prompt", "a red circle"], "this model takes no prompt"),
    ):
        code, line = cli(["--workdir", str(files), *argv, "--out", out], capsys)
        assert code == 2 and message in line, line
    sr_out = files / "sr"
    argv = ["--workdir", str(files), "--low_res", str(files / "low.png"), "--sampler", "dpmpp2m", "--steps", "1",
            "--n", "2", "--out", str(sr_out)]  # fmt: skip
    assert cli(argv, capsys)[0] == 0
    png = Image.open(sr_out / "00001.png")
    assert png.size == (RES, RES) and png.text["low_res"] == str(files / "low.png")


def test_cli_inpainting_writes_pngs_with_metadata(pipe, files, monkeypatch, capsys, images):
    """--resize brings the 32 px image and mask to 16 px; the same run as the API (the compiled function is reused)."""
    monkeypatch.setattr(Pipeline, "from_workdir", classmethod(lambda cls, *a, **k: pipe))
    out = files / "inpaint"
    argv = ["--workdir", str(files), "--prompt", PROMPTS[0], "--n", "2", "--steps", str(STEPS), "--guidance",
            str(GUIDANCE), "--seed", str(SEED), "--init_image", str(files / "img32.png"), "--mask",
            str(files / "mask32.png"), "--strength", "0.5", "--resize", "--out", str(out)]  # fmt: skip
    code, _ = cli(argv, capsys)
    assert code == 0
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "grid", "samples.json"]
    png = Image.open(out / "00001.png")
    assert png.text["mask"] == str(files / "mask32.png") and png.text["strength"] == "0.5"
    assert png.text["blend"] == "True" and png.text["resize"] == "True" and png.text["keep_unmasked"] == "True"
    image = resize_image(np.asarray(Image.open(files / "img32.png")), (RES, RES))
    mask = resize_mask(read_mask(str(files / "mask32.png"), "--mask"), (RES, RES))
    np.testing.assert_array_equal(mask, box_mask(4, 4, 12, 12))
    want = pipe([PROMPTS[0]] * 2, sampler="ddim", steps=STEPS, guidance=GUIDANCE, seed=SEED, init_image=image,
                mask=mask, strength=0.5)  # fmt: skip
    got = np.stack([np.asarray(Image.open(out / f"0000{i}.png")) for i in range(2)])
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------- the shipped demo model

DEMO = os.path.join(ROOT, "demo")


def test_demo_inpainting_repaints_shapes_in_the_prompted_colour():
    """bench/inpaint_colour.py on the shipped demo model: 64 validation shapes, each box repainted with its caption
    recoloured; the grader's colour accuracy inside the mask must reach 0.9. The demo model is part of the
    repository, so its absence is a failure, not a skip."""
    import importlib.util

    if not os.path.isfile(os.path.join(DEMO, "config.json")):
        pytest.fail(f"{DEMO}/config.json is missing: commit the shipped demo model (make demo-train writes demo/)")
    spec = importlib.util.spec_from_file_location("inpaint_colour", os.path.join(ROOT, "bench", "inpaint_colour.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.inpaint_colour(Pipeline.from_workdir(DEMO), 64, steps=25, guidance=3.0, seed=0)
    assert result["colour_in_mask"] >= 0.9, result
    # The kept latents are the input's; the trained decoder moves the kept pixels of the median image by less than
    # the autoencoder's own RMS error (a few images with large repainted boxes shift more: see the report).
    assert result["median_image_rms_change_kept"] < result["rms_reconstruction_error_all"], result
    # What the pipeline returns by default (keep_unmasked) is the input itself outside the mask, for every image.
    assert result["max_abs_change_kept_pixels_returned"] == 0, result


def test_sampling_flags_default_to_the_models_config_sampling():
    """`sample.py --workdir demo` used guidance 5 (a fixed CLI default) although the demo model is tuned for 2: every
    sampling flag not given now comes from the model's config.sampling; a given flag wins."""
    from latentdiff import cli_flags, config_utils, sample_cli

    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo")
    sampling = config_utils.load_workdir_config(demo).sampling
    args = sample_cli.parse_args(["--workdir", demo, "--prompt", "a red circle"])
    cli_flags.fill_sampling_defaults(args, sampling)
    assert (args.sampler, args.steps, args.eta, args.guidance) == ("ddim", 50, 0.0, 2.0)
    given = sample_cli.parse_args(["--workdir", demo, "--guidance", "3.5", "--steps", "7", "--sampler", "dpmpp2m"])
    cli_flags.fill_sampling_defaults(given, sampling)
    assert (given.sampler, given.steps, given.eta, given.guidance) == ("dpmpp2m", 7, 0.0, 3.5)


def test_img2img_inpainting_and_super_resolution_at_another_size(pipe, sr_pipe):
    """height / width for every mode (the paper's convolutional sampling): the image inputs take the requested size
    (low_res a k-th of it), the output has it, kept pixels stay the input's, and a wrong-size input is one line."""
    from latentdiff.errors import UserError

    height, width = RES, 2 * RES  # non-square, twice the training width
    assert height % pipe.size_stride == 0 and width % pipe.size_stride == 0
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), np.float32)
    mask[:, width // 2 :] = 1.0  # repaint the right half
    size = dict(height=height, width=width)
    img2img = run(pipe, init_image=image, strength=0.5, **size)
    assert img2img.shape == (len(PROMPTS), height, width, 3)
    inpainted = run(pipe, init_image=image, mask=mask, **size)
    assert inpainted.shape == (len(PROMPTS), height, width, 3)
    np.testing.assert_array_equal(
        inpainted[:, :, : width // 2], np.broadcast_to(image[:, : width // 2], (4, height, width // 2, 3))
    )
    low_res = rng.integers(0, 256, (height // 2, width // 2, 3), dtype=np.uint8)  # the SR pipeline is x2
    upscaled = sr_pipe(PROMPTS[:2], sampler="ddim", steps=2, guidance=1.0, low_res=low_res, **size)
    assert upscaled.shape == (2, height, width, 3)
    with pytest.raises(UserError, match=f"init_image is {RES}x{RES} but this model needs {height}x{width}"):
        run(pipe, init_image=image[:, :RES], strength=0.5, **size)

"""Whole-model conversion (`latentdiff convert`) against diffusers as the oracle.

Tiny random pipelines (LDMTextToImagePipeline; Stable-Diffusion-style with a CLIP text encoder) are saved to disk,
converted, and sampled with our Pipeline / sample.py from the same initial latents, prompts, DDIM 10 steps and
guidance 3: images equal diffusers' within 1e-3 (float). CompVis checkpoints are built by renaming the converted
models through our own inverse tables (with a distinct EMA copy and the schedule buffers) and must convert to the same
params. A class-conditional VQ-f4-style CompVis model is compared with a hand-written diffusers sampling loop. Export
writes diffusers directories that diffusers loads and that re-import bit-exactly.
"""

import argparse
import os

import diffusers
import jax
import ml_collections
import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMScheduler, LDMTextToImagePipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
from flax import traverse_util
from PIL import Image
from transformers import BertTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from latentdiff import config_utils, generation, params_io
from latentdiff.convert import __main__ as cli
from latentdiff.convert import compvis, from_diffusers
from latentdiff.convert.diffusers_unet import diffusers_unet_config, unet_config_from_diffusers
from latentdiff.convert.diffusers_vae import diffusers_config
from latentdiff.convert.key_tables import ConversionError
from latentdiff.convert.weight_files import read_weights, to_numpy_state_dict
from latentdiff.convert.workdir import EMA_FILE, LIVE_FILE, PARAMS_DIR
from latentdiff.diffusion.schedules import make_betas
from latentdiff.pipeline import Pipeline
from latentdiff.sample_cli import parse_args
from latentdiff.sample_cli import run as sample_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle", "a blue square on the cat"]
STEPS, GUIDANCE = 10, 3.0
LATENT = 8  # latent side; the tiny autoencoders have f = 2 (images 16 x 16)
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "blue", "square", "on", "the", "cat"]


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight moved off its init (zero-init convs, unit norms) so no key can be silently wrong."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def ddim() -> DDIMScheduler:
    """diffusers' DDIM configured as the paper's code (DESIGN.md §4)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def tiny_unet(context_dim: int, seed: int, channels: int = 4) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=context_dim,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    return perturb(unet, seed)


def tiny_vae(seed: int, scaling: float) -> diffusers.AutoencoderKL:
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=2 * LATENT,
        scaling_factor=scaling,
    )
    return perturb(vae, seed)


def clip_tokenizer() -> CLIPTokenizer:
    """A tiny byte-pair vocabulary: letters, end-of-word letters, four merges, the two special tokens."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {t: i for i, t in enumerate([*letters, *(c + "</w>" for c in letters)])}
    merges = [("r", "e"), ("re", "d</w>"), ("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


@pytest.fixture(scope="module")
def ldm_dir(tmp_path_factory):
    """A tiny LDMTextToImagePipeline saved to disk, and its in-memory twin (the oracle). The LDMBert has the
    CompVis BERTEmbedder's fixed 8 heads x 64 so the same weights also fit a CompVis config."""
    bert = LDMBertModel(
        LDMBertConfig(
            vocab_size=len(WORDS),
            max_position_embeddings=77,
            encoder_layers=2,
            encoder_ffn_dim=128,
            encoder_attention_heads=8,
            head_dim=64,
            d_model=32,
        )
    )
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}, do_lower_case=True)
    pipe = LDMTextToImagePipeline(
        vqvae=tiny_vae(2, 0.3), bert=perturb(bert, 1), tokenizer=tokenizer, unet=tiny_unet(32, 3), scheduler=ddim()
    )
    path = str(tmp_path_factory.mktemp("ldm") / "pipeline")
    pipe.save_pretrained(path)
    return path, pipe


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """A tiny StableDiffusionPipeline (CLIP text encoder, no safety checker) saved to disk, and its twin."""
    tokenizer = clip_tokenizer()
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(4, 0.18215),
        text_encoder=perturb(text, 5),
        tokenizer=tokenizer,
        unet=tiny_unet(32, 6),
        scheduler=ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = str(tmp_path_factory.mktemp("sd") / "pipeline")
    pipe.save_pretrained(path)
    return path, pipe


def convert_dir(src: str, out: str) -> str:
    assert cli.main(["diffusers", src, out]) == 0
    return out


@pytest.fixture(scope="module")
def ldm_workdir(ldm_dir, tmp_path_factory):
    return convert_dir(ldm_dir[0], str(tmp_path_factory.mktemp("ldm_wd") / "wd"))


@pytest.fixture(scope="module")
def sd_workdir(sd_dir, tmp_path_factory):
    return convert_dir(sd_dir[0], str(tmp_path_factory.mktemp("sd_wd") / "wd"))


def diffusers_images(pipe, x_T: np.ndarray, prompts=PROMPTS, **size) -> np.ndarray:
    """diffusers' float images in [0, 1], [N, H, W, 3], from latents x_T [N, C, h, w]."""
    with torch.no_grad():
        return pipe(
            prompts,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            eta=0.0,
            latents=torch.from_numpy(x_T),
            output_type="np",
            **size,
        ).images


def check_images(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape == (len(want), 2 * LATENT, 2 * LATENT, 3)
    assert ((want > 0.02) & (want < 0.98)).mean() > 0.5, "oracle images are mostly clipped: a weak test"
    assert np.abs(want[0] - want[1]).mean() > 0.01, "the two conditions give the same image: conditioning untested"
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


def test_ldm_sample_py_matches_diffusers(ldm_dir, ldm_workdir, tmp_path, monkeypatch):
    """sample.py's code path on the converted workdir; its seed-0 noise is handed to diffusers as the latents."""
    _, pipe = ldm_dir
    x_T = np.array(generation.initial_noise(0, jax.numpy.arange(len(PROMPTS)), (LATENT, LATENT, 4)))
    want = diffusers_images(pipe, x_T.transpose(0, 3, 1, 2), height=8 * LATENT, width=8 * LATENT)  # latents h // 8

    created = []
    load = Pipeline.from_workdir.__func__

    def spy(cls, *args, **kwargs):  # keeps the Pipeline sample.py builds, to reuse its compiled sampler below
        created.append(load(cls, *args, **kwargs))
        return created[-1]

    monkeypatch.setattr(Pipeline, "from_workdir", classmethod(spy))
    args = ["--workdir", ldm_workdir, "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--seed", "0"]
    args += [x for p in PROMPTS for x in ("--prompt", p)] + ["--out", str(tmp_path / "samples")]
    paths = sample_run(parse_args(args))
    pngs = np.stack([np.asarray(Image.open(p)) for p in paths])
    assert np.abs(pngs.astype(int) - np.round(want * 255).astype(int)).max() <= 1  # uint8 rounding only

    ours = created[0]  # the same Pipeline (and compiled sampler) sample.py used, asked for float output
    assert ours.scale_factor == pytest.approx(0.3)  # the vqvae config's scaling_factor, not the 0.18215 default
    d = ours.config.diffusion
    assert (d.schedule, d.timesteps, d.linear_start, d.linear_end, d.parameterization) == (
        "linear",
        1000,
        0.00085,
        0.012,
        "eps",
    )
    got = ours(PROMPTS, sampler="ddim", steps=STEPS, guidance=GUIDANCE, x_T=x_T, output="float")
    check_images(got, want)


def test_sd_pipeline_matches_diffusers(sd_dir, sd_workdir):
    _, pipe = sd_dir
    x_T = np.random.default_rng(1).standard_normal((len(PROMPTS), 4, LATENT, LATENT)).astype(np.float32)
    want = diffusers_images(pipe, x_T)
    ours = Pipeline.from_workdir(sd_workdir)
    assert ours.config.text_encoder.kind == "clip"
    got = ours(PROMPTS, sampler="ddim", steps=STEPS, guidance=GUIDANCE, x_T=x_T.transpose(0, 2, 3, 1), output="float")
    check_images(got, want)


# ------------------------------------------------------------------------------------------------------- CompVis


def compvis_yaml(config, first_stage_config, cond_stage: dict) -> dict:
    """The CompVis YAML of a converted tiny model (the fields the public configs have)."""
    u, d = config.unet, config.diffusion
    return dict(
        model=dict(
            target="ldm.models.diffusion.ddpm.LatentDiffusion",
            params=dict(
                linear_start=d.linear_start,
                linear_end=d.linear_end,
                timesteps=d.timesteps,
                image_size=LATENT,
                channels=u.in_channels,
                conditioning_key="crossattn",
                scale_factor=float(config.first_stage.scale_factor),
                unet_config=dict(
                    target="ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    params=dict(
                        in_channels=u.in_channels,
                        out_channels=u.out_channels,
                        model_channels=u.model_channels,
                        attention_resolutions=list(u.attention_resolutions),
                        num_res_blocks=u.num_res_blocks,
                        channel_mult=list(u.channel_mult),
                        num_heads=u.num_heads,
                        use_spatial_transformer=True,
                        transformer_depth=u.transformer_depth,
                        context_dim=u.context_dim,
                        use_checkpoint=True,
                        legacy=False,
                    ),
                ),
                first_stage_config=dict(
                    target="ldm.models.autoencoder."
                    + ("AutoencoderKL" if first_stage_config.kind == "kl" else "VQModelInterface"),
                    params=dict(
                        embed_dim=first_stage_config.embed_dim,
                        n_embed=first_stage_config.n_embed,
                        ddconfig=dict(
                            double_z=first_stage_config.double_z,
                            z_channels=first_stage_config.z_channels,
                            resolution=first_stage_config.resolution,
                            in_channels=3,
                            out_ch=3,
                            ch=first_stage_config.ch,
                            ch_mult=list(first_stage_config.ch_mult),
                            num_res_blocks=first_stage_config.num_res_blocks,
                            attn_resolutions=list(first_stage_config.attn_resolutions),
                            dropout=0.0,
                        ),
                        lossconfig=dict(target="torch.nn.Identity"),
                    ),
                ),
                cond_stage_config=cond_stage,
            ),
        )
    )


def schedule_buffers(d) -> dict[str, np.ndarray]:
    betas = make_betas(d.schedule, d.timesteps, d.linear_start, d.linear_end)
    ac = np.cumprod(1 - betas)
    return {"betas": betas, "alphas_cumprod": ac, "sqrt_alphas_cumprod": np.sqrt(ac), "lvlb_weights": np.ones_like(ac)}


def write_ckpt(path: str, state_dict: dict, step: int) -> None:
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state_dict.items()}
    torch.save({"state_dict": tensors, "global_step": step}, path)


def compvis_ckpt(workdir: str, cond_stage: dict, out_dir) -> tuple[str, str, dict, dict]:
    """Renames a converted workdir's weights into a CompVis .ckpt (+ a distinct EMA UNet) and writes its YAML."""
    pipe = Pipeline.from_workdir(workdir)
    live = jax.tree.map(np.asarray, pipe.params)
    ema = {"unet": jax.tree.map(lambda x: (x * 0.5 + 0.01).astype(np.float32), live["unet"]), "cond": live["cond"]}
    sd = compvis.export_state_dict(
        unet_cfg=pipe.config.unet,
        text_cfg=pipe.config.text_encoder,
        first_stage_config=pipe.first_stage.config,
        first_stage_params=pipe.first_stage.variables["params"],
        params=live,
        ema=ema,
    )
    sd.update(schedule_buffers(pipe.config.diffusion))
    sd.update({"model_ema.decay": np.float32(0.9999), "model_ema.num_updates": np.float32(7)})
    sd["first_stage_model.loss.logvar"] = np.zeros((), np.float32)  # training-loss modules are skipped by name
    ckpt = str(out_dir / "model.ckpt")
    write_ckpt(ckpt, sd, 1234)
    config_path = str(out_dir / "model.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(compvis_yaml(pipe.config, pipe.first_stage.config, cond_stage), f)
    return ckpt, config_path, live, ema


def load_params(workdir: str, name: str) -> dict:
    return params_io.load_params(os.path.join(workdir, PARAMS_DIR, name))


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("model", ["ldm", "sd"])
def test_compvis_checkpoint_gives_the_same_model(model, request, tmp_path):
    src, _ = request.getfixturevalue(f"{model}_dir")
    workdir = request.getfixturevalue(f"{model}_workdir")
    if model == "ldm":
        cond = dict(
            target="ldm.modules.encoders.modules.BERTEmbedder",
            params=dict(n_embed=32, n_layer=2, vocab_size=len(WORDS), max_seq_len=77),
        )
    else:
        cond = dict(
            target="ldm.modules.encoders.modules.FrozenCLIPEmbedder",
            params=dict(version=os.path.join(src, "text_encoder")),
        )
    ckpt, config_path, live, ema = compvis_ckpt(workdir, cond, tmp_path)
    out = str(tmp_path / "wd")
    tok = os.path.join(src, "tokenizer")
    assert cli.main(["compvis", ckpt, out, "--compvis_config", config_path, "--tokenizer", tok]) == 0

    assert_trees_equal(load_params(out, LIVE_FILE), live)
    assert_trees_equal(load_params(out, EMA_FILE), ema)
    assert params_io.read_metadata(os.path.join(out, PARAMS_DIR, EMA_FILE))["step"] == "1234"
    first_stage_a, first_stage_b = (
        params_io.load_params(os.path.join(w, "first_stage", "params.safetensors")) for w in (workdir, out)
    )
    assert_trees_equal(first_stage_a, first_stage_b)
    a, b = Pipeline.from_workdir(workdir).config, Pipeline.from_workdir(out, use_ema=False).config
    for block in ("unet", "text_encoder", "diffusion", "first_stage", "data"):
        assert a[block].to_dict() == b[block].to_dict(), block


@pytest.fixture(scope="module")
def ldm_ckpt(ldm_dir, ldm_workdir, tmp_path_factory):
    cond = dict(
        target="ldm.modules.encoders.modules.BERTEmbedder",
        params=dict(n_embed=32, n_layer=2, vocab_size=len(WORDS), max_seq_len=77),
    )
    ckpt, config_path, _, _ = compvis_ckpt(ldm_workdir, cond, tmp_path_factory.mktemp("ckpt"))
    return ckpt, config_path, os.path.join(ldm_dir[0], "tokenizer")


def test_compvis_rejects_bad_checkpoints(ldm_ckpt, tmp_path, capsys):
    ckpt, config_path, tok = ldm_ckpt
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    arch = compvis.load_compvis_yaml(config_path)

    def convert(state_dict, arch=arch, name="bad.ckpt"):
        path = str(tmp_path / name)
        torch.save({"state_dict": state_dict}, path)
        return compvis.convert_compvis_checkpoint(path, str(tmp_path / "out"), arch, tokenizer=tok, overwrite=True)

    bad = dict(sd)
    bad["model.diffusion_model.extra.weight"] = torch.zeros(3)
    bad["stray_buffer"] = torch.zeros(3)
    del bad["model.diffusion_model.out.2.bias"]
    with pytest.raises(ConversionError) as err:
        convert(bad)
    assert "missing source key 'out.2.bias'" in str(err.value)
    assert "unexpected source key 'extra.weight'" in str(err.value)

    # The CLI prints every problem (not just the first line) and exits with status 2.
    bad = dict(sd, stray_buffer=torch.zeros(3), another_stray=torch.zeros(1))
    path = str(tmp_path / "stray.ckpt")
    torch.save({"state_dict": bad}, path)
    assert cli.main(["compvis", path, str(tmp_path / "o2"), "--compvis_config", config_path, "--tokenizer", tok]) == 2
    err_text = capsys.readouterr().err
    assert "another_stray" in err_text and "stray_buffer" in err_text

    wrong = yaml.safe_load(yaml.safe_dump(arch))
    wrong["model"]["params"]["linear_end"] = 0.02
    with pytest.raises(ConversionError, match="betas"):
        convert(sd, wrong)
    wrong = yaml.safe_load(yaml.safe_dump(arch))
    wrong["model"]["params"]["unet_config"]["params"]["context_dim"] = 48
    with pytest.raises(ConversionError, match="shape mismatch"):
        convert(sd, wrong)

    path = str(tmp_path / "object.ckpt")  # a pickled object (as Lightning's hparams): weights_only must refuse it
    torch.save({"state_dict": dict(sd), "hparams": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(ConversionError, match="weights_only"):
        compvis.convert_compvis_checkpoint(path, str(tmp_path / "o3"), arch, tokenizer=tok)


def test_class_conditional_vq_compvis_matches_diffusers(tmp_path):
    """CompVis cin256-v2 layout at tiny size: VQ-f first stage, ClassEmbedder (last row = null class), cross-attention
    UNet, scale_factor 1 (the CompVis default). Oracle: diffusers UNet + DDIMScheduler + VQModel.decode by hand."""
    num_classes, width = 10, 32
    torch.manual_seed(7)
    vq_cfg = dict(
        kind="vq", in_channels=3, out_channels=3, resolution=2 * LATENT, ch=32, ch_mult=(1, 2), num_res_blocks=1
    )
    vq_cfg.update(attn_resolutions=(), dropout=0.0, z_channels=3, double_z=False, embed_dim=3, n_embed=64)
    vq_cfg.update(beta=0.25, ema_codebook=False, ema_decay=0.99, dtype="float32")
    vq_cfg = ml_collections.ConfigDict(vq_cfg)
    vq = perturb(diffusers.VQModel(**diffusers_config(vq_cfg)), 8)
    unet = tiny_unet(width, 9, channels=3)
    table = torch.randn(num_classes + 1, width)

    unet_cfg = unet_config_from_diffusers(unet.config)
    text_cfg = dict(kind="class", num_classes=num_classes, width=width, vocab_size=0, max_length=0, depth=0)
    text_cfg.update(num_heads=0, head_dim=0, mlp_ratio=0, dtype="float32", remat=False)
    _, first_stage_variables = from_diffusers("vqvae", to_numpy_state_dict(vq.state_dict()), vq_cfg)
    _, unet_vars = from_diffusers("unet", to_numpy_state_dict(unet.state_dict()), unet_cfg)
    params = {"unet": unet_vars["params"], "cond": {"embedding": {"embedding": table.numpy()}}}
    sd = compvis.export_state_dict(
        unet_cfg=unet_cfg,
        text_cfg=text_cfg,
        first_stage_config=vq_cfg,
        first_stage_params=first_stage_variables["params"],
        params=params,
        ema=None,
    )

    diffusion = dict(schedule="linear", timesteps=1000, linear_start=0.0015, linear_end=0.0195)
    config = ml_collections.ConfigDict(dict(unet=unet_cfg, diffusion=diffusion, first_stage=dict(scale_factor=1.0)))
    sd.update(schedule_buffers(config.diffusion))
    ckpt = str(tmp_path / "cin.ckpt")
    write_ckpt(ckpt, sd, 5)
    cond = dict(target="ldm.modules.encoders.modules.ClassEmbedder", params=dict(n_classes=num_classes + 1))
    cond["params"]["embed_dim"] = width
    config_path = str(tmp_path / "cin.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(compvis_yaml(config, vq_cfg, cond), f)
    out = str(tmp_path / "wd")
    assert cli.main(["compvis", ckpt, out, "--compvis_config", config_path]) == 0

    labels = [3, 7]
    x_T = np.random.default_rng(2).standard_normal((2, 3, LATENT, LATENT)).astype(np.float32)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0015,
        beta_end=0.0195,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    scheduler.set_timesteps(STEPS)
    context = table[torch.tensor(labels + [num_classes] * 2)][:, None]  # conditional, then the null class
    x = torch.from_numpy(x_T)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_c, eps_u = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
            x = scheduler.step(eps_u + GUIDANCE * (eps_c - eps_u), t, x).prev_sample
        want = (vq.decode(x / 1.0).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    ours = Pipeline.from_workdir(out)
    assert ours.class_conditional and ours.scale_factor == 1.0
    got = ours(labels, sampler="ddim", steps=STEPS, guidance=GUIDANCE, x_T=x_T.transpose(0, 2, 3, 1), output="float")
    check_images(got, want)


# -------------------------------------------------------------------------------------------------------- export


def test_export_of_a_model_diffusers_cannot_run_is_refused_in_one_line(tmp_path, capsys):
    """The demo's text encoder has 24 positions; LDMTextToImagePipeline pads prompts to 77 (IndexError at its first
    prompt). Refused before anything is written."""
    out = tmp_path / "exported"
    demo_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo")
    assert cli.main(["export", demo_dir, str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pads every prompt to 77 tokens" in err and "has 24 positions" in err and "\n" not in err
    assert not out.exists() or not os.listdir(out)


@pytest.mark.parametrize("model", ["ldm", "sd"])
def test_export_round_trip_and_diffusers_loads_it(model, request, tmp_path):
    _, original = request.getfixturevalue(f"{model}_dir")
    workdir = request.getfixturevalue(f"{model}_workdir")
    exported = str(tmp_path / "exported")
    assert cli.main(["export", workdir, exported]) == 0

    again = convert_dir(exported, str(tmp_path / "again"))  # re-import: bit-exact
    assert_trees_equal(load_params(again, EMA_FILE), load_params(workdir, EMA_FILE))
    first_stage = [
        params_io.load_params(os.path.join(w, "first_stage", "params.safetensors")) for w in (workdir, again)
    ]
    assert_trees_equal(*first_stage)
    a, b = Pipeline.from_workdir(workdir), Pipeline.from_workdir(again)
    assert a.scale_factor == b.scale_factor
    for block in ("unet", "text_encoder", "diffusion", "first_stage", "tokenizer"):
        if block == "tokenizer":
            np.testing.assert_array_equal(a.tokenizer.encode(PROMPTS), b.tokenizer.encode(PROMPTS))
        else:
            assert a.config[block].to_dict() == b.config[block].to_dict(), block

    cls = LDMTextToImagePipeline if model == "ldm" else StableDiffusionPipeline
    loaded = cls.from_pretrained(exported)
    vae, text = ("vqvae", "bert") if model == "ldm" else ("vae", "text_encoder")
    for name in ("unet", vae, text):
        got, want = getattr(loaded, name).state_dict(), getattr(original, name).state_dict()
        want = {k: v for k, v in want.items() if not k.startswith("to_logits")}  # LDMBert's unused output head
        assert set(want) <= set(got), name
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k)
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((2, 4, LATENT, LATENT)).astype(np.float32))
    ids = torch.from_numpy(a.tokenizer.encode(PROMPTS).astype(np.int64))
    context = torch.from_numpy(rng.standard_normal((2, 5, 32)).astype(np.float32))
    outputs = []
    with torch.no_grad():
        for m in (loaded, original):
            text_out = getattr(m, text)(ids)[0]
            outputs.append(
                (text_out, m.unet(x, 501, encoder_hidden_states=context).sample, getattr(m, vae).decode(x).sample)
            )
    for got, want in zip(*outputs):
        assert torch.equal(got, want)
    assert loaded.tokenizer(PROMPTS)["input_ids"] == original.tokenizer(PROMPTS)["input_ids"]


# ---------------------------------------------------------------------------------------------------- small units


def test_converted_config_has_every_field_of_the_stage2_config_file(ldm_workdir):
    """The converted config.json has exactly the fields configs/ldm_txt2img_kl8.py has (sample.py, train.py, eval/
    read them by attribute)."""

    def keys(c) -> set:
        return set(traverse_util.flatten_dict(c.to_dict() if hasattr(c, "to_dict") else c))

    reference = config_utils.load_config(os.path.join(REPO, "configs", "ldm_txt2img_kl8.py") + ":paper")
    converted = config_utils.load_workdir_config(ldm_workdir)
    assert keys(converted) == keys(reference)
    with pytest.raises(FileNotFoundError, match="--ema"):
        Pipeline.from_workdir(ldm_workdir, use_ema=False)  # a diffusers model has one set of weights


def test_unet_config_maps_both_ways():
    base = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=[32, 64, 64],
        layers_per_block=2,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=16,
        attention_head_dim=[1, 2, 2],  # per-block heads of 32 channels each (the SD 2 style)
        use_linear_projection=True,
    )
    ours = unet_config_from_diffusers(base)
    assert ours["attention_resolutions"] == (1, 2) and ours["channel_mult"] == (1, 2, 2)
    assert (ours["num_heads"], ours["num_head_channels"], ours["use_linear_proj"]) == (-1, 32, True)
    back = diffusers_unet_config(ours, 8)
    assert unet_config_from_diffusers(back) == ours
    UNet2DConditionModel(**{k: v for k, v in back.items() if not k.startswith("_")})  # diffusers accepts it

    with pytest.raises(ConversionError) as err:
        unet_config_from_diffusers({**base, "resnet_time_scale_shift": "scale_shift", "act_fn": "gelu"})
    assert "resnet_time_scale_shift" in str(err.value) and "act_fn" in str(err.value)
    with pytest.raises(ConversionError, match="mirror"):
        unet_config_from_diffusers({**base, "up_block_types": ["UpBlock2D"] * 3})


def test_bfloat16_safetensors_are_read(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 4).to(torch.bfloat16), "b": torch.randn(5), "c": torch.arange(4)}
    path = str(tmp_path / "w.safetensors")
    save_file(tensors, path)
    got, step = read_weights(path)
    assert step == -1 and got["a"].dtype == np.float32
    for k, v in tensors.items():
        np.testing.assert_array_equal(got[k], v.float().numpy() if k != "c" else v.numpy())


def test_ldm_pipeline_at_another_size_matches_diffusers(ldm_dir, ldm_workdir):
    """Non-square and larger than the training size (the paper's convolutional sampling): height / width as
    diffusers' LDMTextToImagePipeline takes them, from the same seed-0 noise (drawn at the new latent size)."""
    from latentdiff.errors import UserError

    _, pipe = ldm_dir
    lh, lw = 6, 12  # latent sides; images 12 x 24 (f = 2), the training size is 16 x 16
    x_T = np.array(generation.initial_noise(0, jax.numpy.arange(len(PROMPTS)), (lh, lw, 4)))
    want = diffusers_images(pipe, x_T.transpose(0, 3, 1, 2), height=8 * lh, width=8 * lw)  # its latents: h // 8
    ours = Pipeline.from_workdir(ldm_workdir)
    got = ours(PROMPTS, sampler="ddim", steps=STEPS, guidance=GUIDANCE, height=2 * lh, width=2 * lw, output="float")
    assert got.shape == want.shape == (len(PROMPTS), 2 * lh, 2 * lw, 3)
    assert np.abs(want[0] - want[1]).mean() > 0.01
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    with pytest.raises(UserError, match=r"height 10 is not a positive multiple of 4 .*use e.g. 8"):
        ours(PROMPTS, sampler="ddim", steps=STEPS, guidance=GUIDANCE, height=10)


def test_compvis_presets_are_yaml_files_with_the_papers_architectures():
    """The presets are CompVis YAMLs read at run time (latentdiff/convert/compvis_presets/): the paper's LDM-KL-8-G
    is exactly configs/ldm_txt2img_kl8.py:paper's architecture; cin256-v2 is the VQ-f4 class-conditional model."""
    from latentdiff.errors import UserError

    assert compvis.preset_names() == ["cin256-v2", "sd-v1", "txt2img-f8-large"]
    paper = compvis.architecture(compvis.load_preset("txt2img-f8-large"))
    ours = config_utils.load_config("configs/ldm_txt2img_kl8.py:paper")
    unet = ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads", "context_dim")
    text = ("vocab_size", "max_length", "width", "depth", "num_heads", "head_dim")
    for block, fields in (("unet", unet), ("text_encoder", text)):
        for field in fields:
            value = ours[block][field]
            assert paper[block][field] == (tuple(value) if isinstance(value, (list, tuple)) else value), field
    assert paper["scale_factor"] == ours.first_stage.scale_factor and paper["cond_target"] == "BERTEmbedder"
    cin = compvis.architecture(compvis.load_preset("cin256-v2"))
    assert (cin["first_stage"]["kind"], cin["first_stage"]["n_embed"]) == ("vq", 8192)
    assert cin["cond_target"] == "ClassEmbedder"
    sd = compvis.architecture(compvis.load_preset("sd-v1"))
    assert (sd["unet"]["context_dim"], sd["cond_target"]) == (768, "FrozenCLIPEmbedder")
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        compvis.load_preset("nope")

"""UNet converters against diffusers' UNet2DConditionModel (the oracle) and its own CompVis->diffusers converter."""

import jax
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from latentdiff.convert import diffusers_text, diffusers_unet, diffusers_vae
from latentdiff.convert.diffusers_unet import (
    convert_unet,
    convert_unet_compvis,
    export_unet,
    export_unet_compvis,
    unet_table,
)
from latentdiff.convert.key_tables import ConversionError
from latentdiff.convert.weight_files import to_numpy_state_dict

# (diffusers config, our config): A = cross-attention at level 0 only, 2 res blocks, conv projections;
# B = class-conditional, attention at both levels, depth-2 transformers, linear projections, concat input channels.
CASES = {
    "crossattn": (
        dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            cross_attention_dim=24,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        dict(
            in_channels=4,
            out_channels=4,
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=2,
            attention_resolutions=(1,),
            num_heads=8,
            num_head_channels=-1,
            transformer_depth=1,
            context_dim=24,
            num_classes=0,
            dropout=0.0,
            use_linear_proj=False,
            dtype="float32",
            remat=False,
            attention_impl="xla",
        ),
    ),
    "class_linear": (
        dict(
            sample_size=16,
            in_channels=6,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            cross_attention_dim=16,
            attention_head_dim=4,
            transformer_layers_per_block=2,
            use_linear_projection=True,
            num_class_embeds=10,
            norm_num_groups=32,
        ),
        dict(
            in_channels=6,
            out_channels=4,
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(1, 2),
            num_heads=4,
            num_head_channels=-1,
            transformer_depth=2,
            context_dim=16,
            num_classes=10,
            dropout=0.0,
            use_linear_proj=True,
            dtype="float32",
            remat=False,
            attention_impl="xla",
        ),
    ),
}


def _torch_unet(name: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    model = UNet2DConditionModel(**CASES[name][0]).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but perturb so no weight is at its trivial init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    name = request.param
    model = _torch_unet(name)
    cfg = ml_collections.ConfigDict(CASES[name][1])
    return name, model, cfg, to_numpy_state_dict(model.state_dict())


def test_forward_matches_diffusers(case):
    _, model, cfg, sd = case
    module, params = convert_unet(sd, cfg)
    rng = np.random.default_rng(1)
    b = 2
    x = rng.standard_normal((b, 16, 16, cfg.in_channels)).astype(np.float32)
    t = np.array([3, 917], np.int64)
    ctx = rng.standard_normal((b, 5, cfg.context_dim)).astype(np.float32)
    y = np.array([2, 9], np.int64) if cfg.num_classes else None
    with torch.no_grad():
        ref = model(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),
            torch.from_numpy(t),
            encoder_hidden_states=torch.from_numpy(ctx),
            class_labels=None if y is None else torch.from_numpy(y),
        ).sample.numpy()
    out = jax.jit(module.apply)(params, x, t, ctx, None if y is None else y.astype(np.int32))
    out = np.asarray(out).transpose(0, 3, 1, 2)
    assert np.abs(ref).mean() > 0.1  # a non-trivial output
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_export_round_trip(case):
    _, _, cfg, sd = case
    _, params = convert_unet(sd, cfg)
    back = export_unet(params, cfg)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_compvis_keys_agree_with_diffusers_converter(case):
    """Our CompVis table, inverted, gives keys that diffusers' own CompVis->diffusers converter maps back exactly."""
    _, model, cfg, sd = case
    _, params = convert_unet(sd, cfg)
    compvis = export_unet_compvis(params, cfg)
    compvis["first_stage_model.decoder.conv_out.weight"] = np.zeros((3, 4, 3, 3), np.float32)  # other models' keys
    back = convert_ldm_unet_checkpoint(dict(compvis), dict(model.config))
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(np.asarray(back[k]), sd[k], err_msg=k)
    _, params2 = convert_unet_compvis(compvis, cfg)
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_missing_unexpected_and_misshaped_keys_raise(case):
    _, _, cfg, sd = case
    bad = dict(sd)
    del bad["conv_in.bias"]
    bad["down_blocks.0.resnets.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as err:
        convert_unet(bad, cfg)
    assert "missing source key 'conv_in.bias'" in str(err.value)
    assert "unexpected source key 'down_blocks.0.resnets.0.extra.weight'" in str(err.value)

    wrong = ml_collections.ConfigDict(dict(cfg))
    wrong.context_dim = cfg.context_dim * 2
    with pytest.raises(ConversionError, match=r"shape mismatch .*attn2\.to_k\.weight"):
        convert_unet(sd, wrong)

    wrong = ml_collections.ConfigDict(dict(cfg))
    wrong.use_linear_proj = not cfg.use_linear_proj
    with pytest.raises(ConversionError, match="use_linear_proj"):
        convert_unet(sd, wrong)

    with pytest.raises(ConversionError, match="prefix"):
        convert_unet_compvis(sd, cfg)


def test_compvis_table_has_the_known_checkpoint_keys():
    """Key names of the public CompVis checkpoints of this architecture (txt2img-f8 / SD v1 layout)."""
    cfg = ml_collections.ConfigDict(CASES["crossattn"][1])
    cfg.update(
        model_channels=320, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1), context_dim=1280, num_heads=8
    )
    keys = {rule.src for rule in unet_table(cfg, "compvis")}
    assert len(keys) == 686
    for key in [
        "time_embed.2.weight",
        "input_blocks.0.0.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight",
        "input_blocks.11.0.out_layers.3.weight",
        "middle_block.1.proj_in.weight",
        "middle_block.2.emb_layers.1.bias",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.2.conv.weight",
        "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        "out.2.weight",
    ]:
        assert key in keys, key


def test_every_diffusers_unet_config_field_is_reproduced_or_refused():
    """Each field of UNet2DConditionModel's constructor is in the converter's table (mapped, fixed or inert); a fixed
    field with another value or a field the table does not know is refused, never ignored (issue 24 #6)."""
    import inspect

    from diffusers import UNet2DConditionModel

    fields = [n for n in inspect.signature(UNet2DConditionModel.__init__).parameters if n not in ("self", "kwargs")]
    table = diffusers_unet.unet_field_table()
    assert sorted(set(fields) - set(table)) == []  # a new diffusers field must be classified before it converts
    base = {
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 16,
        "attention_head_dim": 2,
    }
    assert diffusers_unet.unet_config_from_diffusers(base)["model_channels"] == 32
    silu = dict(base, time_embedding_act_fn="silu")  # changes the time embedding: was ignored (outputs 5% off)
    with pytest.raises(ConversionError, match=r"time_embedding_act_fn='silu' \(latentdiff implements None\)"):
        diffusers_unet.unet_config_from_diffusers(silu)
    with pytest.raises(ConversionError, match="fields latentdiff does not reproduce: a_future_field"):
        diffusers_unet.unet_config_from_diffusers(dict(base, a_future_field=1))
    assert diffusers_unet.unet_config_from_diffusers(dict(base, sample_size=64, _diffusers_version="0.30"))


def test_every_diffusers_autoencoder_config_field_is_reproduced_or_refused():
    """The same for AutoencoderKL and VQModel: every constructor field is classified; unknown fields are refused."""
    import inspect

    from diffusers import AutoencoderKL, VQModel

    table = diffusers_vae.vae_field_table()
    for cls in (AutoencoderKL, VQModel):
        fields = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "kwargs")]
        assert sorted(set(fields) - set(table)) == [], cls.__name__
    base = {
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "latent_channels": 4,
        "sample_size": 32,
    }
    assert diffusers_vae.vae_config_from_diffusers(dict(base, force_upcast=True), "kl")["ch"] == 32
    with pytest.raises(ConversionError, match="fields latentdiff does not reproduce: a_future_field"):
        diffusers_vae.vae_config_from_diffusers(dict(base, a_future_field=1), "kl")
    with pytest.raises(ConversionError, match=r"shift_factor=0.1 \(latentdiff implements None\)"):
        diffusers_vae.vae_config_from_diffusers(dict(base, shift_factor=0.1), "kl")


def test_every_text_encoder_config_field_is_reproduced_or_refused():
    """The same for the text encoders of the two pipelines (transformers CLIPTextConfig, diffusers LDMBertConfig):
    every constructor field and every key their config.json holds is classified; unknown fields are refused."""
    import inspect

    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig
    from transformers import CLIPTextConfig

    from latentdiff.convert.diffusers_clip import clip_config, clip_field_table

    for cls, table in ((CLIPTextConfig, clip_field_table()), (LDMBertConfig, diffusers_text.bert_field_table())):
        fields = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "kwargs")]
        written = [k for k in cls().to_dict() if not k.startswith("_")]
        assert sorted(set(fields + written) - set(table)) == [], cls.__name__
    # SD v1.5's text_encoder/config.json (written by transformers 4.22), and the LDM pipeline's LDMBert one.
    sd15 = {
        "_name_or_path": "openai/clip-vit-large-patch14",
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "projection_dim": 768,
        "torch_dtype": "float32",
        "transformers_version": "4.22.0.dev0",
        "vocab_size": 49408,
    }
    assert clip_config(sd15)["width"] == 768
    with pytest.raises(ConversionError, match="fields latentdiff does not reproduce: a_future_field"):
        clip_config(dict(sd15, a_future_field=1))
    with pytest.raises(ConversionError, match=r"pruned_heads=\{0: \[1\]\}"):
        clip_config(dict(sd15, pruned_heads={0: [1]}))
    bert = LDMBertConfig(encoder_layers=2, d_model=64, encoder_ffn_dim=256, head_dim=16).to_dict()
    assert diffusers_text.bert_config_from_diffusers(bert)["depth"] == 2
    with pytest.raises(ConversionError, match="fields latentdiff does not reproduce: a_future_field"):
        diffusers_text.bert_config_from_diffusers(dict(bert, a_future_field=1))
    with pytest.raises(ConversionError, match=r"activation_function='relu' \(latentdiff implements 'gelu'\)"):
        diffusers_text.bert_config_from_diffusers(dict(bert, activation_function="relu"))

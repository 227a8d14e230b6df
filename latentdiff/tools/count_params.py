"""Parameter counts of every model in a config, from `jax.eval_shape` (nothing is allocated).

latentdiff count-params --config configs/ldm_txt2img_kl8.py:paper
"""

from __future__ import annotations

import argparse
import sys

import latentdiff  # noqa: F401  (CPU XLA flags)
from latentdiff import errors


def model_inits(config) -> dict:
    """name -> zero-arg function returning the abstract params of that model."""
    import jax
    import jax.numpy as jnp

    inits = {}
    if "autoencoder" in config:
        from latentdiff.first_stage import abstract_autoencoder_variables

        inits["autoencoder"] = lambda: abstract_autoencoder_variables(config.autoencoder)["params"]
    if "discriminator" in config:
        from latentdiff.train.autoencoder import build_discriminator

        disc = build_discriminator(config.discriminator)
        r = config.autoencoder.resolution
        x = jax.ShapeDtypeStruct((1, r, r, config.discriminator.in_channels), jnp.float32)
        inits["discriminator"] = lambda: jax.eval_shape(lambda x: disc.init(jax.random.key(0), x, False), x)["params"]
    if "unet" in config:
        from latentdiff.nn.text_encoder import build_text_encoder, init_tokens
        from latentdiff.nn.unet import build_unet

        unet, enc = build_unet(config.unet), build_text_encoder(config.text_encoder)
        tokens = init_tokens(config.text_encoder, 1)
        size = 8 * 2 ** (len(config.unet.channel_mult) - 1)

        def unet_params():
            x = jnp.zeros((1, size, size, config.unet.in_channels))
            ctx = jnp.zeros((1, 1, config.unet.context_dim)) if config.unet.context_dim else None
            return jax.eval_shape(lambda: unet.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32), ctx))["params"]

        inits["unet"] = unet_params
        if config.text_encoder.kind != "none":  # 'none' (super-resolution): no conditioning model, no params
            inits["text_encoder" if config.text_encoder.kind == "bert" else "class_embedder"] = lambda: jax.eval_shape(
                lambda: enc.init(jax.random.key(0), tokens)
            )["params"]
    return inits


def count_table(config) -> list[tuple[str, str, int]]:
    """[(model, top-level module, count)] plus (model, 'total', n) rows."""
    from latentdiff.params_io import count

    rows = []
    for name, init in model_inits(config).items():
        params = init()
        for top in sorted(params):
            rows.append((name, top, count(params[top])))
        rows.append((name, "total", count(params)))
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="latentdiff count-params", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/NAME.py:VARIANT")
    args = parser.parse_args(argv)

    def run() -> None:
        from latentdiff.config_utils import load_config

        rows = count_table(load_config(args.config))
        grand = 0
        for model, module, n in rows:
            if module == "total":
                print(f"{model:<16} {'TOTAL':<28} {n:>15,d}  ({n / 1e6:.2f}M)")
                grand += n
            else:
                print(f"{model:<16} {module:<28} {n:>15,d}")
        print(f"{'all models':<45} {grand:>15,d}  ({grand / 1e6:.2f}M)")

    errors.run_cli(run)


if __name__ == "__main__":
    main(sys.argv[1:])

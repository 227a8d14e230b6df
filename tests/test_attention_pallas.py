"""attention_impl='pallas_tpu' (JAX's Pallas TPU flash-attention kernel) against the XLA attention, run by Pallas'
TPU interpret mode on the CPU: values and gradients, padded sequence lengths, bf16, sharded over a mesh, and inside
the UNet and the text encoder. (That it compiles for TPU is tests/test_preflight.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from latentdiff import parallel
from latentdiff.nn.attention import attention


def qkv_and_probe(t, s, dtype, batch=2, heads=2, head_dim=32):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, t, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (batch, s, heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (batch, s, heads, head_dim), jnp.float32).astype(dtype)
    probe = jax.random.normal(keys[3], (batch, t, heads, head_dim), jnp.float32)
    return q, k, v, probe


def value_and_grads(impl, q, k, v, probe):
    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, impl).astype(jnp.float32) * probe)

    out = attention(q, k, v, impl)
    return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("t, s", [(256, 256), (64, 77), (200, 128)])  # aligned; padded keys; padded queries
def test_float32_values_and_gradients_match_xla(t, s):
    q, k, v, probe = qkv_and_probe(t, s, jnp.float32)
    with pltpu.force_tpu_interpret_mode():
        out, grads = value_and_grads("pallas_tpu", q, k, v, probe)
    ref_out, ref_grads = value_and_grads("xla", q, k, v, probe)
    assert out.shape == ref_out.shape == (2, t, 2, 32)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_bfloat16_matches_xla_within_bf16_rounding():
    q, k, v, probe = qkv_and_probe(128, 77, jnp.bfloat16)
    with pltpu.force_tpu_interpret_mode():
        out, grads = value_and_grads("pallas_tpu", q, k, v, probe)
    ref_out, ref_grads = value_and_grads("xla", q, k, v, probe)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(out), np.float32(ref_out), atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, ref_grads, strict=True):
        scale = float(jnp.abs(want.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.float32(got), np.float32(want), atol=2e-2 * scale)


def test_sharded_over_the_batch_axes_under_a_mesh():
    """Under the mesh context the train step enters, the kernel runs in a shard_map over ('data', 'fsdp')."""
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    q, k, v, _ = qkv_and_probe(64, 77, jnp.float32, batch=8)

    def run(impl):
        fn = jax.jit(parallel.under_mesh(lambda q, k, v: attention(q, k, v, impl), mesh))
        return fn(*(jax.device_put(x, parallel.batch_sharding(mesh)) for x in (q, k, v)))

    with pltpu.force_tpu_interpret_mode():
        jaxpr = str(
            jax.make_jaxpr(parallel.under_mesh(lambda q, k, v: attention(q, k, v, "pallas_tpu"), mesh))(q, k, v)
        )
        out = run("pallas_tpu")
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    np.testing.assert_allclose(out, run("xla"), atol=1e-5)
    # a batch the mesh cannot split (the sampler's single null condition) takes XLA's path: no kernel, same values
    q1, k1, v1 = q[:1], k[:1], v[:1]
    with pltpu.force_tpu_interpret_mode():
        jaxpr = str(
            jax.make_jaxpr(parallel.under_mesh(lambda q, k, v: attention(q, k, v, "pallas_tpu"), mesh))(q1, k1, v1)
        )
    assert "pallas_call" not in jaxpr


def random_params(shapes, rng: np.random.Generator):
    """Params of the given shapes: kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.05^2), the rest N(0, 0.05^2)."""

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim >= 2:
            return rng.normal(0.0, float(np.prod(leaf.shape[:-1])) ** -0.5, leaf.shape).astype(leaf.dtype)
        return ((1.0 if "scale" in name else 0.0) + rng.normal(0.0, 0.05, leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def test_unet_and_text_encoder_with_pallas_attention_match_xla():
    from latentdiff.config_utils import load_config
    from latentdiff.nn.text_encoder import build_text_encoder, init_tokens
    from latentdiff.nn.unet import build_unet

    config = load_config("configs/ldm_txt2img_kl8.py:tiny")
    tokens = jax.random.randint(jax.random.key(1), (1, 8), 0, 100)  # small: interpret mode runs the grid in Python
    text = {impl: build_text_encoder({**config.text_encoder, "attention_impl": impl}) for impl in ("xla", "pallas_tpu")}
    unet = {impl: build_unet({**config.unet, "attention_impl": impl}) for impl in ("xla", "pallas_tpu")}
    text_params = text["xla"].init(jax.random.key(0), init_tokens(config.text_encoder, 1))["params"]
    x = jax.random.normal(jax.random.key(2), (1, 8, 8, 4))
    t = jnp.array([900])
    # Random params drawn on the host for the shapes init would make (XLA:CPU takes over a minute to compile this
    # UNet's init, for values that do not matter here); none is zero, so every attention reaches the output.
    context_shape = jnp.zeros((1, 8, config.unet.context_dim))
    shapes = jax.eval_shape(lambda: unet["xla"].init(jax.random.key(3), x, t, context_shape, None, False))
    unet_params = random_params(shapes["params"], np.random.default_rng(4))
    outs = {}
    for impl in ("xla", "pallas_tpu"):
        with pltpu.force_tpu_interpret_mode():
            context = text[impl].apply({"params": text_params}, tokens)
            apply = lambda p, x, t, c, impl=impl: unet[impl].apply({"params": p}, x, t, c, None, False)
            # XLA jitted (one program; op by op, each of its hundreds of ops compiles alone); the interpreted Pallas
            # kernels op by op (jitted, their grid loops take longer to compile than to run)
            outs[impl] = (context, (jax.jit(apply) if impl == "xla" else apply)(unet_params, x, t, context))
    np.testing.assert_allclose(outs["pallas_tpu"][0], outs["xla"][0], atol=1e-5)
    np.testing.assert_allclose(outs["pallas_tpu"][1], outs["xla"][1], atol=1e-5)

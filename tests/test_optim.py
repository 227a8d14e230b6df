"""latentdiff.train.optim (fused AdamW + EMA + non-finite guard) against optax's transforms step by step."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from latentdiff.train import optim, step_parts


def optim_config(name: str, grad_clip: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name=name,
            lr=3e-3,
            b1=0.9,
            b2=0.99,
            eps=1e-8,
            weight_decay=0.05,
            warmup_steps=2,
            schedule="cosine",
            grad_clip=grad_clip,
        )
    )


def optax_reference(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    lr = optim.learning_rate_schedule(cfg, num_steps)
    if cfg.name == "adamw":
        core = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    else:
        core = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), core) if cfg.grad_clip > 0 else core


def random_tree(rng: np.random.Generator, scale: float) -> dict:
    return {
        "conv": {"kernel": jnp.asarray(rng.normal(0, scale, (3, 3, 4, 8)), jnp.float32)},
        "dense": {
            "kernel": jnp.asarray(rng.normal(0, scale, (8, 5)), jnp.float32),
            "bias": jnp.asarray(rng.normal(0, scale, (5,)), jnp.float32),
        },
        "logvar": jnp.asarray(rng.normal(0, scale), jnp.float32),
    }


@pytest.mark.parametrize("single_pass", [False, True])
@pytest.mark.parametrize("name, grad_clip, with_ema", [("adamw", 1.0, True), ("adam", 0.0, False)])
def test_fused_update_matches_optax_chain_ema_and_guard(
    name: str, grad_clip: float, with_ema: bool, single_pass: bool
) -> None:
    """7 steps: gradient scales that do and do not trigger clipping, and one step with a NaN gradient that both must
    skip entirely (params, moments, count, EMA unchanged). Both forms: three passes per leaf and one."""
    num_steps, decay = 7, 0.9
    cfg = optim_config(name, grad_clip)
    ref_tx = optax_reference(cfg, num_steps)
    ours = dataclasses.replace(optim.make_optimizer(cfg, num_steps), single_pass=single_pass)
    rng = np.random.default_rng(0)
    params = random_tree(rng, 1.0)
    ref = (params, ref_tx.init(params), params)
    got = (params, ours.init(params), params)
    for step, scale in enumerate((0.3, 5.0, 0.01, float("nan"), 2.0, 0.5, 40.0)):
        grads = jax.tree.map(lambda g, s=scale: g * s, random_tree(rng, 1.0))
        norm = optax.tree.norm(grads)
        finite = jnp.isfinite(norm)
        # the reference: what the train steps did before the fused update
        updates, opt_state = ref_tx.update(grads, ref[1], ref[0])
        new_params = optax.apply_updates(ref[0], updates)
        new_ema = jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ref[2], new_params)
        ref = jax.tree.map(lambda a, b, f=finite: jnp.where(f, a, b), (new_params, opt_state, new_ema), ref)
        before = got[0]
        p, s, e = ours.apply(grads, got[1], got[0], norm, finite, got[2] if with_ema else None, jnp.float32(decay))
        got = (p, s, e if with_ema else got[2])
        adam_ref = ref[1][-1][0] if grad_clip > 0 else ref[1][0]  # ScaleByAdamState in the chain
        np.testing.assert_array_equal(got[1].count, adam_ref.count, err_msg=f"step {step}")
        pairs = [(ref[0], got[0], "params"), (adam_ref.mu, got[1].mu, "mu"), (adam_ref.nu, got[1].nu, "nu")]
        pairs += [(ref[2], got[2], "ema")] if with_ema else []
        for want, have, what in pairs:
            for w, h in zip(jax.tree.leaves(want), jax.tree.leaves(have)):
                np.testing.assert_allclose(h, w, rtol=2e-6, atol=1e-7, err_msg=f"{what} at step {step}")
        if not bool(finite):
            for w, h in zip(jax.tree.leaves(before), jax.tree.leaves(got[0])):
                np.testing.assert_array_equal(h, w)  # skipped bit for bit
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(got[0])))
    assert moved > 1e-3  # the steps did update (a test of an optimizer that does nothing would pass otherwise)


def test_fused_update_keeps_dtypes_and_structure() -> None:
    cfg = optim_config("adamw", 1.0)
    tx = optim.make_optimizer(cfg, 10)
    params = random_tree(np.random.default_rng(1), 1.0)
    params["half"] = jnp.ones((4,), jnp.bfloat16)
    grads = jax.tree.map(jnp.ones_like, params)
    p, s, e = jax.jit(tx.apply)(
        grads, tx.init(params), params, optax.tree.norm(grads), jnp.bool_(True), params, jnp.float32(0.99)
    )
    for tree in (p, s.mu, s.nu, e):
        assert jax.tree.structure(tree) == jax.tree.structure(params)
        assert [x.dtype for x in jax.tree.leaves(tree)] == [x.dtype for x in jax.tree.leaves(params)]
    assert int(s.count) == 1


def test_unknown_optimizer_name_is_a_clear_error() -> None:
    cfg = optim_config("sgd", 0.0)
    with pytest.raises(ValueError, match=r"optim.name 'sgd' is not one of 'adam', 'adamw'"):
        optim.make_optimizer(cfg, 10)


def test_single_pass_equals_three_passes_jitted_with_donation() -> None:
    """The GPU candidate (one pass per leaf, no barriers) computes the same state as the three-pass form, jitted with
    the state donated as the train steps do, on a finite step and on a skipped one."""
    cfg = optim_config("adamw", 1.0)
    three = optim.make_optimizer(cfg, 10)
    one = dataclasses.replace(three, single_pass=True)
    outputs = {}
    for tx in (three, one):
        params = random_tree(np.random.default_rng(3), 1.0)
        state = (params, tx.init(params), jax.tree.map(jnp.copy, params))
        step = jax.jit(
            lambda g, st, f, tx=tx: tx.apply(g, st[1], st[0], optax.tree.norm(g), f, st[2], jnp.float32(0.99)),
            donate_argnums=1,
        )
        for k, finite in enumerate((True, True, False, True)):
            grads = random_tree(np.random.default_rng(10 + k), 2.0)
            state = step(grads, state, jnp.bool_(finite))
        outputs[tx.single_pass] = jax.tree.leaves(state)
    for a, b in zip(outputs[False], outputs[True]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_gradient_norm_guard_covers_the_new_state(dtype) -> None:
    """The non-finite guard checks the loss and the global gradient norm the step computes anyway; that is enough for
    the new state too (issue 24 #2). A finite norm bounds every |g| and Σg², so μ and ν (its squares) stay finite;
    Adam's step is at most lr·(1-β1)/√(1-β2) per element and the config checks hold lr in (0, 1], so the new
    params and EMA stay finite. At the edge: the largest gradient whose square is still finite passes with a finite
    state (no clipping, the worst case); one element larger makes the norm inf, and the step is skipped."""

    cfg = optim_config("adamw", 0.0)
    cfg.lr, cfg.warmup_steps = 1.0, 0  # the largest learning rate the config checks allow
    tx = optim.make_optimizer(cfg, 10)
    params = jax.tree.map(lambda x: x.astype(dtype), random_tree(np.random.default_rng(2), 1.0))
    edge = float(np.sqrt(np.finfo(np.float32).max)) / 4  # four such entries: Σg² just below the float32 maximum
    for scale, passes in ((edge, True), (edge * 4, False)):
        grads = jax.tree.map(lambda p, s=scale: jnp.full_like(p, 0.0).at[(0,) * p.ndim].set(s), params)
        grads["conv"]["kernel"] = grads["conv"]["kernel"].at[1, 1, 1, 1].set(scale)
        norm = optax.tree.norm(grads)
        finite = step_parts.all_finite(jnp.float32(1.0), norm)
        assert bool(finite) == passes, (scale, norm)
        new_params, state, ema = jax.jit(tx.apply)(grads, tx.init(params), params, norm, finite, params, 0.9)
        for tree in (new_params, state.mu, state.nu, ema):
            assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(tree)), (scale, tree)
        if not passes:  # skipped: everything unchanged
            assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)))

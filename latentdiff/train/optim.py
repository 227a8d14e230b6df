"""Adam / AdamW with global-norm clipping, the EMA and the non-finite guard fused into a few passes per leaf.

The maths is optax's `chain(clip_by_global_norm(c), adamw(lr_schedule, b1, b2, eps, weight_decay))` followed by
`apply_updates`, the EMA, and "keep the old state when the step is not finite". Written with optax's transforms and a
select over the whole state, XLA:CPU split that into many passes per leaf plus defensive copies of the donated state
(the guard needs the old values after the new ones are written). Here each leaf takes three fused passes, each
writing only its own buffer. The 70M-parameter CPU benchmark step went from 1.55–2.06 s to 1.06–1.10 s
(bench/RESULTS.md, session 6). Same results as optax to float rounding: tests/test_optim.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from latentdiff.errors import UserError


class AdamState(NamedTuple):
    """count: int32 [] applied updates (bias correction, learning-rate schedule); mu/nu: first/second moments
    with the params' structure."""

    count: jax.Array
    mu: Any
    nu: Any


@dataclasses.dataclass(frozen=True)
class AdamW:
    """Adam with decoupled weight decay (weight_decay 0: plain Adam) and optional global-norm clipping (grad_clip
    > 0), optax's formulas: g ← g·min(1, c/‖g‖); μ ← (1-β1)g + β1μ; ν ← (1-β2)g² + β2ν;
    p ← p - lr(count)·(μ̂/(√ν̂ + ε) + wd·p) with μ̂ = μ/(1-β1^(count+1)), ν̂ likewise."""

    learning_rate: optax.Schedule
    b1: float
    b2: float
    eps: float
    weight_decay: float
    grad_clip: float
    single_pass: bool  # one fused pass per leaf, no barriers (bench A/B on GPUs); False: the three passes below

    def init(self, params: Any) -> AdamState:
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return AdamState(count=jnp.zeros((), jnp.int32), mu=zeros(), nu=zeros())

    def apply(
        self,
        grads: Any,
        state: AdamState,
        params: Any,
        grad_norm: jax.Array,
        finite: jax.Array,
        ema_params: Any | None = None,
        ema_decay: jax.Array | None = None,
    ) -> tuple[Any, AdamState, Any | None]:
        """One update -> (params, state, ema_params). grad_norm: the global norm of `grads` (clipping); finite:
        bool [] — when False everything is returned unchanged (count included). The EMA (ema ← ema + (1-decay)·
        (p_new - ema)) is updated in the same pass when ema_params is given (else None is returned for it)."""
        count_inc = state.count + 1
        lr = jnp.asarray(self.learning_rate(state.count), jnp.float32)
        corr1 = 1.0 - jnp.float32(self.b1) ** count_inc.astype(jnp.float32)
        corr2 = 1.0 - jnp.float32(self.b2) ** count_inc.astype(jnp.float32)
        clipped = jnp.logical_not(grad_norm < self.grad_clip) if self.grad_clip > 0 else jnp.bool_(False)
        keep = lambda new, old: jnp.where(finite, new.astype(old.dtype), old)
        treedef = jax.tree.structure(params)
        leaves_of = treedef.flatten_up_to

        def moments(g: jax.Array, mu: jax.Array, nu: jax.Array) -> tuple[jax.Array, jax.Array]:
            g = jnp.where(clipped, (g / grad_norm.astype(g.dtype)) * self.grad_clip, g)
            return keep((1.0 - self.b1) * g + self.b1 * mu, mu), keep((1.0 - self.b2) * (g * g) + self.b2 * nu, nu)

        def param(p: jax.Array, mu: jax.Array, nu: jax.Array) -> jax.Array:
            update = (mu / corr1.astype(mu.dtype)) / (jnp.sqrt(nu / corr2.astype(nu.dtype)) + self.eps)
            if self.weight_decay:
                update = update + self.weight_decay * p
            return keep((p + (-lr * update).astype(p.dtype)).astype(p.dtype), p)

        # Three dependent passes per leaf (moments; params from the new moments; EMA from the new params), each
        # writing only its own buffer, so none needs the old value of a buffer another pass overwrites in place (no
        # defensive copies of the donated state). The barriers stop XLA from re-deriving a pass's inputs inside the
        # next one, which brings those copies back. single_pass drops the barriers and leaves XLA free to fuse the
        # three into one pass per leaf (the GPU candidate; the same values, tests/test_optim.py).
        barrier = (lambda tree: tree) if self.single_pass else jax.lax.optimization_barrier
        p_leaves = leaves_of(params)
        moment_leaves = list(map(moments, leaves_of(grads), leaves_of(state.mu), leaves_of(state.nu)))
        mu, nu = barrier(tuple(zip(*moment_leaves))) if p_leaves else ((), ())
        new_params = barrier(list(map(param, p_leaves, mu, nu)))
        new_ema = None
        if ema_params is not None:
            step = 1.0 - jnp.asarray(ema_decay, jnp.float32)
            ema_leaf = lambda e, p: keep(e + step.astype(e.dtype) * (p.astype(e.dtype) - e), e)
            new_ema = treedef.unflatten(list(map(ema_leaf, leaves_of(ema_params), new_params)))
        new_state = AdamState(
            count=jnp.where(finite, count_inc, state.count), mu=treedef.unflatten(mu), nu=treedef.unflatten(nu)
        )
        return treedef.unflatten(new_params), new_state, new_ema


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
    """Linear warmup to optim.lr, then 'constant' or 'cosine' decay to 0 at num_train_steps."""
    warmup = optax.linear_schedule(0.0, optim.lr, max(optim.warmup_steps, 1))
    if optim.schedule == "constant":
        after = optax.constant_schedule(optim.lr)
    elif optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(optim.lr, max(num_train_steps - optim.warmup_steps, 1))
    else:
        raise UserError(f"optim.schedule {optim.schedule!r} is not one of 'constant', 'cosine'")
    return optax.join_schedules([warmup, after], [optim.warmup_steps])


def make_optimizer(optim: ml_collections.ConfigDict, num_train_steps: int) -> AdamW:
    """optim.name 'adam' | 'adamw' with betas, eps, weight_decay (adamw), grad_clip (0 = none) and the schedule."""
    if optim.name not in ("adam", "adamw"):
        raise UserError(f"optim.name {optim.name!r} is not one of 'adam', 'adamw'")
    return AdamW(
        learning_rate=learning_rate_schedule(optim, num_train_steps),
        b1=float(optim.b1),
        b2=float(optim.b2),
        eps=float(optim.eps),
        weight_decay=float(optim.weight_decay) if optim.name == "adamw" else 0.0,
        grad_clip=float(optim.grad_clip),
        # Three passes per leaf: fastest on XLA:CPU (session 6). One pass is the candidate for GPUs, where the
        # barriers may pin the moments to the convolutions' kernel layout (bench/train_step.py --optimizer-single-pass).
        single_pass=False,
    )

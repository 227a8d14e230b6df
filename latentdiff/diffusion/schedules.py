"""Noise schedules of the discrete forward process and the eps / x0 / v conversions between them.

Forward process (Ho et al. 2020, eq. 4): q(x_t | x_0) = N(√ᾱ_t·x_0, (1 − ᾱ_t)·I), ᾱ_t = ∏_{s≤t} (1 − β_s), t ∈ [0, T).
Parameterisations of the denoiser output, given x_t = √ᾱ·x0 + √(1−ᾱ)·ε:
  'eps': ε;  'x0': x0;  'v' (Salimans & Ho 2022): v = √ᾱ·ε − √(1−ᾱ)·x0.
Every conversion takes integer timesteps t (shape [B] or scalar) and broadcasts the per-timestep scalars over the
trailing dimensions of x ([B, ...]).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from latentdiff.errors import UserError

SCHEDULE_KINDS: tuple[str, ...] = ("linear", "scaled_linear", "linear_plain", "cosine")
PARAMETERIZATIONS: tuple[str, ...] = ("eps", "v", "x0")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-timestep constants of a discrete diffusion schedule, all float32 arrays of shape [T]. A JAX pytree."""

    betas: jax.Array
    alphas_cumprod: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array

    @property
    def num_timesteps(self) -> int:
        """T, the number of training timesteps (static even under jit)."""
        return int(self.betas.shape[0])


def make_betas(
    kind: str, num_timesteps: int, linear_start: float, linear_end: float, cosine_s: float = 8e-3
) -> np.ndarray:
    """β_t, float64 numpy [T].

    'linear' / 'scaled_linear' (the LDM paper's code): β = linspace(√start, √end, T)²;
    'linear_plain' (DDPM): β = linspace(start, end, T);
    'cosine' (Nichol & Dhariwal 2021, eq. 17): ᾱ(t) = cos²(((t/T + s)/(1 + s))·π/2) / ᾱ(0),
    β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999). linear_start / linear_end are not used by 'cosine'.
    """
    if kind not in SCHEDULE_KINDS:
        raise UserError(f"unknown schedule kind {kind!r}; valid kinds: {', '.join(SCHEDULE_KINDS)}")
    if not isinstance(num_timesteps, (int, np.integer)) or isinstance(num_timesteps, bool) or num_timesteps < 1:
        raise UserError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    if kind == "cosine":
        if not cosine_s > 0:
            raise UserError(f"cosine_s must be > 0, got {cosine_s!r}")
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps + cosine_s
        f = np.cos(steps / (1.0 + cosine_s) * math.pi / 2.0) ** 2
        f = f / f[0]
        return np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
    if not (0.0 < linear_start <= linear_end < 1.0):
        raise UserError(
            f"need 0 < linear_start <= linear_end < 1 for schedule {kind!r}, got {linear_start!r}, {linear_end!r}"
        )
    if kind in ("linear", "scaled_linear"):
        return np.linspace(math.sqrt(linear_start), math.sqrt(linear_end), num_timesteps, dtype=np.float64) ** 2
    return np.linspace(linear_start, linear_end, num_timesteps, dtype=np.float64)


def make_schedule(
    kind: str, num_timesteps: int, linear_start: float, linear_end: float, cosine_s: float = 8e-3
) -> Schedule:
    """Builds a Schedule (see make_betas for the kinds); computed in float64 numpy, stored as float32."""
    betas = make_betas(kind, num_timesteps, linear_start, linear_end, cosine_s)
    alphas_cumprod = np.cumprod(1.0 - betas)
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
    return Schedule(
        betas=f32(betas),
        alphas_cumprod=f32(alphas_cumprod),
        sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - alphas_cumprod)),
    )


def check_parameterization(parameterization: str) -> None:
    """Raises ValueError unless parameterization is one of 'eps', 'v', 'x0'."""
    if parameterization not in PARAMETERIZATIONS:
        raise UserError(f"unknown parameterization {parameterization!r}; valid: {', '.join(PARAMETERIZATIONS)}")


def broadcast_to_x(values: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes per-example values [B] (or a scalar) to [B, 1, ..., 1] so they broadcast against x [B, ...]."""
    values = jnp.asarray(values)
    return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def _coefs(schedule: Schedule, t: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(√ᾱ_t, √(1−ᾱ_t)) gathered at integer t and shaped to broadcast against x."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise UserError(f"timesteps t must be integers, got dtype {t.dtype}")
    a = broadcast_to_x(schedule.sqrt_alphas_cumprod[t], x)
    s = broadcast_to_x(schedule.sqrt_one_minus_alphas_cumprod[t], x)
    return a, s


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise (Ho et al. 2020, eq. 4). x0, noise [B, ...]; t [B] int."""
    a, s = _coefs(schedule, t, x0)
    return (a * x0 + s * noise).astype(x0.dtype)


def x0_from_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ."""
    a, s = _coefs(schedule, t, x_t)
    return (x_t - s * eps) / a


def eps_from_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    """ε = (x_t − √ᾱ·x0)/√(1−ᾱ)."""
    a, s = _coefs(schedule, t, x_t)
    return (x_t - a * x0) / s


def v_from_eps_x0(schedule: Schedule, t: jax.Array, eps: jax.Array, x0: jax.Array) -> jax.Array:
    """v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022)."""
    a, s = _coefs(schedule, t, x0)
    return a * eps - s * x0


def x0_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """x0 = √ᾱ·x_t − √(1−ᾱ)·v."""
    a, s = _coefs(schedule, t, x_t)
    return a * x_t - s * v


def eps_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """ε = √(1−ᾱ)·x_t + √ᾱ·v."""
    a, s = _coefs(schedule, t, x_t)
    return s * x_t + a * v


def predict_eps_and_x0_from_coefs(
    parameterization: str, model_out: jax.Array, x_t: jax.Array, sqrt_ab: jax.Array, sqrt_1mab: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(ε̂, x̂0) from a model output, given √ᾱ and √(1−ᾱ) already broadcastable against x_t (used by the samplers)."""
    check_parameterization(parameterization)
    if parameterization == "eps":
        eps = model_out
        x0 = (x_t - sqrt_1mab * eps) / sqrt_ab
    elif parameterization == "x0":
        x0 = model_out
        eps = (x_t - sqrt_ab * x0) / sqrt_1mab
    else:
        x0 = sqrt_ab * x_t - sqrt_1mab * model_out
        eps = sqrt_1mab * x_t + sqrt_ab * model_out
    return eps, x0


def predict_eps_and_x0(
    schedule: Schedule, parameterization: str, model_out: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(ε̂, x̂0) [B, ...] from a model output in its parameterisation ('eps' | 'v' | 'x0') at integer timesteps t [B]."""
    check_parameterization(parameterization)
    a, s = _coefs(schedule, t, x_t)
    return predict_eps_and_x0_from_coefs(parameterization, model_out, x_t, a, s)


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t), same shape as t."""
    t = jnp.asarray(t)  # from the stored √(1−ᾱ) (computed in float64): 1 − ᾱ in float32 loses digits at small t
    return jnp.square(schedule.sqrt_alphas_cumprod[t] / schedule.sqrt_one_minus_alphas_cumprod[t])

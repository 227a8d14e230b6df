"""The noise schedule both ways: diffusers' scheduler config (DDIMScheduler / PNDMScheduler / DDPMScheduler fields)
<-> our config.diffusion block, and the diffusion fields of a CompVis config (`schedule_fields`)."""

from __future__ import annotations

from collections.abc import Mapping

from latentdiff.convert.key_tables import ConversionError


def schedule_fields(kind: str, timesteps: int, linear_start: float, linear_end: float, parameterization: str) -> dict:
    """The schedule fields of config.diffusion (stage2_config adds the training fields via config_blocks)."""
    return dict(
        schedule=kind,
        timesteps=int(timesteps),
        linear_start=float(linear_start),
        linear_end=float(linear_end),
        parameterization=parameterization,
    )


_BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "linear_plain", "squaredcos_cap_v2": "cosine"}


_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def diffusion_from_scheduler(d: Mapping) -> dict:
    """A diffusers scheduler config (DDIM / PNDM / LMS ...) -> config.diffusion's schedule fields.

    Only the training schedule is read; sampling options (timestep_spacing, steps_offset ...) are the sampler's."""
    if d.get("trained_betas") is not None:
        raise ConversionError("scheduler has explicit trained_betas; latentdiff schedules are linear/scaled/cosine")
    if d.get("rescale_betas_zero_snr", False):
        raise ConversionError("scheduler rescale_betas_zero_snr=True is not implemented")
    schedule = d.get("beta_schedule", "linear")
    prediction = d.get("prediction_type", "epsilon")
    if schedule not in _BETA_SCHEDULES or prediction not in _PREDICTIONS:
        raise ConversionError(
            f"scheduler beta_schedule={schedule!r} / prediction_type={prediction!r}; supported: "
            f"{sorted(_BETA_SCHEDULES)} / {sorted(_PREDICTIONS)}"
        )
    return schedule_fields(
        _BETA_SCHEDULES[schedule],
        int(d.get("num_train_timesteps", 1000)),
        float(d.get("beta_start", 0.0001)),
        float(d.get("beta_end", 0.02)),
        _PREDICTIONS[prediction],
    )


def diffusers_scheduler_config(diffusion: Mapping) -> dict:
    """config.diffusion -> DDIMScheduler config.json configured as latentdiff's DDIM (DESIGN.md §4)."""
    schedule = {v: k for k, v in _BETA_SCHEDULES.items()}
    schedule["scaled_linear"] = "scaled_linear"
    prediction = {v: k for k, v in _PREDICTIONS.items()}
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": int(diffusion["timesteps"]),
        "beta_start": float(diffusion["linear_start"]),
        "beta_end": float(diffusion["linear_end"]),
        "beta_schedule": schedule[diffusion["schedule"]],
        "prediction_type": prediction[diffusion["parameterization"]],
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }

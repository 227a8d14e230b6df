"""Experiment: 2D convolutions through oneDNN (XLA FFI custom calls) instead of XLA:CPU's Eigen kernels.

Not used by latentdiff. `conv(x, w, strides, padding)` runs oneDNN's forward, backward-data and backward-weights
primitives on NHWC / HWIO float32 arrays (custom VJP); `install()` routes every eligible lax.conv_general_dilated of
the process through it. Build the library first: bash bench/experiments/onednn_conv/build.sh
"""

from __future__ import annotations

import ctypes
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "libldconv.so")
TARGETS = {"ld_conv_fwd": "LdConvFwd", "ld_conv_bwd_data": "LdConvBwdData", "ld_conv_bwd_wei": "LdConvBwdWei"}
NHWC_SPECS = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # lhs, rhs, out specs of ("NHWC", "HWIO", "NHWC")
_LAX_CONV = jax.lax.conv_general_dilated


@functools.cache
def register() -> None:
    """Loads build/libldconv.so and registers its three handlers as CPU FFI targets."""
    if not os.path.exists(LIBRARY):
        raise SystemExit(f"{LIBRARY} is missing; build it: bash bench/experiments/onednn_conv/build.sh")
    lib = ctypes.cdll.LoadLibrary(LIBRARY)
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def _attrs(strides: tuple[int, int], padding: tuple[tuple[int, int], ...]) -> dict[str, np.int64]:
    (top, bottom), (left, right) = padding
    values = dict(sh=strides[0], sw=strides[1], pt=top, pb=bottom, pl=left, pr=right)
    return {k: np.int64(v) for k, v in values.items()}


def _call(target: str, shape: tuple[int, ...], a: jax.Array, b: jax.Array, strides, padding) -> jax.Array:
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(a, b, **_attrs(strides, padding))


def _forward(x: jax.Array, w: jax.Array, strides, padding) -> jax.Array:
    (top, bottom), (left, right) = padding
    out_h = (x.shape[1] + top + bottom - w.shape[0]) // strides[0] + 1
    out_w = (x.shape[2] + left + right - w.shape[1]) // strides[1] + 1
    return _call("ld_conv_fwd", (x.shape[0], out_h, out_w, w.shape[3]), x, w, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: tuple[tuple[int, int], ...]) -> jax.Array:
    """x [B, H, W, C] * w [KH, KW, C, K] -> [B, Ho, Wo, K], float32, explicit padding ((top, bottom), (left, right))."""
    register()
    return _forward(x, w, strides, padding)


def _conv_fwd(x, w, strides, padding):
    register()
    return _forward(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, grad):
    x, w = residuals
    dx = _call("ld_conv_bwd_data", x.shape, grad, w, strides, padding)
    dw = _call("ld_conv_bwd_wei", w.shape, x, grad, strides, padding)
    return dx, dw


conv.defvjp(_conv_fwd, _conv_bwd)


def eligible(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups) -> bool:
    """True for the convolutions oneDNN runs here: 2D, NHWC/HWIO, float32, explicit padding, no dilation/groups."""
    if lhs.ndim != 4 or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32 or groups != (1, 1):
        return False
    if isinstance(padding, str) or dimension_numbers is None:
        return False
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    specs = (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec))
    no_dilation = all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
    return specs == NHWC_SPECS and no_dilation and len(window_strides) == 2


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """lax.conv_general_dilated with the eligible convolutions sent to oneDNN."""
    groups = (feature_group_count, batch_group_count)
    if eligible(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups):
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        return conv(lhs, rhs, tuple(int(s) for s in window_strides), pads)
    return _LAX_CONV(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
        precision,
        preferred_element_type,
    )


def install() -> None:
    """Routes jax.lax.conv_general_dilated (which flax's nn.Conv calls) through conv_general_dilated."""
    register()
    jax.lax.conv_general_dilated = conv_general_dilated

"""Model FLOPs of a JAX function counted from its jaxpr: matrix multiplies and convolutions, loops multiplied out.

XLA's cost analysis counts a while loop's body once, whatever its trip count (a 250-step sampler scan, the
grad-accumulation scan), so it cannot give the FLOPs of a whole call. This counter walks the jaxpr instead:
  dot_general            2 · |out| · (product of the contracted dimensions)
  conv_general_dilated   2 · |out| · |kernel| / (output features)      (MACs per output element = kernel taps · C_in/g),
                         / the lhs dilation (the zeros a strided convolution's input gradient inserts)
  scan                   its body × length;  cond: the largest branch;  while: the body once (unknown trip count)
  any other sub-jaxpr    (jit, remat, custom_jvp/vjp) counted once where it is called.
Element-wise work (norms, softmax, activations) is left out, as in the usual MFU convention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core as jax_core


def _size(shape: tuple[int, ...]) -> float:
    return float(np.prod(shape, dtype=np.float64))


def _eqn_flops(eqn: Any) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs_shape = eqn.invars[0].aval.shape
        contracted = _size(tuple(lhs_shape[d] for d in lhs_contract))
        return 2.0 * _size(eqn.outvars[0].aval.shape) * contracted
    if name == "conv_general_dilated":
        rhs_shape = eqn.invars[1].aval.shape
        out_features = rhs_shape[eqn.params["dimension_numbers"].rhs_spec[0]]
        # lhs dilation (the input gradient of a strided convolution) inserts zeros: only 1 / prod of the taps are real
        dilated = _size(tuple(eqn.params["lhs_dilation"] or ()))
        return 2.0 * _size(eqn.outvars[0].aval.shape) * _size(rhs_shape) / out_features / max(dilated, 1.0)
    return 0.0


def _sub_jaxprs(value: Any) -> list[Any]:
    """The jaxprs held by one eqn parameter (a ClosedJaxpr, a Jaxpr, or a tuple of them)."""
    if isinstance(value, jax_core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jax_core.Jaxpr):
        return [value]
    if isinstance(value, tuple | list):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def jaxpr_flops(jaxpr: Any, unroll_loops: bool = True) -> float:
    """Matmul + convolution FLOPs of one evaluation of `jaxpr` (a Jaxpr): scans multiplied by their length, or with
    unroll_loops False counted once (as XLA's cost analysis counts loop bodies)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "scan":
            length = eqn.params["length"] if unroll_loops else 1
            total += length * jaxpr_flops(eqn.params["jaxpr"].jaxpr, unroll_loops)
        elif name == "cond":
            total += max(jaxpr_flops(b.jaxpr, unroll_loops) for b in eqn.params["branches"])
        elif name == "while":
            total += jaxpr_flops(eqn.params["body_jaxpr"].jaxpr, unroll_loops)
        else:
            total += _eqn_flops(eqn)
            total += sum(jaxpr_flops(j, unroll_loops) for v in eqn.params.values() for j in _sub_jaxprs(v))
    return total


def model_flops(fn: Callable[..., Any], *args: Any) -> tuple[float, float]:
    """(FLOPs of one call of `fn(*args)`, the same with every loop body counted once). args may be
    ShapeDtypeStructs: nothing runs. The ratio of the two scales XLA's per-call analyses to whole calls."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return jaxpr_flops(jaxpr), jaxpr_flops(jaxpr, unroll_loops=False)

"""latentdiff: Latent Diffusion Models (Rombach et al., CVPR 2022) in JAX/Flax."""

from latentdiff._host_malloc import apply_malloc_settings
from latentdiff._libtpu_env import quiet_libtpu_without_tpu
from latentdiff._xla_flags import apply_cpu_flags

apply_cpu_flags()
apply_malloc_settings()
quiet_libtpu_without_tpu()

__version__ = "0.1.0"

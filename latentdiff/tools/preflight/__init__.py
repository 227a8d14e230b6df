"""Pre-flight: compile training's and sampling's programs for a Cloud TPU topology on this host and say, per device,
whether they fit, what they cost and how fast they could run. Nothing is allocated; no TPU is needed.

    latentdiff preflight --config configs/ldm_txt2img_kl8.py:paper --topology v5p:2x2x1 \
        --mesh data=1,fsdp=4 --global_batch 64
    latentdiff preflight --config configs/autoencoder_kl_f8.py:paper --topology v5e:2x4 \
        --mesh data=8,fsdp=1 --global_batch 64 --find_max_batch
    latentdiff preflight --config configs/ldm_txt2img_kl8.py:paper --topology cpu:8 --hbm_gib 80 \
        --mesh data=1,fsdp=8 --global_batch 64 --programs train     # fake CPU devices (e.g. to plan for GPUs)

Programs, each compiled with exactly the shardings and donation training and sampling use (`loop.state_shardings`,
`loop.jit_step`; the sampler as `Pipeline` runs it: params replicated, the batch split over every chip):
  stage 1 (stage 'autoencoder'): `ae_rec` (the step before disc_start) and `ae_gan` (generator + discriminator);
  stage 2 (stage 'ldm'): `train` (one update of global_batch x grad_accum_steps examples; images encoded by the frozen
  first stage in the step, or, with `--config.first_stage.latents=DIR` as in training, precomputed latents) and `sample`
  (the config's sampler, --sample_steps steps with classifier-free guidance, then the first-stage decoder).

Per chip it prints the state (parameters, EMA, optimizer, constants, batch: exact, from the shardings), XLA's memory
analysis (arguments, outputs, aliasing, temporaries), the peak against the chip's HBM (latentdiff/tools/tpu_chips.py)
with the margin, the model FLOPs (matmuls + convolutions of the program without remat, loops multiplied out, counted
from its jaxpr by latentdiff/tools/flop_count.py, / chips) and XLA's compiled FLOPs and bytes accessed (remat
recompute included; XLA counts a loop body once, so both are scaled by the program's loop factor, assuming the
bytes split between loop bodies and the rest as the FLOPs do), and the roofline: time per call >= max(the larger FLOP
count / peak bf16, bytes accessed / HBM bandwidth); MFU ceiling = model FLOPs / (that time x peak). Collectives over
ICI/DCN are not in the bound. --find_max_batch searches the largest global batch whose train program(s) fit.
Modules: topology (the devices of a topology name, via libtpu), programs (the jitted steps on abstract sharded
arguments), report (compile, memory and cost analyses, roofline, the max-batch search), cli (flags, `main`).

Exit status: 0 every program fits, 1 one does not, 2 bad input (one line). Topologies need libtpu
(`pip install "jax[tpu]"`); 'cpu:N' plans on N fake CPU devices (no capacity unless --hbm_gib).
"""

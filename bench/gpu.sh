#!/usr/bin/env bash
# One prepared GPU run of the benchmarks (bf16, cuDNN attention), for when a GPU is at hand. From the repo root:
#
#   OUT=/tmp/gpu_out bash bench/gpu.sh                       # all sections, in this order:
#     env           versions, nvidia-smi, bf16 matmul rate (jnp.dot 8192³)
#     fid           Inception features (FID network, float32), batch 128 of 256 px uint8: ours vs pytorch-fid
#     train_paper   paper-scale stage-2 train step (UNet 872M + text encoder 543M, remat, AdamW, EMA, batch 32,
#                   cuDNN flash attention for the self-attention, XLA for the 77-token cross-attention; TRAIN_ATTENTION=xla
#                   for XLA everywhere),
#                   ours bf16 vs diffusers/PyTorch bf16 autocast; MFU vs 989 TFLOP/s (H100 SXM dense bf16), from
#                   the 24.3 TFLOP/step (no remat) that XLA's cost analysis gives on the CPU (RESULTS.md, GPU)
#     sample_paper  DDIM 50 steps with guidance, batch 16, paper UNet + KL-f8 decoder: ours bf16 vs diffusers fp16
#                   (~105 s on an H100: our worker 62 s with its compile, diffusers' 42 s)
#     train_variants  (only when named) our paper-scale step alone, once per TRAIN_VARIANTS entry (see below)
#     train_best    (only when named) the best-MFU configuration, both frameworks, optimised HLO saved (see below)
#     parity        tiny bf16 UNet: cuDNN vs XLA attention, outputs and parameter gradients (vs a float32 reference)
#     train_tiny    the tiny stage-2 step on the GPU, both frameworks
#   OUT=... bash bench/gpu.sh parity train_paper             # only some sections
#   OUT=... GPU_SH_BUDGET=575 TRAIN_PAPER_LIMIT=565 bash bench/gpu.sh train_paper
#                      # our paper-scale step compiles in ~170 s on an H100 with Triton GEMM off (the section's
#                      # default XLA_FLAGS; over 290 s with it on, session 4): give it a whole call (section limits:
#                      # FID_LIMIT, TRAIN_PAPER_LIMIT, SAMPLE_PAPER_LIMIT, PARITY_LIMIT; the JAX worker gets 2/3 of
#                      # its section's limit)
#   OUT=... GPU_SH_BUDGET=575 TRAIN_VARIANTS="--attention cudnn --profile 2;--attention cudnn --no-remat" bash bench/gpu.sh train_variants
#                      # A/B of our step: no torch peer; each variant TRAIN_VARIANT_LIMIT (280) seconds
#   OUT=... GPU_SH_BUDGET=300 bash bench/gpu.sh train_best
#                      # (only when named) the best MFU measured so far (28.0% on an H100, 1.59x diffusers; session
#                      # 9): batch 96 (TRAIN_BEST_BATCH), no remat, both frameworks, our optimised HLO saved; ~230 s
#   OUT=... SAMPLE_PAPER_LIMIT=300 SAMPLE_ARGS="--frameworks ours --runs 5" SAMPLE_TAG=_a bash bench/gpu.sh sample_paper
#                      # extra sample.py arguments; SAMPLE_TAG names the JSON (sample_paper_a.json)
#   GPU_SH_DRY=1 bash bench/gpu.sh                           # the same logic on the CPU with tiny sizes
#
# Results: $OUT/RESULTS_gpu.md (sections to paste into bench/RESULTS.md), $OUT/*.json, $OUT/log.txt.
# Python packages: the GPU image's jax/torch/flax/optax; diffusers, ml_collections, pytorch-fid (and flax/optax if
# the image's cannot import our modules) come as wheels from .whl/ when that folder exists (see /work/.library/device/README.md).
# GPU_SH_BUDGET (seconds, default 390) is the total time; each section gets at most its own limit and what is left.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/latentdiff_gpu}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
DRY=${GPU_SH_DRY:-0}
BUDGET=${GPU_SH_BUDGET:-390}
START=$(date +%s)
export PYTHONUNBUFFERED=1 LATENTDIFF_NO_XLA_FLAGS=1
if [ "$DRY" = 1 ]; then
  PY=${PY:-.venv/bin/python}
  DEV=(--device cpu)
  PAPER=tiny
  RUNS=2
  STEPS=3
  FID_BATCH=4
  PAPER_GFLOPS=0  # 0: counted by the worker (then --model-gflops-batch is ignored)
  GPU_XLA_FLAGS=
else
  PY=${PY:-python3}
  DEV=(--device gpu)
  PAPER=paper
  RUNS=5
  STEPS=50
  FID_BATCH=128
  PAPER_GFLOPS=24300
  # cuBLAS dots: the train step compiles in ~170 s instead of > 290 s, the sampler in 40 s instead of 49 s at the
  # same speed (H100, sessions 5 and 7)
  GPU_XLA_FLAGS=--xla_gpu_enable_triton_gemm=false
fi
SECTIONS=${*:-env fid train_paper sample_paper parity train_tiny}

if [ "$DRY" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  base=$(ls .whl/*.whl | grep -v -E '/(flax|optax)-')
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $base \
    && export PYTHONPATH=/tmp/site
  if ! PYTHONPATH=${PYTHONPATH:-}:$PWD $PY -c "import latentdiff.nn.unet, optax" 2>>"$LOG"; then
    echo "image's flax/optax cannot import latentdiff.nn: installing the carried ones" | tee -a "$LOG"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      $(ls .whl/*.whl | grep -E '/(flax|optax)-')
  fi
fi
if ! $PY -c "import grain" 2>/dev/null; then
  # configs/*.py import latentdiff.data.pipeline, which needs grain only to load data: a stub is enough here.
  mkdir -p /tmp/stub/grain
  printf 'class transforms:\n    class Map: pass\n    class RandomMap: pass\n' >/tmp/stub/grain/__init__.py
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/stub
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD

# run NAME LIMIT CMD...: one section, capped by its limit and the budget left; output to the log and the console.
run() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START) - 5))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "=== $name skipped: ${left}s of the budget left" | tee -a "$LOG"
    return
  fi
  echo "=== $name (limit ${limit}s) $(date +%T)" | tee -a "$LOG"
  BENCH_WORKER_TIMEOUT=$((limit * ${WORKER_SHARE:-67} / 100)) timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG" | grep -v -E "Warning|warn\(|^\s*$" | tail -n 25
  echo "=== $name rc=${PIPESTATUS[0]} $(date +%T)" | tee -a "$LOG"
}

for section in $SECTIONS; do
  case $section in
  env)
    run env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null; \
      $PY - <<'PY'
import statistics, time
import jax, jax.numpy as jnp
from importlib import metadata
print({n: metadata.version(n) for n in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'diffusers')})
print(jax.devices())
n = 8192 if jax.default_backend() == 'gpu' else 1024
a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
f = jax.jit(jnp.dot)
f(a, b).block_until_ready()
ts = []
for _ in range(10):
    t0 = time.perf_counter(); f(a, b).block_until_ready(); ts.append(time.perf_counter() - t0)
print(f'bf16 matmul {n}^3: {2 * n**3 / statistics.median(ts) / 1e12:.1f} TFLOP/s (median of 10)')
PY"
    ;;
  parity)
    run parity ${PARITY_LIMIT:-90} $PY - "$OUT/parity.json" <<'PY'
"""cuDNN vs XLA attention in a tiny bf16 UNet: outputs and parameter gradients, each against a float32 reference."""
import json, os, sys
sys.path.insert(0, "bench")
import harness
import jax, jax.numpy as jnp, numpy as np
from latentdiff.nn.unet import build_unet, init_inputs

gpu = jax.default_backend() == "gpu"
base = harness.ldm_config("tiny").unet
def unet(dtype, impl):
    c = base.copy_and_resolve_references(); c.dtype = dtype; c.attention_impl = impl
    return build_unet(c)
inp = init_inputs(base, 4, 16, 32)
abstract = jax.eval_shape(lambda: unet("float32", "xla").init(jax.random.key(0), inp["x"], inp["t"], inp["context"], None, False))
params = jax.device_put(harness.random_like(abstract["params"], seed=0, scale=0.1))
rng = np.random.default_rng(1)
x = jnp.asarray(rng.standard_normal((4, 16, 16, 4)), jnp.float32)
t = jnp.asarray(rng.integers(0, 1000, (4,)), jnp.int32)
ctx = jnp.asarray(rng.standard_normal((4, 32, base.context_dim)), jnp.float32)
r = jnp.asarray(rng.standard_normal((4, 16, 16, 4)), jnp.float32)
def outputs(model):
    f = lambda p: jnp.sum(model.apply({"params": p}, x, t, ctx, None, False) * r)
    out = jax.jit(lambda p: model.apply({"params": p}, x, t, ctx, None, False))(params)
    g = jax.jit(jax.grad(f))(params)
    return np.asarray(out, np.float64), np.concatenate([np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(g)])
rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
ref_o, ref_g = outputs(unet("float32", "xla"))
xla_o, xla_g = outputs(unet("bfloat16", "xla"))
cud_o, cud_g = outputs(unet("bfloat16", "cudnn" if gpu else "xla"))
res = {"backend": jax.default_backend(), "cudnn_used": gpu,
       "out_rel_xla_bf16_vs_f32": rel(xla_o, ref_o), "out_rel_cudnn_bf16_vs_f32": rel(cud_o, ref_o),
       "out_rel_cudnn_vs_xla": rel(cud_o, xla_o),
       "grad_rel_xla_bf16_vs_f32": rel(xla_g, ref_g), "grad_rel_cudnn_bf16_vs_f32": rel(cud_g, ref_g),
       "grad_rel_cudnn_vs_xla": rel(cud_g, xla_g)}
res["close"] = bool(res["out_rel_cudnn_bf16_vs_f32"] <= max(2 * res["out_rel_xla_bf16_vs_f32"], 2e-2)
                    and res["grad_rel_cudnn_bf16_vs_f32"] <= max(2 * res["grad_rel_xla_bf16_vs_f32"], 2e-2)
                    and np.isfinite(cud_o).all() and np.isfinite(cud_g).all())
print(json.dumps(res, indent=1))
json.dump(res, open(sys.argv[1], "w"), indent=1)
PY
    ;;
  fid)
    run fid ${FID_LIMIT:-100} $PY bench/fid.py "${DEV[@]}" --batch_size $FID_BATCH --runs 5 \
      --results "$OUT/RESULTS_gpu.md" --json "$OUT/fid.json"
    ;;
  train_paper)
    XLA_FLAGS=${XLA_FLAGS:-$GPU_XLA_FLAGS} run train_paper ${TRAIN_PAPER_LIMIT:-330} $PY bench/train_step.py "${DEV[@]}" --size $PAPER --stage ldm \
      --runs $RUNS --attention "${TRAIN_ATTENTION:-cudnn}" --model-gflops $PAPER_GFLOPS --model-gflops-batch 32 \
      --results "$OUT/RESULTS_gpu.md" --json "$OUT/train_paper.json"
    ;;
  train_variants)
    # Our paper-scale step only, once per variant: TRAIN_VARIANTS is a ';'-separated list of extra train_step.py
    # arguments, e.g. "--attention cudnn --profile 2;--attention cudnn --no-remat --profile 2". Each variant gets
    # TRAIN_VARIANT_LIMIT seconds, its worker all but 10 of them.
    IFS=';' read -r -a variants <<<"${TRAIN_VARIANTS:---attention cudnn --profile 2}"
    i=0
    for variant in "${variants[@]}"; do
      i=$((i + 1))
      # shellcheck disable=SC2086  # the variant's words are separate arguments
      XLA_FLAGS=${XLA_FLAGS:-$GPU_XLA_FLAGS} WORKER_SHARE=$(((${TRAIN_VARIANT_LIMIT:-280} - 10) * 100 / ${TRAIN_VARIANT_LIMIT:-280})) \
        run "train_variant_$i [$variant]" ${TRAIN_VARIANT_LIMIT:-280} $PY bench/train_step.py "${DEV[@]}" --size $PAPER \
        --stage ldm --frameworks ours --runs $RUNS --model-gflops $PAPER_GFLOPS --model-gflops-batch 32 $variant \
        --results "$OUT/RESULTS_gpu.md" --json "$OUT/train_variant_$i.json"
    done
    ;;
  train_best)
    # The best-MFU configuration measured so far (session 9: batch 96, no remat, 28.0% on an H100), ours and
    # diffusers, with our compiled step's optimised HLO saved for offline study of its fusions and layouts.
    XLA_FLAGS=${XLA_FLAGS:-$GPU_XLA_FLAGS} run train_best ${TRAIN_BEST_LIMIT:-300} $PY bench/train_step.py "${DEV[@]}" --size $PAPER \
      --stage ldm --runs $RUNS --model-gflops $PAPER_GFLOPS --model-gflops-batch 32 --no-remat --batch ${TRAIN_BEST_BATCH:-96} \
      --hlo-out "$OUT/train_best.hlo.gz" --results "$OUT/RESULTS_gpu.md" --json "$OUT/train_best.json"
    ;;
  sample_paper)
    # shellcheck disable=SC2086  # SAMPLE_ARGS: extra bench/sample.py arguments (the last of a repeated option wins)
    XLA_FLAGS=${XLA_FLAGS:-$GPU_XLA_FLAGS} run sample_paper ${SAMPLE_PAPER_LIMIT:-240} $PY bench/sample.py "${DEV[@]}" --size $PAPER --batch 16 --steps $STEPS --runs 3 \
      ${SAMPLE_ARGS:-} --results "$OUT/RESULTS_gpu.md" --json "$OUT/sample_paper${SAMPLE_TAG:-}.json"
    ;;
  train_tiny)
    run train_tiny 80 $PY bench/train_step.py "${DEV[@]}" --size tiny --stage ldm --runs $RUNS \
      --results "$OUT/RESULTS_gpu.md" --json "$OUT/train_tiny.json"
    ;;
  *)
    echo "unknown section $section (env fid train_paper train_best train_variants sample_paper parity train_tiny)" | tee -a "$LOG"
    ;;
  esac
done
echo "total $(($(date +%s) - START)) s" | tee -a "$LOG"

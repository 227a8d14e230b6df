"""Shared pieces of the benchmarks in bench/: timing, machine facts, configs, diffusers peers, RESULTS.md sections.

Each benchmark runs every framework in its own subprocess (`run_worker`), so peak RSS and thread pools stay
separate; a worker prints one JSON line (prefixed WORKER_JSON) that the parent turns into a table.
Nothing here imports torch or diffusers at module level: a JAX worker never loads them, and vice versa.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "RESULTS.md")
JSON_PREFIX = "WORKER_JSON "
SIZES = ("tiny", "small")

# ---------------------------------------------------------------------------------------------------------------
# Timing and machine facts.


def load_average() -> float:
    """1-minute load average (the other tenants of this machine show up here)."""
    return round(os.getloadavg()[0], 2)


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_runs(fn: Callable[[], Any], runs: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `runs` calls of fn() after `warmup` calls; fn must block until its work is done."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(times: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a list of seconds."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line(device: str) -> str:
    """One line naming the machine the numbers came from."""
    if device == "gpu":
        try:
            gpu = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            gpu = "unknown GPU"
        return f"{gpu}; host {cpu_model()} × {os.cpu_count()} cores"
    return f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def versions() -> str:
    """Versions of the frameworks installed, without importing torch into a JAX process (importlib.metadata)."""
    from importlib import metadata

    out = []
    for name in ("jax", "jaxlib", "flax", "torch", "diffusers"):
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


# ---------------------------------------------------------------------------------------------------------------
# Subprocess workers.


def emit(result: dict) -> None:
    """Worker side: print the result as the JSON line the parent reads."""
    print(JSON_PREFIX + json.dumps(result), flush=True)


def run_worker(script: str, args: list[str], env: dict[str, str] | None = None, timeout: float = 3600) -> dict:
    """Runs `python script --worker ...args` and returns its JSON result ({'error': ...} if it failed).

    BENCH_WORKER_TIMEOUT (seconds) in the environment caps `timeout` (bench/gpu.sh uses it to fit a lease)."""
    timeout = min(timeout, float(os.environ.get("BENCH_WORKER_TIMEOUT", timeout)))
    cmd = [sys.executable, script, "--worker", *args]
    full_env = {**os.environ, **(env or {})}
    load_before = load_average()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "cmd": " ".join(cmd)}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(JSON_PREFIX):
            result = json.loads(line[len(JSON_PREFIX) :])
            result.setdefault("load_before", load_before)
            result["load_after"] = load_average()
            result["wall_s"] = round(time.perf_counter() - t0, 1)
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
    return {"error": f"worker exited {proc.returncode}: " + " | ".join(tail), "cmd": " ".join(cmd)}


def gpu_worker_env(mem_fraction: float) -> dict[str, str]:
    """Environment for a GPU worker: no latentdiff CPU XLA flags; JAX preallocates `mem_fraction` of GPU memory."""
    return {"LATENTDIFF_NO_XLA_FLAGS": "1", "XLA_PYTHON_CLIENT_MEM_FRACTION": str(mem_fraction)}


def limit_threads(threads: int) -> dict[str, str]:
    """Environment for a worker using `threads` CPU threads (OpenMP/MKL pools; XLA sizes its pool by cores)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


# ---------------------------------------------------------------------------------------------------------------
# Configs: the repo's tiny presets and a `small` (~50-100M params) variant that still fits a 2-core CPU.


def ldm_config(size: str) -> ml_collections.ConfigDict:
    """Stage-2 config: configs/ldm_txt2img_kl8.py:tiny, or `small` (UNet 96·(1,2,4) + text encoder 512×4, ~70M)."""
    from latentdiff.config_utils import load_config

    config = load_config(os.path.join(REPO, "configs", "ldm_txt2img_kl8.py") + ":tiny")
    if size == "small":
        config.batch_size = 8
        config.data.resolution = 128  # 16×16×4 latents
        config.unet.update(
            dict(model_channels=96, channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(4, 2), num_heads=8)
        )
        config.unet.context_dim = 512
        config.text_encoder.update(dict(width=512, depth=4, num_heads=8, head_dim=64, vocab_size=1024))
        config.tokenizer.vocab_size = 1024
    elif size != "tiny":
        raise ValueError(f"--size must be one of {SIZES}, got {size!r}")
    return config


def ae_config(size: str) -> ml_collections.ConfigDict:
    """Stage-1 config (configs/autoencoder_kl_f8.py:tiny, or `small`: ch 64·(1,2,4,4), 128 px, batch 4)."""
    from latentdiff.config_utils import load_config

    config = load_config(os.path.join(REPO, "configs", "autoencoder_kl_f8.py") + ":tiny")
    if size == "small":
        config.batch_size = 4
        config.data.resolution = 128
        config.autoencoder.update(dict(resolution=128, ch=64, ch_mult=(1, 2, 4, 4), num_res_blocks=2))
        config.discriminator.update(dict(ndf=64, n_layers=3))
    elif size != "tiny":
        raise ValueError(f"--size must be one of {SIZES}, got {size!r}")
    return config


def stage1_for(ldm: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The autoencoder block whose latents feed `ldm` (the tiny KL-f8 at the stage-2 resolution)."""
    ae = ae_config("tiny").autoencoder
    ae.resolution = ldm.data.resolution
    return ae


# ---------------------------------------------------------------------------------------------------------------
# JAX helpers.


FILL_BLOCK = 1 << 18  # random_like: values drawn per leaf at most


def random_like(abstract: Any, seed: int, scale: float = 0.02) -> Any:
    """Fills a pytree of ShapeDtypeStructs with small random floats (ints -> zeros) on the host, without compiling
    an init. Norm scales and running variances get 1 + noise so activations keep a sane range."""
    import jax

    rng = np.random.default_rng(seed)

    def fill(path: tuple, leaf: Any) -> np.ndarray:
        name = str(path[-1]) if path else ""
        if not np.issubdtype(leaf.dtype, np.floating):
            return np.zeros(leaf.shape, leaf.dtype)
        size = int(np.prod(leaf.shape))
        # Leaves over FILL_BLOCK values repeat one block of fresh draws: filling paper-scale models (1.4B parameters)
        # value by value took ~30 s of a GPU run's time limit, and a benchmark needs sane magnitudes, not independence.
        block = rng.standard_normal(min(size, FILL_BLOCK), dtype=np.float32) * scale
        values = np.resize(block, leaf.shape)
        if "scale" in name or name == "var":
            values += 1.0
        return values.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def xla_flops(compiled: Any) -> float:
    """FLOPs of a compiled XLA executable (or a lowered computation) from its cost analysis (0 if unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def matmul_peak_gflops(n: int = 2048, runs: int = 7) -> float:
    """Dense f32 matmul rate of this machine through jnp.dot (median of `runs` n×n×n products), GFLOP/s."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    times = time_runs(lambda: f(a, b).block_until_ready(), runs, warmup=2)
    return 2 * n**3 / statistics.median(times) / 1e9


def conv3x3(x: Any, kernel: Any) -> Any:
    """SAME 3x3 convolution, x [B, H, W, C], kernel [3, 3, C, K] -> [B, H, W, K] (lax, as flax's nn.Conv runs it)."""
    import jax

    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def count_params(tree: Any) -> int:
    import jax

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------------------------
# diffusers / PyTorch peers with the same architecture (the converters in latentdiff/convert/ define the mapping).


def diffusers_unet_kwargs(unet: ml_collections.ConfigDict, sample_size: int) -> dict:
    """UNet2DConditionModel kwargs equal to our UNet config (see latentdiff/convert/diffusers_unet.py)."""
    levels = len(unet.channel_mult)
    attn = [2**level in tuple(unet.attention_resolutions) for level in range(levels)]
    if unet.num_head_channels != -1:
        raise ValueError("the diffusers peer maps num_heads only (num_head_channels must be -1)")
    return dict(
        sample_size=sample_size,
        in_channels=unet.in_channels,
        out_channels=unet.out_channels,
        block_out_channels=tuple(unet.model_channels * m for m in unet.channel_mult),
        layers_per_block=unet.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=unet.context_dim,
        attention_head_dim=unet.num_heads,  # diffusers' legacy name: this is the number of heads
        transformer_layers_per_block=unet.transformer_depth,
        use_linear_projection=unet.use_linear_proj,
        norm_num_groups=32,
    )


def ldmbert_kwargs(text: ml_collections.ConfigDict) -> dict:
    """LDMBertConfig kwargs equal to our TextEncoder config, dropout off (ours has none)."""
    return dict(
        vocab_size=text.vocab_size,
        max_position_embeddings=text.max_length,
        encoder_layers=text.depth,
        encoder_ffn_dim=text.width * text.mlp_ratio,
        encoder_attention_heads=text.num_heads,
        head_dim=text.head_dim,
        d_model=text.width,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )


def torch_setup(threads: int, device: str) -> Any:
    """Imports torch with `threads` intra-op threads; returns the torch.device."""
    import torch

    torch.set_num_threads(threads)
    if device == "gpu":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda")
    return torch.device("cpu")


def torch_sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def torch_models(ldm: ml_collections.ConfigDict, device: Any, dtype: Any) -> tuple[Any, Any, Any]:
    """(unet, text encoder, autoencoder) in diffusers with the architecture of `ldm` and its stage 1."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    from latentdiff.convert.diffusers_vae import diffusers_config

    torch.manual_seed(0)
    latent = ldm.data.resolution // 8
    with device:  # built (and initialised) on the device: fast for paper-size models on a GPU
        unet = UNet2DConditionModel(**diffusers_unet_kwargs(ldm.unet, latent)).to(dtype=dtype)
        text = LDMBertModel(LDMBertConfig(**ldmbert_kwargs(ldm.text_encoder))).to(dtype=dtype)
        vae = AutoencoderKL(**diffusers_config(stage1_for(ldm))).to(dtype=dtype)
    return unet, text, vae


def torch_params(modules: Sequence[Any]) -> int:
    return int(sum(p.numel() for m in modules for p in m.parameters()))


def ddim_alphas(config: ml_collections.ConfigDict) -> np.ndarray:
    """ᾱ_t of the config's linear-in-√β schedule (float64 numpy)."""
    d = config.diffusion
    betas = np.linspace(d.linear_start**0.5, d.linear_end**0.5, d.timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


# ---------------------------------------------------------------------------------------------------------------
# Tables and RESULTS.md.


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """Markdown table of rows (dicts) with (key, header) columns; floats get 3 significant digits."""

    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


HEADER = """# Benchmarks: latentdiff (JAX/Flax) vs PyTorch/diffusers

Each section belongs to one script in bench/ and collects its runs, newest last. Every run names the exact command,
the machine, the versions and the 1-minute load average (this CPU is shared, so timings are medians of >= 5 runs and
ratios come from runs taken back to back). Ratios > 1 mean latentdiff is faster.
"""


def append_section(section: str, body: str, path: str = RESULTS) -> None:
    """Appends `body` at the end of the `## {section}` section of RESULTS.md (created, with the header, if missing)."""
    text = open(path).read() if os.path.exists(path) else HEADER
    marker = f"## {section}"
    lines = text.rstrip("\n").split("\n")
    if marker not in lines:
        lines += ["", marker]
        insert_at = len(lines)
    else:
        start = lines.index(marker)
        insert_at = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        while insert_at > start + 1 and not lines[insert_at - 1].strip():
            insert_at -= 1
    block = ["", *body.strip("\n").split("\n"), ""]
    lines[insert_at:insert_at] = block
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip("\n") + "\n")


def run_header(argv: Sequence[str], device: str) -> str:
    """The first lines of a RESULTS.md entry: date, command, machine, versions, flags."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    cmd = " ".join(["python", os.path.relpath(argv[0], REPO), *argv[1:]])
    flags = os.environ.get("XLA_FLAGS", "") or (
        "(none; LATENTDIFF_NO_XLA_FLAGS=1 keeps latentdiff's CPU defaults out)"
        if os.environ.get("LATENTDIFF_NO_XLA_FLAGS")
        else "(none set by the user; latentdiff adds its CPU defaults)"
    )
    return (
        f"### {stamp} — `{cmd}`\n"
        f"Machine: {machine_line(device)}. Versions: {versions()}. XLA_FLAGS: {flags}. Load average (1 min) at start: "
        f"{load_average()}."
    )


# ---------------------------------------------------------------------------------------------------------------
# Where a compiled step spends its time: XLA ops from a jax.profiler trace, summed by HLO instruction.


def _scope(op_name: str) -> str:
    """Where in the program an HLO instruction comes from, coarsely, from its JAX op_name metadata:
    'fwd UNet norm', 'bwd TextEncoder ff', 'fwd AutoencoderKL conv', 'outside the models' (loss, optimizer, EMA, RNG),
    'state I/O' (parameter copies)."""
    import re

    if not op_name:
        return "?"
    if op_name.startswith("state."):
        return "state I/O"
    path = [p for p in op_name.split("/") if not p.startswith(("jit(", "vmap(", "while", "body", "closed_call"))]
    m = re.fullmatch(r"(transpose\()?jvp\((\w+)\)\)?", path[0]) if path else None
    if m:
        direction, model = ("bwd" if m.group(1) else "fwd"), m.group(2)
    elif path and path[0][:1].isupper():  # a module applied outside autodiff (the frozen encoder)
        direction, model = "fwd", path[0].split(".")[0]
    else:
        return "outside the models"
    layers = [re.sub(r"_\d+$", "", c) for c in path[1:-1]]  # module path, block indices dropped; the last is the op
    for pattern, label in (
        (r"attn1", "self-attn"),
        (r"attn2", "cross-attn"),
        (r"attn|to_[qkvo]\w*", "attn"),
        (r"ff|geglu|mlp|fc\d", "ff"),
        (r"\w*emb\w*", "embedding"),
        (r"norm\w*|ln\w*", "norm"),  # GroupNorm / LayerNorm (+ SiLU)
        (r"conv\w*|skip\w*|nin_shortcut|op|downsample|upsample", "conv"),
    ):
        if any(re.fullmatch(pattern, c) for c in layers):
            return f"{direction} {model} {label}"
    return f"{direction} {model} other"


def _hlo_kinds(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """Optimised HLO text -> {instruction name: (kind, result shape, scope)}; kind is conv | dot | reduce | attention
    | copy/transpose | elementwise | the opcode, a fusion taking the kind of the heaviest op it calls; scope: _scope of
    the instruction's op_name metadata."""
    import re

    inst = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^()]*\)|\S+(?:\s*\{[^}]*\})?)\s+([\w\-]+)\(")
    comp_ops: dict[str, set[str]] = {}
    current = ""
    rows: dict[str, tuple[str, str, str]] = {}
    for line in hlo_text.splitlines():
        head = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and "=" not in line.split("{")[0]:
            current = head.group(1)
            comp_ops[current] = set()
            continue
        m = inst.match(line)
        if not m:
            continue
        name, shape, opcode = m.groups()
        comp_ops.setdefault(current, set()).add(opcode)
        if opcode == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            opcode = "custom-call:" + (target.group(1) if target else "?")
        called = re.search(r"calls=%?([\w.\-]+)", line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        rows[name] = (
            opcode,
            shape.split("{")[0],
            called.group(1) if called else "",
            op_name.group(1) if op_name else "",
        )

    def kind(opcode: str, ops: set[str]) -> str:
        if "convolution" in ops or opcode == "convolution" or "$conv" in opcode:
            return "conv"
        if "dot" in ops or opcode == "dot" or "gemm" in opcode or "matmul" in opcode:
            return "dot"
        if "cudnn" in opcode and ("fmha" in opcode or "attention" in opcode):
            return "attention"
        if "reduce" in ops or opcode in ("reduce", "reduce-window"):
            return "reduce"
        if opcode in ("copy", "transpose") or (ops <= {"copy", "transpose", "parameter", "bitcast"} and ops):
            return "copy/transpose"
        if opcode == "fusion" or ops:
            return "elementwise"
        return opcode

    return {n: (kind(op, comp_ops.get(c, set())), shape, _scope(on)) for n, (op, shape, c, on) in rows.items()}


def _kind_from_name(op: str) -> str:
    """Kind of an op missing from the HLO text (GPU thunk names), from its name."""
    table = (
        ("conv", "conv"),
        ("dot_product_attention", "attention"),
        ("fmha", "attention"),
        ("gemm", "dot"),
        ("cublas", "dot"),
        ("triton", "dot"),
        ("reduce", "reduce"),
        ("transpose", "copy/transpose"),
        ("copy", "copy/transpose"),
        ("fusion", "elementwise"),
    )
    return next((kind for key, kind in table if key in op), "?")


def op_profile(run_step: Callable[[], Any], hlo_text: str, steps: int, top: int = 25) -> dict:
    """Trace `steps` calls of run_step (blocking) with jax.profiler and sum the time of each XLA op by HLO
    instruction (GPU: device kernels; CPU: thunks, summed over threads). Returns totals per kind and the top ops."""
    import glob
    import tempfile

    import jax
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            t0 = time.perf_counter()
            for _ in range(steps):
                run_step()
            wall = time.perf_counter() - t0
        path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
        data = ProfileData.from_file(path)
    planes = [p for p in data.planes if p.name.startswith("/device:GPU")] or [
        p for p in data.planes if p.name.startswith("/host:CPU")
    ]
    per_op: dict[str, float] = {}
    for plane in planes[:1]:  # one device
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                op = stats.get("hlo_op")
                if op:
                    per_op[str(op)] = per_op.get(str(op), 0.0) + event.duration_ns / 1e6 / steps
    hlo = _hlo_kinds(hlo_text)
    known = ("conv", "dot", "attention", "reduce", "copy/transpose", "elementwise")

    def kind_shape_scope(op: str) -> tuple[str, str, str]:
        # GPU custom calls (cuDNN convolutions, cuBLAS, cuDNN attention) may parse to an opcode that is not a kind,
        # and thunks can be missing from the HLO text: their names say what they are.
        kind, shape, scope = hlo.get(op, ("", "", "?"))
        return (kind if kind in known else _kind_from_name(op), shape, scope)

    kinds = {op: kind_shape_scope(op) for op in per_op}
    per_kind: dict[str, float] = {}
    per_scope: dict[str, float] = {}
    for op, ms in per_op.items():
        per_kind[kinds[op][0]] = per_kind.get(kinds[op][0], 0.0) + ms
        per_scope[kinds[op][2]] = per_scope.get(kinds[op][2], 0.0) + ms
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])
    return {
        "device": "gpu" if planes and planes[0].name.startswith("/device:GPU") else "cpu",
        "all_ops": {op: [*kinds[op], ms] for op, ms in ranked},
        "wall_ms_per_step": wall * 1e3 / steps,
        "op_ms_per_step": sum(per_op.values()) or 1.0,
        "per_kind_ms": dict(sorted(per_kind.items(), key=lambda kv: -kv[1])),
        "per_scope_ms": dict(sorted(per_scope.items(), key=lambda kv: -kv[1])),
        "top_ops": [{"op": op, "kind": kinds[op][0], "shape": kinds[op][1], "ms": ms} for op, ms in ranked[:top]],
    }


_TORCH_KINDS = (  # (kind, substrings of an aten op name), first match wins
    ("conv", ("conv",)),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax")),
    ("dot", ("addmm", "::mm", "bmm", "baddbmm", "matmul", "linear")),
    ("norm", ("group_norm", "layer_norm", "batch_norm")),
    ("optimizer", ("_foreach", "adam", "clip_grad", "_fused_")),
    ("copy/transpose", ("copy_", "contiguous", "clone", "permute", "transpose", "cat", "to_copy")),
)


def _torch_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in _TORCH_KINDS if any(k in low for k in keys)), "elementwise/other")


def torch_op_profile(run_step: Callable[[], Any], steps: int, top: int = 25) -> dict:
    """Trace `steps` calls of run_step (blocking) with torch.profiler and sum each aten op's self CPU time (on the
    CPU every op runs synchronously on the calling thread, so the sum is close to wall time). Same keys as
    op_profile; per_scope_ms is empty (eager ops carry no module scope)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            run_step()
        wall = time.perf_counter() - t0
    per_op = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages() if e.self_cpu_time_total > 0}
    kinds = {op: _torch_kind(op) for op in per_op}
    per_kind: dict[str, float] = {}
    for op, ms in per_op.items():
        per_kind[kinds[op]] = per_kind.get(kinds[op], 0.0) + ms
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])
    return {
        "device": "torch-cpu",
        "all_ops": {op: [kinds[op], "", "", ms] for op, ms in ranked},
        "wall_ms_per_step": wall * 1e3 / steps,
        "op_ms_per_step": sum(per_op.values()) or 1.0,
        "per_kind_ms": dict(sorted(per_kind.items(), key=lambda kv: -kv[1])),
        "per_scope_ms": {},
        "top_ops": [{"op": op, "kind": kinds[op], "shape": "", "ms": ms} for op, ms in ranked[:top]],
    }


def op_profile_text(profile: dict) -> str:
    """A compact text table of op_profile's result."""
    total = profile["op_ms_per_step"]
    traced = (
        "aten op self CPU time" if profile.get("device") == "torch-cpu" else "XLA op time (summed over threads/streams)"
    )
    lines = [
        f"step wall {profile['wall_ms_per_step']:.1f} ms; {traced} {total:.1f} ms per step",
        "by kind: " + ", ".join(f"{k} {ms:.1f} ms ({ms / total:.0%})" for k, ms in profile["per_kind_ms"].items()),
    ]
    if profile["per_scope_ms"]:
        lines.append(
            "by scope: "
            + ", ".join(f"{k} {ms:.1f} ms ({ms / total:.0%})" for k, ms in list(profile["per_scope_ms"].items())[:14])
        )
    if profile.get("device") == "cpu":
        lines.append(
            "(CPU: the trace misses the work XLA hands to Eigen's thread pool, convolutions above all — traced op "
            "time stays well below wall time × threads — so convolutions are undercounted here)"
        )
    for row in profile["top_ops"]:
        lines.append(f"  {row['ms']:8.2f} ms  {row['kind']:<14} {row['op']:<40} {row['shape']}")
    return "\n".join(lines)

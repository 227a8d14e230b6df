"""The TPU pre-flight: training's and sampling's programs compiled by the real TPU compiler (libtpu, test extra) for
a Cloud TPU topology on this CPU, with the shardings training uses; fit verdicts, exit codes, one-line errors; the
jaxpr FLOP counter against closed forms."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import pytest

from latentdiff import parallel
from latentdiff.config_utils import load_config
from latentdiff.tools import flop_count
from latentdiff.tools.preflight import cli as preflight_cli
from latentdiff.tools.preflight import programs as preflight_programs
from latentdiff.tools.preflight import report as preflight_report
from latentdiff.tools.preflight import topology as preflight_topology
from latentdiff.tools.preflight.programs import AE_PROGRAMS, LDM_PROGRAMS
from latentdiff.tools.preflight.report import ProgramReport
from latentdiff.tools.tpu_chips import chip_for_topology
from latentdiff.train import loop

TOPOLOGY = "v5e:2x2"  # 4 chips on one host
MESH = {"data": 2, "fsdp": 2}


def micro_autoencoder():
    """autoencoder_kl_f8:tiny shrunk to two levels at 16 px: the TPU compiler takes seconds, not minutes."""
    config = load_config("configs/autoencoder_kl_f8.py:tiny")
    config.autoencoder.ch_mult = (1, 2)
    config.autoencoder.resolution = config.data.resolution = 16
    config.discriminator.n_layers = 1
    config.sharding.fsdp_min_size = 1024  # its params are small: shard them anyway, to see the split in the program
    return config


def tpu_mesh():
    devices, chip = preflight_topology.topology_devices(TOPOLOGY, "")
    return devices, chip, parallel.make_mesh(MESH, devices)


def assert_state_sharded_as_training(report, config, init_state, mesh, sharded_prefix):
    """The compiled executable's state input shardings are training's (loop.state_shardings), on the TPU chips, and
    at least one parameter under `sharded_prefix` is really split over the fsdp axis."""
    compiled_state = report.compiled.input_shardings[0][0]
    abstract, expected = loop.state_shardings(config, init_state, mesh, jax.eval_shape(lambda: jax.random.key(0)))
    got_leaves = jax.tree.leaves(compiled_state)
    want_leaves = jax.tree.leaves(expected)
    shapes = [leaf.shape for leaf in jax.tree.leaves(abstract)]
    assert len(got_leaves) == len(want_leaves) == len(shapes)
    for got, want, shape in zip(got_leaves, want_leaves, shapes, strict=True):
        assert got.is_equivalent_to(want, len(shape)), (got, want, shape)
    tpu_ids = {d.id for d in mesh.devices.flat}
    shapes_by_name = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    split = [
        (jax.tree_util.keystr(path), sharding)
        for path, sharding in jax.tree_util.tree_flatten_with_path(compiled_state)[0]
        if sharded_prefix in jax.tree_util.keystr(path) and "fsdp" in str(sharding.spec)
    ]
    assert split, f"no parameter under {sharded_prefix!r} is sharded over fsdp"
    for name, sharding in split:
        shape = shapes_by_name[name]
        assert sharding.shard_shape(shape) != shape  # really split, not replicated
        assert {d.id for d in sharding.device_set} == tpu_ids
        assert {d.platform for d in sharding.device_set} == {"tpu"}


# ----------------------------------------------------------------------------------------------------------------
# Compiled for TPU (libtpu from the test extras)


@pytest.mark.slow
@pytest.mark.extended
def test_stage2_train_step_and_sampler_compile_for_tpu_with_pallas_attention():
    devices, chip, mesh = tpu_mesh()
    config = load_config("configs/ldm_txt2img_kl8.py:tiny")
    config.data.resolution = 16  # 8x8x4 latents of the micro first stage (f=2)
    config.unet.attention_impl = "pallas_tpu"
    sample_mesh = parallel.make_mesh({"data": len(devices)}, devices)
    programs = preflight_programs.ldm_programs(config, micro_autoencoder(), mesh, sample_mesh, 8, 4, 3, LDM_PROGRAMS)
    reports = [preflight_report.compile_program(p, chip.hbm_bytes) for p in programs]
    train, sample = reports
    assert train.fits and sample.fits and train.peak < chip.hbm_bytes
    assert train.temporaries > 0 and train.aliased > 0  # the state is donated, as in training
    assert train.model_flops > 0 and train.flops > 0
    assert train.loop_factor > 1.0  # the text encoder's blocks are a scan: XLA counts its body once
    assert sample.loop_factor > train.loop_factor  # and three denoising steps in another
    from latentdiff.train import ldm  # the task training builds, for its init_state

    first_stage = preflight_programs.abstract_first_stage(micro_autoencoder())
    init_state = ldm.LDMTask(
        config, first_stage, jnp.zeros((config.text_encoder.max_length,), jnp.int32), 1.0
    ).init_state
    assert_state_sharded_as_training(train, config, init_state, mesh, "unet")
    # the sampler: EMA params replicated, the noise batch split over all four chips
    x_t_sharding = sample.compiled.input_shardings[0][7]
    assert x_t_sharding.shard_shape((4, 8, 8, 4))[0] == 1
    text = preflight_report.format_report(train, chip, len(devices))
    assert "FITS" in text and "roofline on TPU v5e" in text


def test_stage2_train_batch_is_what_training_reads_images_or_precomputed_latents():
    """The train program's batch field is the one LDMTask reads z0 from: images encoded in the step, or with
    first_stage.latents (as `latentdiff encode` writes them) KL moments [h, w, 2c]; the frozen encoder then
    leaves the step, and its FLOPs with it."""
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    flops = {}
    for latents, field, shape in (("", "image", (4, 16, 16, 3)), ("/data/latents", "moments", (4, 8, 8, 8))):
        config = load_config("configs/ldm_txt2img_kl8.py:tiny")
        config.data.resolution = 16
        config.first_stage.latents = latents
        (program,) = preflight_programs.ldm_programs(config, micro_autoencoder(), mesh, mesh, 4, 4, 3, ("train",))
        batch = program.args[1]
        assert set(batch) == {field, "tokens"}
        assert batch[field].shape == shape and batch[field].dtype == jnp.float32
        flops[field] = program.model_flops_fn()
    assert flops["moments"] < flops["image"]  # no encoder in the step


@pytest.mark.slow
@pytest.mark.extended
def test_stage1_rec_and_gan_steps_compile_for_tpu():
    _, chip, mesh = tpu_mesh()
    config = micro_autoencoder()
    programs = preflight_programs.ae_programs(config, mesh, 4, AE_PROGRAMS)
    reports = [preflight_report.compile_program(p, chip.hbm_bytes) for p in programs]
    assert [r.name for r in reports] == ["ae_rec", "ae_gan"]
    rec, gan = reports
    assert rec.fits and gan.fits
    assert gan.model_flops > rec.model_flops > 0  # the GAN step adds the discriminator's passes
    from latentdiff.train.autoencoder import AutoencoderTask

    assert_state_sharded_as_training(gan, config, AutoencoderTask(config).init_state, mesh, "gen_params")


def test_paper_unet_on_one_v5e_chip_does_not_fit_exit_1(capsys):
    argv = [
        "--config", "configs/ldm_txt2img_kl8.py:paper",
        "--first_stage_config", "configs/autoencoder_kl_f8.py:paper",
        "--topology", "v5e:1x1", "--mesh", "data=1", "--global_batch", "256", "--programs", "train",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        preflight_cli.main(argv)
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "verdict: DOES NOT FIT" in out


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before anything compiles


TINY = ["--config", "configs/ldm_txt2img_kl8.py:tiny", "--first_stage_config", "configs/autoencoder_kl_f8.py:tiny"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--topology", "v9x:2x2", "--mesh", "data=4", "--global_batch", "8"], "unknown TPU type 'v9x'"),
        (["--topology", "v5e:3x5", "--mesh", "data=15", "--global_batch", "15"], "libtpu cannot build topology"),
        (["--topology", TOPOLOGY, "--mesh", "data=2,fsdp=4", "--global_batch", "8"], "has 8 devices but v5e:2x2"),
        (["--topology", TOPOLOGY, "--mesh", "data=2,fsdp=2", "--global_batch", "6"], "multiple of the 4 batch"),
        (["--topology", TOPOLOGY, "--mesh", "data=4", "--global_batch", "8", "--hbm_gib", "nan"], "--hbm_gib"),
        (["--topology", TOPOLOGY, "--mesh", "data=4", "--global_batch", "8", "--programs", "ae_gan"], "not programs"),
        (["--topology", TOPOLOGY, "--mesh", "data=4", "--global_batch", "8", "--json", "/no/dir/x.json"], "--json"),
    ],
)
def test_bad_input_is_one_line_exit_2(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        preflight_cli.main([*TINY, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_missing_libtpu_names_the_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        preflight_topology.importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
    )
    with pytest.raises(SystemExit) as exit_info:
        preflight_cli.main([*TINY, "--topology", TOPOLOGY, "--mesh", "data=4", "--global_batch", "8"])
    assert exit_info.value.code == 2
    assert 'pip install "jax[tpu]' in capsys.readouterr().err


def test_v4_devices_are_megacore_chips_as_on_a_v4_vm():
    """JAX on a v4-8 VM sees 4 devices (megacore: both TensorCores of a chip as one device); libtpu's compile-only
    topology shows 8 single-core devices unless asked for the megacore chip config."""
    devices, chip = preflight_topology.topology_devices("v4:2x2x1", "")
    assert len(devices) == 4 and {d.num_cores for d in devices} == {2}
    assert chip.hbm_gib == 32.0 and chip.bf16_tflops == 275.0


# ----------------------------------------------------------------------------------------------------------------
# Pure parts


def test_find_max_batch_bisects_to_the_largest_fitting_multiple():
    def fake_compile(capacity_rows):
        def compile_at(batch):
            report = ProgramReport("train", batch, {}, batch * 10, 0, 0, 0, 0.0, 0.0, 0.0, 1.0, 0.0, capacity_rows * 10)
            calls.append(batch)
            return [report]

        return compile_at

    for start, capacity, want, most in [(8, 100, 100, 4), (64, 37, 36, 4), (4, 3, 0, 1), (8, 5000, 1024, 3),
                                        (16, 16, 16, 3), (4, 1000, 1000, 4)]:  # fmt: skip
        calls = []
        batch, reports = preflight_report.find_max_batch(fake_compile(capacity), start, 4, 1024)
        assert batch == want, (start, capacity, batch)
        assert len(set(calls)) == len(calls) <= most, calls  # nothing compiled twice; few compiles
        if want:
            assert reports[0].batch == want and reports[0].fits

    # memory that is not linear in the batch: the line only guides the probes, the answer is still exact
    def quadratic(batch):
        calls.append(batch)
        return [ProgramReport("train", batch, {}, batch * batch, 0, 0, 0, 0.0, 0.0, 0.0, 1.0, 0.0, 1000)]

    calls = []
    assert preflight_report.find_max_batch(quadratic, 4, 4, 1024)[0] == 28  # 28² = 784 <= 1000 < 32²


def test_flop_count_matches_closed_forms():
    def scanned(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=10)[0]

    x = jax.ShapeDtypeStruct((32, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    assert flop_count.model_flops(scanned, x, w) == (10 * 2 * 32 * 64 * 64, 2 * 32 * 64 * 64)

    def conv(img, k):
        return jax.lax.conv_general_dilated(img, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    img = jax.ShapeDtypeStruct((2, 8, 8, 16), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 16, 32), jnp.float32)
    one = 2 * (2 * 8 * 8 * 32) * (3 * 3 * 16)
    assert flop_count.model_flops(conv, img, k)[0] == one
    # forward + weight gradient (no input gradient), the forward under remat counted once in the jaxpr
    grad = jax.grad(lambda k, img: jnp.sum(jax.checkpoint(conv)(img, k) ** 2))
    assert flop_count.model_flops(grad, k, img)[0] == 2 * one

    # a stride-2 convolution: forward, weight and input gradients each cost the forward's MACs (within the border)
    def strided(img, k):
        return jax.lax.conv_general_dilated(img, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    forward = 2 * (2 * 4 * 4 * 32) * (3 * 3 * 16)
    both = jax.grad(lambda img, k: jnp.sum(strided(img, k) ** 2), argnums=(0, 1))
    assert flop_count.model_flops(strided, img, k)[0] == forward
    assert flop_count.model_flops(both, img, k)[0] == pytest.approx(3 * forward, rel=0.05)


def test_report_json_record(tmp_path):
    report = ProgramReport("train", 8, {"params": 10}, 100, 50, 50, 30, 4e9, 1e9, 2e9, 1.0, 1.5, 1000)
    record = preflight_report.report_record(report, chip_for_topology("v5p:2x2x1"))
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record))
    loaded = json.loads(path.read_text())
    assert loaded["peak"] == 130 and loaded["fits"] is True and loaded["was_compiled"] is False


def test_the_compilers_out_of_hbm_error_is_a_does_not_fit_verdict():
    """libtpu refuses a program over the HBM it may use (v4: 30.75 of 32 GiB, batch 225 per chip of the paper step);
    that is a 'does not fit' report with the excess as the margin (exit 1, and --find_max_batch goes on), while any
    other compile error still raises."""
    message = (
        "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of memory in memory "
        "space hbm. Used 30.97G of 30.75G hbm. Exceeded hbm capacity by 227.67M."
    )
    assert preflight_report.compiler_hbm_excess(message) == int(227.67 * 2**20)
    assert preflight_report.compiler_hbm_excess("RESOURCE_EXHAUSTED: out of host memory") is None
    assert preflight_report.compiler_hbm_excess("INVALID_ARGUMENT: hbm") is None

    class Refused:
        def __init__(self, error):
            self.error = error

        def lower(self, *args):
            return self

        def compile(self):
            raise self.error

    capacity = 32 * 2**30
    program = preflight_programs.Program("train", 900, Refused(RuntimeError(message)), (), {"params": 1}, None)
    report = preflight_report.compile_program(program, capacity)
    assert not report.fits and report.peak - report.capacity == int(227.67 * 2**20)
    text = preflight_report.format_report(report, chip_for_topology("v4:2x2x1"), 4)
    assert "refused by the compiler" in text and "DOES NOT FIT: the TPU compiler ran out of HBM, over by 0.22" in text
    assert preflight_report.report_record(report, None)["fits"] is False
    other = preflight_programs.Program("train", 900, Refused(RuntimeError("INTERNAL: boom")), (), {}, None)
    with pytest.raises(RuntimeError, match="boom"):
        preflight_report.compile_program(other, capacity)

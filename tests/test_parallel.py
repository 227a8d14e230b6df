"""Mesh construction and sharding inference (8 fake CPU devices from conftest)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from latentdiff import parallel


def test_mesh_shape_resolves_rest_and_checks_product():
    assert parallel.mesh_shape({"data": -1, "fsdp": 2}, 8) == {"data": 4, "fsdp": 2}
    assert parallel.mesh_shape({"data": 2, "fsdp": -1}, 8) == {"data": 2, "fsdp": 4}
    with pytest.raises(ValueError, match="needs 6 devices"):
        parallel.mesh_shape({"data": 3, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="at most one axis"):
        parallel.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        parallel.mesh_shape({"model": 8}, 8)


def test_make_mesh_uses_all_devices():
    mesh = parallel.make_mesh({"data": 2, "fsdp": -1})
    assert mesh.axis_names == ("data", "fsdp")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_fsdp_spec_largest_divisible_dimension():
    assert parallel.fsdp_spec((3, 3, 64, 128), 8, 0) == P(None, None, None, "fsdp")
    assert parallel.fsdp_spec((3, 3, 6, 5), 8, 0) == P()  # nothing divisible: replicated
    assert parallel.fsdp_spec((1024,), 8, 4096) == P()  # small: replicated
    assert parallel.fsdp_spec((24, 16), 8, 0) == P("fsdp", None)
    assert parallel.fsdp_spec((24, 16), 1, 0) == P()


def test_infer_shardings_rules_before_fsdp():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    abstract = {
        "dense": {"kernel": jax.ShapeDtypeStruct((64, 32), jnp.float32)},
        "emb": {"embedding": jax.ShapeDtypeStruct((100, 8), jnp.float32)},
    }
    shardings = parallel.infer_shardings(abstract, mesh, [("emb/.*", (None, "fsdp"))], fsdp_min_size=0)
    assert shardings["dense"]["kernel"].spec == P("fsdp", None)
    assert shardings["emb"]["embedding"].spec == P(None, "fsdp")


def test_create_sharded_and_host_to_global():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})

    def init(rng):
        return {"w": jax.random.normal(rng, (16, 8))}

    state, _ = parallel.create_sharded(init, mesh, (), 0, jax.random.key(0))
    assert state["w"].sharding.spec == P("fsdp", None)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(init(jax.random.key(0))["w"]))
    batch = parallel.host_to_global({"image": np.arange(16.0).reshape(16, 1), "caption": np.array(["a"] * 16)}, mesh)
    assert set(batch) == {"image"}  # strings stay on the host
    assert batch["image"].sharding.spec == P(("data", "fsdp"))
    with pytest.raises(ValueError, match="not divisible"):
        parallel.global_batch_size_ok(12, mesh)


# ------------------------------------------------------------------------------------------ multi-host set-up


def test_init_distributed_rejects_a_half_given_setup(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="process_id"):
        parallel.init_distributed("127.0.0.1:1234", 2, -1, timeout_s=60)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    with pytest.raises(ValueError, match="num_processes"):
        parallel.init_distributed("", 0, -1, timeout_s=60)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    parallel.init_distributed("", 0, -1, timeout_s=60)  # nothing given, not on a pod or SLURM: single process, no-op
    assert jax.process_count() == 1


# ------------------------------------------------------------------------------------------ gradient accumulation


def test_micro_batches_are_strided_so_each_stays_evenly_sharded():
    from latentdiff.train.step_parts import split_micro_batches

    x = np.arange(16)
    micro = np.asarray(split_micro_batches({"x": jnp.asarray(x)}, 2)["x"])
    np.testing.assert_array_equal(micro, [x[0::2], x[1::2]])
    # Rows of device d's contiguous block (8 devices, 2 rows each) go one to each micro-batch.
    assert all({int(micro[0, d]) // 2, int(micro[1, d]) // 2} == {d} for d in range(8))
    with pytest.raises(ValueError, match="does not split"):
        split_micro_batches({"x": jnp.zeros((6,))}, 4)


def test_accumulated_gradient_equals_the_full_batch_gradient_on_a_mesh():
    """Least squares: the mean of micro-batch gradients is the closed-form full-batch gradient X^T(Xw - y)/n."""
    from latentdiff.train.step_parts import accumulate_gradients

    rng = np.random.default_rng(0)
    x, y, w = rng.normal(size=(32, 5)), rng.normal(size=(32,)), rng.normal(size=(5,))

    def grad_fn(params, batch, key):
        del key
        loss_fn = lambda p: 0.5 * jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        return grads, {"loss": loss}

    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    batch = parallel.host_to_global({"x": x.astype(np.float32), "y": y.astype(np.float32)}, mesh)
    params = {"w": jnp.asarray(w, jnp.float32)}
    step = jax.jit(lambda p, b, k: accumulate_gradients(grad_fn, p, b, k, 4))
    grads, metrics = step(params, batch, jax.random.key(0))
    np.testing.assert_allclose(grads["w"], x.T @ (x @ w - y) / 32, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], 0.5 * np.mean((x @ w - y) ** 2), rtol=1e-5)


# ------------------------------------------------------------------------------------------ logging arithmetic


def test_throughput_scalars():
    from latentdiff.train.loop import throughput_scalars

    out = throughput_scalars(10, 5.0, 64, 2e12, 8, 100.0)  # 2 TFLOP per device per step, 2 steps/s
    assert out["step_time_s"] == 0.5 and out["images_per_sec"] == 128.0
    assert out["tflops_per_sec"] == pytest.approx(32.0)  # 4 TFLOP/s per device x 8 devices
    assert out["mfu"] == pytest.approx(0.04)
    assert "mfu" not in throughput_scalars(10, 5.0, 64, 2e12, 8, 0.0)


# ------------------------------------------------------------------------------------------ per-process data positions


def test_each_process_gets_its_own_data_position_back(tmp_path):
    """Two processes read different shards; a checkpoint keeps both positions and gives each process its own. (Grain's
    state names the shard: process 0's position is refused by process 1's iterator.)"""
    from latentdiff import checkpoint
    from latentdiff.data import input_pipeline
    from latentdiff.data.errors import DataError

    cfg = input_pipeline.default_data_config()
    cfg.data_dir, cfg.resolution = str(tmp_path / "tfds"), 8
    cfg.shapes_num_train, cfg.shapes_num_validation, cfg.shapes_num_novel = 64, 8, 8

    def make(process_index):
        return input_pipeline.make_dataset(
            cfg,
            split="train",
            tokenizer=None,
            global_batch_size=8,
            process_index=process_index,
            process_count=2,
            seed=0,
            train=True,
        )

    iterators = [make(0), make(1)]
    for it in iterators:
        for _ in range(3):
            next(it)
    saved = checkpoint.pack_data_states([it.get_state() for it in iterators])
    expected = [next(it)["image"] for it in iterators]
    for p in range(2):
        resumed = make(p)
        resumed.set_state(checkpoint.unpack_data_state(saved, p, 2))
        np.testing.assert_array_equal(next(resumed)["image"], expected[p])
    with pytest.raises(DataError, match="does not match"):
        make(1).set_state(saved["processes"][0])
    assert checkpoint.unpack_data_state(saved, 0, 4) is None  # another process count: fresh iterators (warned)
    assert checkpoint.unpack_data_state({}, 0, 1) is None

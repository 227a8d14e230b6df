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

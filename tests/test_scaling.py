"""Chapter 8: the data-parallel helpers (a one-axis mesh, replicated state, a batch split over devices)."""
import textwrap

import jax
import numpy as np
import pytest

from hitlib.scaling import batch_sharded, check_batch_divides, data_mesh, replicate, replicated, shard_batch
from helpers import run_python


def test_one_device_mesh_round_trips_a_batch():
    mesh = data_mesh(jax.devices()[:1])
    batch = np.arange(24, dtype=np.float32).reshape(4, 6)
    sharded = shard_batch(mesh, {"images": batch})
    np.testing.assert_array_equal(np.asarray(sharded["images"]), batch)
    assert sharded["images"].sharding == batch_sharded(mesh)
    assert replicate(mesh, np.ones(3)).sharding == replicated(mesh)


def test_batch_that_does_not_divide_is_refused_naming_the_field():
    class FakeMesh:  # only .size is read
        size = 8
    with pytest.raises(ValueError, match=r"batch_size=12 must be divisible by the number of devices \(8\)"):
        check_batch_divides(12, FakeMesh())
    check_batch_divides(16, FakeMesh())


EIGHT = textwrap.dedent("""
    import jax, numpy as np
    from hitlib.scaling import data_mesh, shard_batch, replicate
    assert jax.device_count() == 8
    mesh = data_mesh()
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    s = shard_batch(mesh, x)
    assert sorted({shard.data.shape for shard in s.addressable_shards}) == [(2, 3)]
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda w, x: x * w)(replicate(mesh, np.float32(2)), s)), 2 * x)
    print("eight ok")
""")


def test_batch_splits_over_eight_host_devices():
    result = run_python(["-c", EIGHT], devices=8)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eight ok" in result.stdout

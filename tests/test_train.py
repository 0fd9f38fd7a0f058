"""Chapter 11c: the training loop — config validation, resume after SIGKILL bit for bit, damaged checkpoints, NaN stop,
data-parallel training on four forced CPU devices."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from hitlib import train

ROOT = Path(__file__).resolve().parent.parent

# A very small run: the tiny preset narrowed, batch 4, an 8-channel discriminator; checkpoints every 4 steps.
SMALL = train.TrainConfig(generator="tiny", generator_overrides=("widths=32,16,8", "latent_dim=16"), batch_size=4,
                          steps=12, d_max_channels=8, checkpoint_every=4, keep_checkpoints=2, sample_every=1000,
                          log_every=4, num_samples=4)


def leaves(state):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state)]


def assert_same_state(a, b):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)  # bit for bit


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    "SMALL trained without interruption: (workdir, final TrainState)."
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, train.train(SMALL, workdir, progress=False)


# ---------------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("field, value", [
    ("batch_size", 0), ("steps", -1), ("steps", 2.5), ("g_lr", 0.0), ("d_lr", float("nan")), ("adam_b1", 1.0),
    ("adam_b2", -0.1), ("loss", "wasserstein"), ("r1_gamma", -1.0), ("bcr_weight", True), ("ema_decay", 1.5),
    ("ema_start", -1), ("d_max_channels", 0), ("flip", "yes"), ("seed", -3), ("checkpoint_every", 0),
    ("bcr_policy", "color,rotate"), ("generator", "tiny-ish"), ("generator_overrides", ("widths=30,16,8",)),
    ("generator_overrides", "latent_dim=8"), ("data", ""),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        train.TrainConfig(**{field: value})


def test_config_round_trips_through_json():
    config = train.train_config("tiny", ["steps=7", "g_lr=3e-4", "flip=true", "latent_dim=32", "data=none"])
    assert (config.steps, config.g_lr, config.flip, config.data) == (7, 3e-4, True, None)
    assert config.generator_overrides == ("latent_dim=32",) and config.generator_config.latent_dim == 32
    assert train.TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        train.TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="unknown override key 'widht'"):
        train.train_config("tiny", ["widht=3"])
    with pytest.raises(ValueError, match="steps"):
        train.train_config("tiny", ["steps=many"])


def test_changed_config_is_refused(tmp_path):
    train.prepare_workdir(SMALL, tmp_path)
    train.prepare_workdir(dataclasses.replace(SMALL, steps=100, log_every=7), tmp_path)  # may change on resume
    with pytest.raises(ValueError, match=r"batch_size: saved 4, requested 8.*d_lr: saved 0.0001, requested 0.001"):
        train.prepare_workdir(dataclasses.replace(SMALL, batch_size=8, d_lr=1e-3), tmp_path)


def test_ema_is_a_copy_until_the_start_step_then_an_average():
    ema, params = {"w": np.float32(0.0)}, {"w": np.float32(1.0)}
    assert float(train.ema_update(ema, params, 10, 0.9, 10)["w"]) == 1.0
    np.testing.assert_allclose(float(train.ema_update(ema, params, 11, 0.9, 10)["w"]), 0.1, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------- resume
RUN_SCRIPT = ("import sys, json; from hitlib import train; "
              "train.train(train.TrainConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2], progress=False)")


def test_resume_after_sigkill_is_bit_identical(tmp_path, reference_run):
    "SIGKILL a training process after its second checkpoint, rerun the same command: same final state, bit for bit."
    config = dataclasses.replace(SMALL, steps=48)
    reference = train.train(config, reference_run[0], progress=False)  # resumes the reference run from step 12
    command = [sys.executable, "-c", RUN_SCRIPT, json.dumps(config.to_dict()), str(tmp_path)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (tmp_path / "digests" / "8.sha256").exists():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no second checkpoint within 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(train.CheckpointStore(tmp_path, 2).steps())
    assert 8 <= killed_at < 48
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    _, _, resumed = train.load_state(tmp_path)
    assert int(resumed.step) == 48
    assert_same_state(resumed, reference)
    assert [record["step"] for record in train.read_metrics(tmp_path)] == list(range(4, 49, 4))


# ------------------------------------------------------------------------------------------- damaged checkpoints, NaN
def test_damaged_latest_checkpoint_falls_back_with_a_warning(tmp_path, reference_run):
    config = dataclasses.replace(SMALL, steps=8)
    train.train(config, tmp_path, progress=False)  # checkpoints 4 and 8
    store = train.CheckpointStore(tmp_path, 2)
    assert store.steps() == [4, 8] and store.verify(8) is None
    data_file = max((p for p in (tmp_path / "checkpoints" / "8").rglob("*") if p.is_file()),
                    key=lambda p: p.stat().st_size)
    blob = bytearray(data_file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data_file.write_bytes(bytes(blob))
    assert "does not match" in store.verify(8)
    with pytest.warns(RuntimeWarning, match="checkpoint 8 .* is damaged"):
        final = train.train(dataclasses.replace(config, steps=12), tmp_path, progress=False)
    assert len(list((tmp_path / "set_aside").iterdir())) == 2  # the folder and its digest
    assert_same_state(final, reference_run[1])  # resumed from 4, redid 5-8, went on to 12: as if never damaged
    with pytest.raises(FileExistsError, match="not overwritten"):
        store.save(final)


def test_checkpoint_without_digest_is_set_aside(tmp_path):
    config = dataclasses.replace(SMALL, steps=8)
    train.train(config, tmp_path, progress=False)
    (tmp_path / "digests" / "8.sha256").unlink()  # killed between writing the checkpoint and its digest
    with pytest.warns(RuntimeWarning, match="no digest"):
        _, _, state = train.load_state(tmp_path)
    assert int(state.step) == 4


class PoisonedDataset:
    "The training data with NaN images from step `bad_step` (0-based) on."

    def __init__(self, dataset, bad_step):
        self.dataset, self.bad_step = dataset, bad_step

    def __getitem__(self, step):
        batch = self.dataset[step]
        return batch * np.nan if step >= self.bad_step else batch


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = train.training_dataset
    monkeypatch.setattr(train, "training_dataset", lambda config: PoisonedDataset(original(config), 5))
    with pytest.raises(train.NonFiniteLossError, match=r"non-finite .*d_loss=nan.* at step 6.*last good checkpoint "
                                                       r"is step 4"):
        train.train(SMALL, tmp_path, progress=False)
    store = train.CheckpointStore(tmp_path, 2)
    assert store.steps() == [4] and store.verify(4) is None
    _, _, state = train.load_state(tmp_path)
    assert int(state.step) == 4 and all(np.isfinite(leaf).all() for leaf in leaves(state))


# -------------------------------------------------------------------------------------------------- outputs, loading
def test_run_outputs_and_load_run(reference_run):
    workdir, final = reference_run
    assert (workdir / "samples" / "step_0000000.png").is_file()
    records = train.read_metrics(workdir)
    assert {"d_loss", "g_loss", "r1", "bcr", "g_lr", "d_lr", "steps_per_second"} <= set(records[0])
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    run = train.load_run(workdir)
    assert run.config == train.load_config(workdir) and run.step >= 12
    images = train.generate(run.generator, train.sample_latents(run.config, 3))
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.float32 and np.abs(images).max() <= 1.0
    np.testing.assert_array_equal(images, train.generate(run.generator, train.sample_latents(run.config, 3)))


# ------------------------------------------------------------------------------------------------- many devices
SHARDED_SCRIPT = """
import dataclasses, json, sys
from pathlib import Path
import jax, numpy as np
from hitlib import train
assert jax.device_count() == 4, jax.devices()
config = train.TrainConfig.from_dict(json.loads(sys.argv[1]))
odd = Path(sys.argv[2] + "-odd")
try:
    train.train(dataclasses.replace(config, batch_size=6), odd, progress=False)
    raise SystemExit("batch_size=6 was accepted on 4 devices")
except ValueError as error:
    assert "batch_size=6" in str(error) and not odd.exists(), error
state = train.train(config, sys.argv[2], progress=False)
assert all(leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4
           for leaf in jax.tree.leaves(state))
np.savez(sys.argv[3], *[np.asarray(leaf) for leaf in jax.tree.leaves(state)])
"""


def test_data_parallel_on_four_devices_matches_one_device(tmp_path, reference_run):
    """SMALL trained on 4 forced CPU devices (batch 4 split in 4) ends where the single-device run ends, up to the
    order of floating-point sums, and its checkpoint restores on one device.

    Measured after 12 steps: the discriminator, both Adam states and the step agree within rtol 1e-4, atol 1e-6, and so
    do the generator's and the EMA's weights except biases that a BatchNorm subtracts again (their exact gradient is 0,
    so Adam, which divides a gradient by its own size, turns rounding noise into steps of up to lr: up to 3.8e-4 apart,
    bounded by 2·lr·steps) and those BatchNorms' running means (up to 5e-5). The generator's function is the same:
    its training-mode images on fixed latents agree within 2.2e-8 (of values up to 0.13); asserted at atol 1e-6."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    final = tmp_path / "final.npz"
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, json.dumps(SMALL.to_dict()), str(tmp_path / "run"),
                             str(final)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single_state = reference_run[1]
    with np.load(final) as archive:
        sharded = [archive[f"arr_{i}"] for i in range(len(archive.files))]
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(single_state)[0]]
    single = leaves(single_state)
    assert len(sharded) == len(single) and sharded[0].shape == () and int(sharded[0]) == 12  # TrainState.step first
    bound = 2 * SMALL.g_lr * SMALL.steps  # Adam moves a parameter by at most lr per step
    for path, x, y in zip(paths, sharded, single):
        if not np.allclose(x, y, rtol=1e-4, atol=1e-6):
            generator_leaf = path.startswith((".g_params", ".ema_params", ".g_batch_stats"))
            assert generator_leaf and path.endswith(("['bias'].value", "['mean'].value")), path
            np.testing.assert_allclose(x, y, rtol=0, atol=bound, err_msg=path)

    _, networks, restored = train.load_state(tmp_path / "run")  # written from 4 devices, read on 1
    for x, y in zip(leaves(restored), sharded, strict=True):
        np.testing.assert_array_equal(x, y)
    z = jax.random.normal(jax.random.PRNGKey(7), (8, networks.latent_dim))
    images = [np.asarray(networks.generator(state.g_params, state.g_batch_stats)(z, train=True))
              for state in (single_state, restored)]
    np.testing.assert_allclose(images[0], images[1], rtol=0, atol=1e-6)  # values up to ~0.1
    assert [record["step"] for record in train.read_metrics(tmp_path / "run")] == [4, 8, 12]

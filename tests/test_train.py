"""Chapter 11c: the training step and loop — resume after SIGKILL bit for bit, damaged
checkpoints, readers that move nothing, divergence, checks before anything is written, data-parallel training on four
forced CPU devices.

No test here depends on how fast the machine is: subprocesses are waited for by the events they produce (a file
appearing, the process ending) within a generous overall limit, `LIMIT_S`, that only a hung process reaches."""
import dataclasses
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from hitlib import checkpoints, recipes, sampling, scaling, train
from helpers import LIMIT_S, run_python

ROOT = Path(__file__).resolve().parent.parent

# A very small run: the tiny preset narrowed, batch 4, an 8-channel discriminator; checkpoints every 4 steps.
SMALL = recipes.TrainConfig(generator="tiny", generator_overrides=("widths=32,16,8", "latent_dim=16"), batch_size=4,
                          steps=12, d_max_channels=8, checkpoint_every=4, keep_checkpoints=2, sample_every=1000,
                          log_every=4, num_samples=4)


def leaves(state):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state)]


def problem_of(workdir, step):
    "None if checkpoint `step` of the run in `workdir` restores to its recorded digest, else what is wrong."
    _, state = train.create_train_state(checkpoints.load_config(workdir))
    store = checkpoints.CheckpointStore(workdir, read_only=True)
    try:
        return store.verify(step, checkpoints.abstract_state(state, scaling.data_mesh()))[1]
    finally:
        store.close()


def assert_same_state(a, b):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)  # bit for bit


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    "SMALL trained without interruption: (workdir, final TrainState)."
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, train.train(SMALL, workdir, progress=False)


def test_ema_is_a_copy_until_the_start_step_then_an_average():
    ema, params = {"w": np.float32(0.0)}, {"w": np.float32(1.0)}
    assert float(train.ema_update(ema, params, 10, 0.9, 10)["w"]) == 1.0
    np.testing.assert_allclose(float(train.ema_update(ema, params, 11, 0.9, 10)["w"]), 0.1, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------- resume
RUN_SCRIPT = ("import sys, json; from hitlib import recipes, train; "
              "train.train(recipes.TrainConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2], progress=False)")


def second_checkpoint_confirmed(workdir: Path) -> bool:
    return (workdir / "digests" / "8.sha256").exists()


def saving_or_unconfirmed(workdir: Path) -> bool:
    "An asynchronous save of step >= 8 is being written (Orbax's temporary folder), or is written but not vouched for."
    folder = workdir / "checkpoints"
    if not folder.is_dir():
        return False
    for path in folder.iterdir():
        step = path.name.split(".")[0]
        if step.isdigit() and int(step) >= 8 and (not path.name.isdigit()
                                                  or not (workdir / "digests" / f"{step}.sha256").exists()):
            return True
    return False


@pytest.mark.parametrize("moment", [second_checkpoint_confirmed, saving_or_unconfirmed])
def test_resume_after_sigkill_is_bit_identical(tmp_path, reference_run, moment):
    """SIGKILL a training process after its second checkpoint is confirmed, or while a checkpoint is being written
    asynchronously (or is written but not yet vouched for); rerun the same command: the same final state, bit for
    bit, and one run's log."""
    config = dataclasses.replace(SMALL, steps=48)
    reference = train.train(config, reference_run[0], progress=False)  # resumes the reference run from step 12
    command = [sys.executable, "-c", RUN_SCRIPT, json.dumps(config.to_dict()), str(tmp_path)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watchdog = threading.Timer(LIMIT_S, process.kill)  # only a hung process lives this long: then the loop fails
    watchdog.start()
    while not moment(tmp_path):  # waits on the event itself, or on the process ending first
        assert process.poll() is None, f"ended before {moment.__name__}: " + process.stderr.read().decode()[-2000:]
        time.sleep(0.002)
    watchdog.cancel()
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    _, _, resumed = train.load_state(tmp_path)
    assert int(resumed.step) == 48
    assert_same_state(resumed, reference)
    assert [record["step"] for record in train.read_metrics(tmp_path)] == list(range(4, 49, 4))


# ------------------------------------------------------------------------------------------- damaged checkpoints, NaN
def test_damaged_latest_checkpoint_falls_back_with_a_warning(tmp_path, reference_run):
    config = dataclasses.replace(SMALL, steps=8)
    train.train(config, tmp_path, progress=False)  # checkpoints 4 and 8
    store = checkpoints.CheckpointStore(tmp_path, keep=2)
    assert store.steps() == [4, 8] and problem_of(tmp_path, 8) is None
    data_file = max((p for p in (tmp_path / "checkpoints" / "8").rglob("*") if p.is_file()),
                    key=lambda p: p.stat().st_size)
    blob = bytearray(data_file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data_file.write_bytes(bytes(blob))
    assert problem_of(tmp_path, 8) is not None  # restores to other values, or not at all
    with pytest.warns(RuntimeWarning, match="checkpoint 8 .* is damaged"):
        final = train.train(dataclasses.replace(config, steps=12), tmp_path, progress=False)
    assert len(list((tmp_path / "set_aside").iterdir())) == 2  # the folder and its digest
    assert_same_state(final, reference_run[1])  # resumed from 4, redid 5-8, went on to 12: as if never damaged
    with pytest.raises(FileExistsError, match="not overwritten"):
        store.save(final)


def test_readers_skip_a_checkpoint_without_digest_and_move_nothing(tmp_path):
    config = dataclasses.replace(SMALL, steps=8)
    train.train(config, tmp_path, progress=False)
    (tmp_path / "digests" / "8.sha256").unlink()  # as while a live run is still writing checkpoint 8
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.warns(RuntimeWarning, match="checkpoint 8 .* skipped .*no digest.*using step 4"):
        _, _, state = train.load_state(tmp_path)
    assert int(state.step) == 4
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # nothing moved or written
    with pytest.warns(RuntimeWarning, match="checkpoint 8 .* is damaged .*no digest"):  # training sets it aside
        train.train(dataclasses.replace(config, steps=9), tmp_path, progress=False)
    assert checkpoints.CheckpointStore(tmp_path, read_only=True).steps() == [8, 9] and (tmp_path / "set_aside").is_dir()  # from 4


def test_every_checkpoint_damaged_stops_and_keeps_everything(tmp_path):
    config = dataclasses.replace(SMALL, steps=8)
    train.train(config, tmp_path, progress=False)
    for step in (4, 8):
        (tmp_path / "digests" / f"{step}.sha256").write_text("0" * 64 + "\n")
    metrics = (tmp_path / "metrics.jsonl").read_text()
    for attempt in (lambda: train.train(dataclasses.replace(config, steps=12), tmp_path, progress=False),
                    lambda: train.load_state(tmp_path)):
        with pytest.raises(checkpoints.DamagedCheckpointsError, match=r"step 4: its values hash to .*not the recorded .*"
                                                                 r"step 8: .*Nothing was moved and nothing was "
                                                                 r"started over"):
            attempt()
    assert checkpoints.CheckpointStore(tmp_path, read_only=True).steps() == [4, 8] and not (tmp_path / "set_aside").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == metrics  # not cut back to step 0


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
    with pytest.raises(train.NonFiniteLossError, match=r"non-finite losses at step 6 .*d_loss=nan.*last good "
                                                       r"checkpoint is step 4"):
        train.train(SMALL, tmp_path, progress=False, data_threads=0)
    store = checkpoints.CheckpointStore(tmp_path, read_only=True)
    assert store.steps() == [4] and problem_of(tmp_path, 4) is None
    _, _, state = train.load_state(tmp_path)
    assert int(state.step) == 4 and all(np.isfinite(leaf).all() for leaf in leaves(state))


def test_a_diverged_state_is_never_called_good_and_the_advice_works(tmp_path):
    """g_lr=1e30 with a checkpoint every step: Adam's first step moves the generator's weights by about 1e30 (still
    finite), and the next step's losses are NaN. The state after step 1 must not be kept as good, and the advice of
    the message (resume with --reconfigure and lower learning rates) must work as written."""
    diverging = dataclasses.replace(SMALL, steps=4, g_lr=1e30, checkpoint_every=1, log_every=1)
    with pytest.warns(RuntimeWarning, match="diverged"):
        with pytest.raises(train.NonFiniteLossError, match=r"non-finite losses at step 2 .*No checkpoint was good "
                                                           r"yet.*--reconfigure g_lr=5e\+29"):
            train.train(diverging, tmp_path, progress=False)
    store = checkpoints.CheckpointStore(tmp_path, read_only=True)
    assert store.last_confirmed() is None and store.steps() == []  # checkpoint 1 was set aside, not trusted
    with pytest.raises(ValueError, match="add --reconfigure"):
        train.train(dataclasses.replace(diverging, g_lr=1e-4), tmp_path, progress=False)
    final = train.train(dataclasses.replace(diverging, g_lr=1e-4), tmp_path, progress=False, reconfigure=True)
    assert int(final.step) == 4 and all(np.isfinite(leaf).all() for leaf in leaves(final))
    assert max(float(np.abs(leaf).max()) for leaf in leaves(final.g_params)) < 1e3


def test_every_check_comes_before_anything_is_written(tmp_path):
    "Bad data and a workdir that is a file are refused with ValueError, and the workdir is left as it was."
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(images / "a.png")
    cases = {"missing": (str(tmp_path / "nowhere"), "does not exist"),
             "raw images": (str(images), r"raw images, not prepared shards: prepare it once with `hitlib prepare "
                                         r"folder .*images .*images-32 --resolution 32`"),
             "empty": (str(tmp_path / "images-none"), "neither prepared shards")}
    (tmp_path / "images-none").mkdir()
    for name, (folder, message) in cases.items():
        workdir = tmp_path / f"run-{name.replace(' ', '-')}"
        with pytest.raises(ValueError, match=message):
            train.train(dataclasses.replace(SMALL, data=folder), workdir, progress=False)
        assert not workdir.exists(), name
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        train.train(SMALL, afile, progress=False)
    with pytest.raises(ValueError, match="crop_fraction=0.875 needs prepared data"):
        train.train(dataclasses.replace(SMALL, crop_fraction=0.875), tmp_path / "crop", progress=False)
    assert not (tmp_path / "crop").exists()


# -------------------------------------------------------------------------------------------------- outputs, loading
def test_run_outputs_and_load_run(reference_run):
    workdir, final = reference_run
    assert (workdir / "samples" / "step_0000000.png").is_file()
    records = train.read_metrics(workdir)
    assert {"d_loss", "g_loss", "r1", "bcr", "g_lr", "d_lr", "steps_per_second"} <= set(records[0])
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    run = train.load_run(workdir)
    assert run.config == checkpoints.load_config(workdir) and run.step >= 12
    images = sampling.generate(run.generator, train.fixed_latents(run.config)[:3])
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.float32 and np.abs(images).max() <= 1.0
    np.testing.assert_array_equal(images, sampling.generate(run.generator, train.fixed_latents(run.config)[:3]))


# ------------------------------------------------------------------------------------------------- many devices
SHARDED_SCRIPT = """
import dataclasses, json, sys
from pathlib import Path
import jax, numpy as np
from hitlib import recipes, train
assert jax.device_count() == 4, jax.devices()
config = recipes.TrainConfig.from_dict(json.loads(sys.argv[1]))
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


ONE_STEP_SCRIPT = """
import json, sys
import jax, numpy as np
from hitlib import recipes, train
from hitlib.scaling import data_mesh, replicate, shard_batch
assert jax.device_count() == 4, jax.devices()
config = recipes.TrainConfig.from_dict(json.loads(sys.argv[1]))
networks, state = train.create_train_state(config)
shape = (config.batch_size, networks.resolution, networks.resolution, 3)
real = np.asarray(jax.random.uniform(jax.random.key(3), shape, minval=-1.0, maxval=1.0))
arrays = {}
for name, devices in (("one", jax.devices()[:1]), ("four", jax.devices())):
    mesh = data_mesh(devices)
    step = train.make_train_step(config, networks, mesh, donate=False)
    new, metrics = step(replicate(mesh, state), shard_batch(mesh, real))
    assert all(leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == len(devices)
               for leaf in jax.tree.leaves(new))
    for path, leaf in jax.tree_util.tree_flatten_with_path((new, metrics))[0]:
        arrays[name + jax.tree_util.keystr(path)] = np.asarray(leaf)
np.savez(sys.argv[2], **arrays)
"""


def test_one_data_parallel_step_equals_the_single_device_step(tmp_path):
    """The step on 4 forced CPU devices (batch 4 split in 4) from the same state and batch computes the one-device
    step's new state and metrics, up to the order of floating-point sums.

    Measured: every leaf within rtol 1e-4, atol 1e-6 (asserted), except biases that a BatchNorm subtracts again:
    their exact gradient is 0, so Adam's first step, lr·sign(rounding noise), moves them by ±lr either way
    (asserted: within 2·lr). Random reals: on the digits of step 0, one input of the discriminator's first leaky ReLU
    lies 1.7e-9 from 0, within float32 rounding of the fakes (1.5e-8 apart on 1 and 4 devices), and which slope
    it takes decides that image's gradient in a 3×3 window (6.5% of its largest entry, measured)."""
    saved = tmp_path / "one_step.npz"
    result = run_python(["-c", ONE_STEP_SCRIPT, json.dumps(SMALL.to_dict()), str(saved)], devices=4, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(saved) as archive:
        arrays = {name: archive[name] for name in archive.files}
    paths = [name[len("one"):] for name in arrays if name.startswith("one")]
    assert len(paths) == len(arrays) // 2 and any("g_loss" in path for path in paths)
    for path in paths:
        x, y = (arrays[name + path].astype(np.float64) for name in ("four", "one"))
        if not np.allclose(x, y, rtol=1e-4, atol=1e-6):
            generator_bias = path.startswith(("[0].g_params", "[0].ema_params"))
            assert generator_bias and path.endswith("['bias'].value"), path
            np.testing.assert_allclose(x, y, rtol=0, atol=2 * SMALL.g_lr, err_msg=path)


LOGGED = ("d_loss", "g_loss", "r1", "real_logit", "fake_logit")


def test_data_parallel_on_four_devices_trains_as_one_device(tmp_path, reference_run):
    """SMALL trained on 4 forced CPU devices (batch 4 split in 4) logs the single-device run's losses, and its
    checkpoint restores on one device.

    Trajectories are compared by what they log, not leaf by leaf: a step's new state is the one-device step's (the
    test above), but over 12 steps one input of a leaky ReLU lying within rounding of 0 (measured at step 1 with
    the folded multi-query layout of chapter 2b) flips one gradient window, and Adam, which divides a gradient by
    its own size, carries that into steps of up to lr on weights whose gradients are tiny (the first map's, median
    3e-7): generator images 4.4e-4 apart after 12 steps (2.2e-8 without the flip). The logged losses and logits
    stay within 1.5e-6 of each other either way (measured); asserted at atol 1e-4, below how far they move
    between logs (the real logit 0.90, 1.05, 1.16 at steps 4, 8, 12)."""
    final = tmp_path / "final.npz"
    result = run_python(["-c", SHARDED_SCRIPT, json.dumps(SMALL.to_dict()), str(tmp_path / "run"), str(final)],
                        devices=4, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    workdir, single_state = reference_run
    with np.load(final) as archive:
        sharded = [archive[f"arr_{i}"] for i in range(len(archive.files))]
    assert len(sharded) == len(leaves(single_state))
    assert sharded[0].shape == () and int(sharded[0]) == 12  # TrainState.step first
    # other tests resume the reference run past step 12 and append to its log
    logs = [train.read_metrics(tmp_path / "run"),
            [record for record in train.read_metrics(workdir) if record["step"] <= SMALL.steps]]
    assert [record["step"] for record in logs[0]] == [record["step"] for record in logs[1]] == [4, 8, 12]
    for four, one in zip(*logs):
        for name in LOGGED:
            np.testing.assert_allclose(four[name], one[name], rtol=0, atol=1e-4,
                                       err_msg=f"{name} at step {one['step']}")

    _, networks, restored = train.load_state(tmp_path / "run")  # written from 4 devices, read on 1
    for x, y in zip(leaves(restored), sharded, strict=True):
        np.testing.assert_array_equal(x, y)
    z = jax.random.normal(jax.random.PRNGKey(7), (8, networks.latent_dim))
    images = networks.generator(restored.g_params, restored.g_batch_stats)(z, train=True)
    assert np.isfinite(np.asarray(images)).all()


def test_an_exported_generator_loads_as_the_run_and_damage_is_caught(tmp_path, reference_run):
    workdir, _ = reference_run
    folder = train.export_generator(workdir, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generator.npz",
                                                         "generator.npz.sha256"]
    run, exported = train.load_run(workdir), train.load_run(folder)
    assert (exported.config, exported.step) == (run.config, run.step)
    z = train.fixed_latents(run.config)
    np.testing.assert_array_equal(sampling.generate(exported.generator, z),
                                  sampling.generate(run.generator, z))  # bit for bit
    with pytest.raises(ValueError, match="holds the generator of step"):
        train.load_run(folder, step=run.step - 4)
    blob = bytearray((folder / "generator.npz").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (folder / "generator.npz").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="does not match its sha256"):
        train.load_run(folder)


def test_lazy_r1_is_the_r1_term_times_k_on_every_kth_step_and_absent_between():
    # r1_every=k: step s with s % k == 0 is the every-step update with weight γ·k, any other step the update
    # without R1 (same random numbers: they come from the step number); `make_train_steps` picks the program.
    real = jax.random.uniform(jax.random.key(3), (4, 32, 32, 3), minval=-1.0, maxval=1.0)

    def one_step(step, **fields):
        config = dataclasses.replace(SMALL, **fields)
        networks, state = train.create_train_state(config)
        state = state.replace(step=jax.numpy.asarray(step, jax.numpy.int32))
        new_state, metrics = train.make_train_steps(config, networks, donate=False)(step)(state, real)
        return new_state.d_params, float(metrics["r1"])

    lazy_on, r1_on = one_step(4, r1_gamma=2.0, r1_every=4)
    every_on, r1_every_step = one_step(4, r1_gamma=8.0)
    assert r1_on == pytest.approx(r1_every_step, rel=1e-6) and r1_on > 0
    lazy_off, r1_off = one_step(5, r1_gamma=2.0, r1_every=4)
    without, _ = one_step(5, r1_gamma=0.0)
    assert r1_off == 0.0
    for a, b in ((lazy_on, every_on), (lazy_off, without)):
        for x, y in zip(leaves(a), leaves(b), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    # the R1 step's discriminator differs from the step without R1: the switch does something
    assert any(not np.allclose(x, y) for x, y in zip(leaves(lazy_on), leaves(one_step(4, r1_gamma=0.0)[0])))


def test_simultaneous_updates_take_the_generators_gradient_through_the_discriminator_before_its_update():
    # updates="simultaneous" (the release's): D's update is the alternating step's, G's is the one an alternating
    # step computes when D does not move (d_lr so small that Adam's steps vanish in float32).
    real = jax.random.uniform(jax.random.key(4), (4, 32, 32, 3), minval=-1.0, maxval=1.0)

    def one_step(**fields):
        config = dataclasses.replace(SMALL, **fields)
        networks, state = train.create_train_state(config)
        new_state, _ = train.make_train_step(config, networks, donate=False)(state, real)
        return new_state

    simultaneous = one_step(updates="simultaneous")
    alternating = one_step()
    frozen_d = one_step(d_lr=1e-30)
    for x, y in zip(leaves(simultaneous.d_params), leaves(alternating.d_params), strict=True):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(leaves(simultaneous.g_params), leaves(frozen_d.g_params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(x, y, rtol=1e-5, atol=1e-7)
               for x, y in zip(leaves(simultaneous.g_params), leaves(alternating.g_params)))

"""Chapter 11e: a run's folder — a resumed run must match the saved configuration;
Orbax's save interval and LatestN; a digest only for a completed save that was
vouched for; a step never written twice; readers that write nothing."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

from hitlib import checkpoints, recipes, train

SMALL = recipes.TrainConfig(generator="tiny",
                            generator_overrides=("widths=32,16,8", "latent_dim=16"),
                            batch_size=4, steps=12, d_max_channels=8, checkpoint_every=4,
                            keep_checkpoints=2, sample_every=1000, log_every=4,
                            num_samples=4)


@pytest.fixture(scope="module")
def state():
    return train.create_train_state(SMALL)[1]


def at_step(state, step):
    return dataclasses.replace(state, step=jnp.int32(step))


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_changed_config_is_refused(tmp_path):
    checkpoints.prepare_workdir(SMALL, tmp_path)
    # how long to run and how often to log may change on resume
    checkpoints.prepare_workdir(dataclasses.replace(SMALL, steps=100, log_every=7), tmp_path)
    changed = dataclasses.replace(SMALL, batch_size=8, d_lr=1e-3)
    with pytest.raises(ValueError, match=r"batch_size: saved 4, requested 8.*d_lr: saved "
                                         r"0.0001, requested 0.001.*add --reconfigure"):
        checkpoints.prepare_workdir(changed, tmp_path)
    # an explicit choice: the state still fits
    checkpoints.prepare_workdir(changed, tmp_path, reconfigure=True)
    assert checkpoints.load_config(tmp_path) == changed
    lines = (tmp_path / "reconfigured.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"batch_size": {"saved": 4, "now": 8}, "d_lr": {"saved": 1e-4, "now": 1e-3}}]
    with pytest.raises(ValueError, match=r"d_max_channels: saved 8, requested 16. Use "
                                         r"another workdir"):
        checkpoints.prepare_workdir(dataclasses.replace(changed, d_max_channels=16),
                                    tmp_path, reconfigure=True)


def test_a_workdir_that_is_a_file_or_holds_garbage_is_refused(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        checkpoints.check_workdir(SMALL, afile)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable training configuration"):
        checkpoints.check_workdir(SMALL, tmp_path / "run")


def test_save_policy_is_orbaxs_interval_and_nothing_is_overwritten(tmp_path, state):
    store = checkpoints.CheckpointStore(tmp_path, keep=2, every=4)
    assert [step for step in range(1, 14) if store.should_save(step)] == [4, 8, 12]
    store.save(at_step(state, 4))
    with pytest.raises(FileExistsError, match="not overwritten"):
        store.save(at_step(state, 4))
    for step in (8, 12):
        store.save(at_step(state, step))
    store.close()
    assert store.steps() == [8, 12]  # LatestN(2)
    assert sorted(p.name for p in (tmp_path / "digests").iterdir()) == [
        "12.sha256", "8.sha256"]  # the digest of the deleted step 4 pruned too


def test_a_digest_is_written_only_for_a_completed_vouched_for_save(tmp_path, state):
    store = checkpoints.CheckpointStore(tmp_path, keep=3)
    store.save(at_step(state, 5), confirm=False)
    store.flush()  # the save is complete, but nobody vouched for it
    assert store.steps() == [5] and not (tmp_path / "digests" / "5.sha256").exists()
    assert store.last_confirmed() is None
    abstract = jax.eval_shape(lambda: state)
    assert "no digest" in store.verify(5, abstract)[1]
    store.confirm(5)
    store.close()
    assert store.last_confirmed() == 5
    restored, problem = store.verify(5, abstract)
    assert problem is None and int(restored.step) == 5
    assert checkpoints.state_digest(restored) == checkpoints.state_digest(at_step(state, 5))


def test_a_reader_writes_nothing_and_cannot_save(tmp_path, state):
    writer = checkpoints.CheckpointStore(tmp_path, keep=3)
    writer.save(at_step(state, 1))
    writer.save(at_step(state, 2), confirm=False)  # as while a live run writes it
    writer.close()
    before = files(tmp_path)
    reader = checkpoints.CheckpointStore(tmp_path, read_only=True)
    with pytest.warns(RuntimeWarning, match="checkpoint 2 .* skipped .*no digest"):
        restored = reader.restore_latest(jax.eval_shape(lambda: state))
    assert int(restored.step) == 1 and not reader.should_save(4)
    with pytest.raises(RuntimeError, match="read-only"):
        reader.save(at_step(state, 3))
    reader.close()
    assert files(tmp_path) == before


def test_a_relative_workdir_restores(tmp_path, state, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `hitlib eval --workdir runs/tiny`, as the README says
    store = checkpoints.CheckpointStore("runs/tiny", keep=2)
    store.save(at_step(state, 3))
    store.close()
    reader = checkpoints.CheckpointStore("runs/tiny", read_only=True)
    restored = reader.restore_latest(jax.eval_shape(lambda: state))
    assert int(restored.step) == 3

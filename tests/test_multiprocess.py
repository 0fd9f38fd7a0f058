"""Chapter 11c: training as on a multi-host TPU slice, with real processes — two `hitlib train` processes on this
machine, one CPU device each, joined by JAX's multi-controller runtime (CPU collectives over gloo).

They must end where one process with two (forced) devices ends, write one run that a single process restores, stop
together when one of them is killed, and resume when both are started again. Subprocesses are waited for by the events
they produce within a generous overall limit (`LIMIT_S`) that only a hung process reaches."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from hitlib import checkpoints, train
from helpers import LIMIT_S, run_python

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--quiet", "batch_size=4", "d_max_channels=8", "widths=32,16,8", "latent_dim=16", "checkpoint_every=4",
         "log_every=4", "sample_every=1000", "num_samples=4", "keep_checkpoints=2"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_pair(workdir: Path, steps: int):
    "Two processes of one run: `hitlib train --coordinator ... --process-id I`, one CPU device each."
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return [subprocess.Popen([sys.executable, "-m", "hitlib", "train", "--workdir", str(workdir), "--steps",
                              str(steps), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                              "--process-id", str(rank), *SMALL], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for rank in (0, 1)]


def finish(processes) -> list:
    "Wait for every process (within LIMIT_S); their (return code, stderr)."
    results = []
    for process in processes:
        try:
            _, err = process.communicate(timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
        results.append((process.returncode, err))
    return results


def leaves(state):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state)]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    "8 steps by two processes, and the same 8 steps by one process on two forced host devices."
    root = tmp_path_factory.mktemp("multiprocess")
    results = finish(start_pair(root / "pair", 8))
    assert all(code == 0 for code, _ in results), "\n".join(err[-2000:] for _, err in results)
    single = run_python(["-m", "hitlib", "train", "--workdir", str(root / "single"), "--steps", "8", *SMALL],
                        devices=2, cwd=ROOT)
    assert single.returncode == 0, single.stderr[-2000:]
    return root


def test_two_processes_train_as_one_program_on_two_devices(two_process_run):
    """Same final state as one process on two devices: the same global batch (each process read its half), the same
    collectives. Measured: every leaf equal within rtol 1e-5, atol 1e-6 (asserted)."""
    _, _, pair = train.load_state(two_process_run / "pair")  # written by two processes, restored in one
    _, _, single = train.load_state(two_process_run / "single")
    assert int(pair.step) == int(single.step) == 8
    for x, y in zip(leaves(pair), leaves(single), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert [record["step"] for record in train.read_metrics(two_process_run / "pair")] == [4, 8]
    assert sorted(path.name for path in (two_process_run / "pair" / "digests").iterdir()) == ["4.sha256",
                                                                                               "8.sha256"]


def test_killing_one_process_stops_both_and_both_resume(two_process_run, tmp_path):
    workdir = tmp_path / "pair"
    import shutil
    shutil.copytree(two_process_run / "pair", workdir)
    processes = start_pair(workdir, 400)
    watchdogs = [threading.Timer(LIMIT_S, process.kill) for process in processes]  # only hung processes live so long
    for watchdog in watchdogs:
        watchdog.start()
    while not (workdir / "digests" / "12.sha256").exists():  # two checkpoints past the copied step 8
        assert all(process.poll() is None for process in processes), [p.stderr.read()[-2000:] for p in processes]
        time.sleep(0.05)
    for watchdog in watchdogs:
        watchdog.cancel()
    processes[1].send_signal(signal.SIGKILL)
    (code0, err0), (code1, _) = finish(processes)  # process 0 must end by itself
    assert code1 == -signal.SIGKILL and code0 != 0, err0[-2000:]
    stopped_at = checkpoints.CheckpointStore(workdir, read_only=True).last_confirmed()
    assert 12 <= stopped_at < 400
    results = finish(start_pair(workdir, stopped_at + 8))  # both again: they resume from the last good checkpoint
    assert all(code == 0 for code, _ in results), "\n".join(err[-2000:] for _, err in results)
    _, _, resumed = train.load_state(workdir)
    assert int(resumed.step) == stopped_at + 8
    steps = [record["step"] for record in train.read_metrics(workdir)]
    assert steps == list(range(4, stopped_at + 9, 4))  # one run's log, without a gap or a repeat

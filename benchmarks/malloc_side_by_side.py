"""The training step with glibc's malloc as it comes and as `hitlib` sets it, side by side, printed as JSON.

`hitlib.cli.tune_allocator` (chapter 13) changes how the process reuses memory, so the two settings cannot share a
process: each measurement runs in a child process of its own, the two settings alternating, on the same commit and
machine in one run. Each child jits `hitlib.train.make_train_step` for one configuration and batch and reports its
compile time and the median seconds of `--repeats` steps after one warm-up (as `train_step_speed.py` measures).

    python benchmarks/malloc_side_by_side.py                         # release-128 b8 (3 steps), tiny b16 (20), twice
    python benchmarks/malloc_side_by_side.py --runs tiny:16:20 --rounds 3 --save NAME
    python benchmarks/malloc_side_by_side.py --baseline 777f38e      # and that commit's step, glibc as it comes
    python benchmarks/malloc_side_by_side.py --runs forward/release-128:32:3   # the generator's forward pass

`--baseline COMMIT` adds a third setting: the step of COMMIT's `hitlib` (checked out in a temporary `git
worktree`, put first on the child's `PYTHONPATH`) with glibc's defaults, as that commit ran — the side-by-side of
today's step against an older one, in the same run on the same machine. Each child records the `hitlib` it imported.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(mode, name, batch, repeats):
    "One measurement, in this (fresh) process."
    import hitlib
    from hitlib import cli
    if mode == "tuned" and not cli.tune_allocator():
        raise SystemExit("tune_allocator: this C library is not glibc, or MALLOC_* is set")
    import jax

    sys.path.insert(0, str(HERE))
    import train_step_speed

    from hitlib import train

    if name.startswith("forward/"):  # the generator's forward pass (inference) alone
        return print(json.dumps({"malloc": mode, "config": name, "batch": batch,
                                 **forward(name.split("/", 1)[1], batch, repeats),
                                 "hitlib": str(Path(hitlib.__file__).resolve().parent)}), flush=True)
    config = train_step_speed.training_config(name, batch)
    networks, state = train.create_train_state(config)
    size = networks.resolution
    real = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), minval=-1.0, maxval=1.0)
    step = train.make_train_step(config, networks, donate=False)
    peak = 1.0  # the share of the matmul rate is train_step_speed.py's business
    result = train_step_speed.measure(None, (state, real), repeats, peak, jitted=step)
    for derived in ("fraction_of_matmul_rate", "matmul_floor_seconds"):  # of the rate 1.0
        result.pop(derived, None)
    source = str(Path(hitlib.__file__).resolve().parent)
    print(json.dumps({"malloc": mode, "config": name, "batch": batch, **result, "hitlib": source}), flush=True)


def forward(preset, batch, repeats):
    "Compile time and median seconds of a jitted inference forward pass of `preset` at `batch`."
    from generator_speed import forward_seconds
    from hitlib.config import get_config

    compile_seconds, seconds = forward_seconds(get_config(preset), batch, repeats)
    return {"compile_seconds": round(compile_seconds, 2), "seconds": round(seconds, 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["release-128:8:3", "tiny:16:20"],
                        help="CONFIG:BATCH:REPEATS, each measured with every setting; "
                             "forward/PRESET: that generator's inference pass instead of the step")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two settings per run")
    parser.add_argument("--save", metavar="NAME", help="also write benchmarks/results/NAME.json")
    parser.add_argument("--baseline", metavar="COMMIT", help="also that commit's step, with glibc's defaults")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "CONFIG", "BATCH", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, name, batch, repeats = args.child
        return child(mode, name, int(batch), int(repeats))
    runs = []
    for spec in args.runs:
        try:
            name, batch, repeats = spec.split(":")
            batch, repeats = int(batch), int(repeats)
        except ValueError:
            parser.error(f"--runs: {spec!r} is not CONFIG:BATCH:REPEATS")
        runs.append((name, batch, repeats))
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    settings = {"glibc": env, "tuned": env}
    with tempfile.TemporaryDirectory() as scratch:
        if args.baseline:
            commit = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=HERE, check=True,
                                    capture_output=True, text=True).stdout.strip()
            tree = Path(scratch) / commit
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=HERE, check=True,
                           capture_output=True)
            settings[f"baseline {commit}"] = dict(env, PYTHONPATH=str(tree))
        try:
            result = side_by_side(runs, args.rounds, settings)
        finally:
            if args.baseline:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=HERE, check=True)
    if args.baseline:
        result["baseline"] = commit
    print(json.dumps(result, indent=2))
    if args.save:
        (HERE / "results" / f"{args.save}.json").write_text(json.dumps(result, indent=2) + "\n")


def side_by_side(runs, rounds, settings):
    "Every (config, batch, repeats) of `runs`, each setting in turn, `rounds` times over."
    load_before = os.getloadavg()
    measurements = []
    for name, batch, repeats in runs:
        for _ in range(rounds):
            for setting, env in settings.items():
                mode = "tuned" if setting == "tuned" else "glibc"
                out = subprocess.run([sys.executable, __file__, "--child", mode, name, str(batch), str(repeats)],
                                     env=env, check=True, capture_output=True, text=True).stdout
                measurements.append(dict(json.loads(out.strip().splitlines()[-1]), setting=setting))
                print(json.dumps(measurements[-1]), file=sys.stderr, flush=True)
    from generator_speed import cpu_model  # this folder is on sys.path: run as a script

    return {"date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(),
            "platform": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
            "load_average_before": [round(x, 2) for x in load_before], "measurements": measurements}


if __name__ == "__main__":
    main()

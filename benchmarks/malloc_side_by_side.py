"""The training step with glibc's malloc as it comes and as `hitlib` sets it, side by side, printed as JSON.

`hitlib.cli.tune_allocator` (chapter 13) changes how the process reuses memory, so the two settings cannot share a
process: each measurement runs in a child process of its own, the two settings alternating, on the same commit and
machine in one run. Each child jits `hitlib.train.make_train_step` for one configuration and batch and reports its
compile time and the median seconds of `--repeats` steps after one warm-up (as `train_step_speed.py` measures).

    python benchmarks/malloc_side_by_side.py                         # release-128 b8 (3 steps), tiny b16 (20), twice
    python benchmarks/malloc_side_by_side.py --runs tiny:16:20 --rounds 3 --save NAME
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(mode, name, batch, repeats):
    "One measurement, in this (fresh) process."
    from hitlib import cli
    if mode == "tuned" and not cli.tune_allocator():
        raise SystemExit("tune_allocator: this C library is not glibc, or MALLOC_* is set")
    import jax

    sys.path.insert(0, str(HERE))
    import train_step_speed

    from hitlib import train

    config = train_step_speed.training_config(name, batch)
    networks, state = train.create_train_state(config)
    size = networks.resolution
    real = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), minval=-1.0, maxval=1.0)
    step = train.make_train_step(config, networks, donate=False)
    peak = 1.0  # the share of the matmul rate is train_step_speed.py's business
    result = train_step_speed.measure(None, (state, real), repeats, peak, jitted=step)
    del result["fraction_of_matmul_rate"]
    print(json.dumps({"malloc": mode, "config": name, "batch": batch, **result}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["release-128:8:3", "tiny:16:20"],
                        help="CONFIG:BATCH:REPEATS, each measured with both settings")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two settings per run")
    parser.add_argument("--save", metavar="NAME", help="also write benchmarks/results/NAME.json")
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
    load_before = os.getloadavg()
    measurements = []
    for name, batch, repeats in runs:
        for _ in range(args.rounds):
            for mode in ("glibc", "tuned"):
                out = subprocess.run([sys.executable, __file__, "--child", mode, name, str(batch), str(repeats)],
                                     env=env, check=True, capture_output=True, text=True).stdout
                measurements.append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(measurements[-1]), file=sys.stderr, flush=True)
    result = {"date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(),
              "platform": platform.processor() or platform.machine(),
              "load_average_before": [round(x, 2) for x in load_before], "measurements": measurements}
    print(json.dumps(result, indent=2))
    if args.save:
        (HERE / "results" / f"{args.save}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

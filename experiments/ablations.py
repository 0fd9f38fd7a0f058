"""The paper's ablations (Tables 5-8) retrained in miniature on the embedded digits.

Every variant is the `tiny` recipe (32×32, chapter 11d) with the generator switches of
chapter 6 and the grid's faster schedule (`GRID_RECIPE`), trained for `--steps` steps
from several seeds with `hitlib.train.train`, then scored by the Fréchet Digit Distance
(FDD, chapter 11b) of 5,000 samples of its EMA generator. Results go to
`experiments/results/ablations.json`, rewritten after each finished cell; a cell
already there is skipped, so the grid resumes where it stopped (kill it at any moment,
run it again). Chapter 15 reads the JSON.

    python experiments/ablations.py                   # the whole grid
    python experiments/ablations.py --curve           # the tiny recipe's FDD by step
    python experiments/ablations.py --only inr bcr    # some variants

Each run's workdir lives under `experiments/runs/` (not committed) and its checkpoints
are deleted once the run is scored; the JSON keeps what the chapter needs.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from hitlib import checkpoints, cli, digit_features, recipes, sampling, train
from hitlib import config as generator_config
from hitlib.checkpoints import write_atomically

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"  # runs go in the folder beside it: experiments/runs
EVAL_SAMPLES = 5000  # the size of the embedded set, as `hitlib eval --metric fdd`
EVAL_SEED = 1  # `hitlib eval`'s default latents
# `tiny` (learning rates 2e-4, EMA decay 0.995) needs 1,600 steps before its FDD falls
# below 60 (`learning_curve.json`); with learning rates 5e-4 and EMA decay 0.99 the
# same run reached FDD 50 at step 800 and 34 at step 1,000, which is what lets 36 runs
# fit in a few hours on two cores. The grid's default run (seed 0) records its own
# curve, so the chapter shows where 1,000 steps stand.
GRID_RECIPE = ["g_lr=0.0005", "d_lr=0.0005", "ema_decay=0.99"]
GRID_STEPS = 1000
CURVE_POINTS = 5  # FDD of the grid's default run (seed 0) at every fifth of its steps

# name -> (paper table, the row or column it stands for, generator overrides of tiny,
# training overrides). At 32×32 `tiny` has two attention stages (8 and 16 px) and one
# MLP stage (32 px); its blocks of 4×4 are the balanced ones, so the unbalanced
# blocking is 2×2 (64 blocks of 4 tokens at 16 px).
VARIANTS = {
    "default": ("5-8", "multi-axis, balanced; BatchNorm; multi-query", [], []),
    "inr": (
        "5",
        "latent-code conditioned INR decoder",
        ["cross_attention=false", "attention_stages=0"],
        [],
    ),
    "cross_only": (
        "5, 6",
        "+ cross-attention (Table 6's [0, 3])",
        ["attention_stages=0"],
        [],
    ),
    "axial": ("5", "+ axial attention", ["attention=axial"], []),
    "blocked_local": (
        "5",
        "+ blocked local attention",
        ["attention=blocked_local"],
        [],
    ),
    "interleaved": ("5", "+ interleaved multi-axis", ["attention=interleaved"], []),
    "unbalanced": ("5", "+ multi-axis, unbalanced", ["block_sizes=2"], []),
    "stages_1": ("6", "[1, 2]: attention at 8 px only", ["attention_stages=1"], []),
    "bcr": ("7", "+ bCR", [], ["bcr_weight=10"]),
    "layernorm": ("8", "LayerNorm", ["norm=layer"], []),
    "multi_head": ("8", "multi-head attention", ["multi_query=false"], []),
    # not a row of the paper's (full attention is its Table 1's cost baseline): last
    "full": ("-", "full attention (no blocking)", ["attention=full"], []),
    # beyond the paper (chapter 4): GANsformer's duplex attention for HiT's simplex
    "duplex": ("-", "duplex attention (GANsformer)", ["modulation=duplex"], []),
}


def config_of(name: str, seed: int, steps: int, keep: int = 1, grid: bool = True):
    _, _, generator, training = VARIANTS[name]
    return recipes.train_config(
        "tiny",
        [
            *(GRID_RECIPE if grid else []),
            *generator,
            *training,
            f"seed={seed}",
            f"steps={steps}",
            f"checkpoint_every={steps if keep == 1 else steps // keep}",
            f"keep_checkpoints={keep}",
            f"sample_every={steps}",
            f"log_every={min(25, steps)}",
        ],
    )


def fdd_of(workdir, step=None) -> float:
    run = train.load_run(workdir, step)
    latent_dim = run.config.generator_config.latent_dim
    z = sampling.sample_latents(EVAL_SEED, np.arange(EVAL_SAMPLES), latent_dim)
    return digit_features.fdd_to_reference(sampling.generate(run.generator, z))


def steps_per_second(workdir):
    "Median steps/s of the logged intervals after the first (which holds the compile)."
    rates = [record["steps_per_second"] for record in train.read_metrics(workdir)][1:]
    # None (JSON null), not NaN, when a run is too short to log twice
    return round(float(np.median(rates)), 3) if rates else None


def describe(name: str) -> dict:
    table, row, generator, training = VARIANTS[name]
    return {"table": table, "row": row, "generator": generator, "training": training}


def load(path: Path, steps: int) -> dict:
    if path.exists():
        saved = json.loads(path.read_text())
        if saved["steps"] != steps:
            raise SystemExit(
                f"{path} holds a grid of {saved['steps']} steps, not {steps}: "
                "move it away to start another"
            )
        # a variant added to VARIANTS after the grid began joins it; one already run
        # keeps the description it ran with
        for name in VARIANTS:
            saved["variants"].setdefault(name, describe(name))
        return saved
    return {
        "steps": steps,
        "eval_samples": EVAL_SAMPLES,
        "eval_seed": EVAL_SEED,
        "machine": f"{platform.processor() or platform.machine()}, CPU",
        "recipe": ["tiny", *GRID_RECIPE],
        "variants": {name: describe(name) for name in VARIANTS},
        "runs": {},
    }


def run_cell(name: str, seed: int, steps: int, runs: Path) -> dict:
    with_curve = name == "default" and seed == 0 and steps % CURVE_POINTS == 0
    config = config_of(name, seed, steps, keep=CURVE_POINTS if with_curve else 1)
    workdir = runs / f"{name}-seed{seed}"
    shutil.rmtree(workdir, ignore_errors=True)  # an unfinished cell starts again
    # other work on the machine slows a run: the load says how much to trust its speed
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    train.train(config, workdir, progress=False)
    seconds = time.perf_counter() - start
    record = {
        "variant": name,
        "seed": seed,
        "steps": steps,
        "parameters": generator_config.parameter_counts(config.generator_config)[
            "total"
        ],
        "train_seconds": round(seconds, 1),
        "steps_per_second": steps_per_second(workdir),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "final_losses": {
            key: round(value, 4)
            for key, value in train.read_metrics(workdir)[-1].items()
            if key in ("d_loss", "g_loss", "r1", "bcr")
        },
        "fdd": round(fdd_of(workdir), 3),
    }
    if with_curve:
        steps_kept = checkpoints.CheckpointStore(workdir, read_only=True).steps()
        record["curve"] = [
            {"step": step, "fdd": round(fdd_of(workdir, step), 3)}
            for step in steps_kept
        ]
    shutil.rmtree(workdir / "checkpoints")  # a few MB each; the figures are kept
    return record


def grid(args) -> None:
    path = args.results / "ablations.json"
    results = load(path, args.steps)
    names = args.only or list(VARIANTS)
    for seed in args.seeds:  # every variant once before any gets a second seed
        for name in names:
            key = f"{name}/seed{seed}"
            if key in results["runs"]:
                continue
            results["runs"][key] = run_cell(name, seed, args.steps, args.runs)
            write_atomically(path, json.dumps(results, indent=2) + "\n")
            print(json.dumps(results["runs"][key]), flush=True)


def curve(args) -> None:
    "The `tiny` recipe's FDD at every tenth of its steps (the shipped model's run)."
    path = args.results / "learning_curve.json"
    config = config_of("default", 0, args.curve_steps, keep=10, grid=False)
    workdir = args.runs / "curve"
    start = time.perf_counter()
    train.train(config, workdir, progress=False)
    seconds = time.perf_counter() - start
    networks, state = train.create_train_state(config)  # step 0: the untrained EMA
    untrained = networks.generator(state.ema_params, state.g_batch_stats)
    z = sampling.sample_latents(
        EVAL_SEED, np.arange(EVAL_SAMPLES), config.generator_config.latent_dim
    )
    points = [
        {
            "step": 0,
            "fdd": round(
                digit_features.fdd_to_reference(sampling.generate(untrained, z)), 3
            ),
        }
    ]
    points += [
        {"step": step, "fdd": round(fdd_of(workdir, step), 3)}
        for step in checkpoints.CheckpointStore(workdir, read_only=True).steps()
    ]
    record = {
        "variant": "default",
        "seed": 0,
        "steps": args.curve_steps,
        "train_seconds": round(seconds, 1),
        "steps_per_second": steps_per_second(workdir),
        "eval_samples": EVAL_SAMPLES,
        "points": points,
    }
    write_atomically(path, json.dumps(record, indent=2) + "\n")
    print(json.dumps(points))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=GRID_STEPS, help="steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=None)
    parser.add_argument(
        "--curve",
        action="store_true",
        help="measure the tiny recipe's learning curve (learning_curve.json) instead",
    )
    parser.add_argument("--curve-steps", type=int, default=2000)
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="folder of the JSON (default experiments/results); runs go beside it",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.curve_steps < 10 or min(args.seeds) < 0:
        parser.error("--steps and --curve-steps must be positive, seeds non-negative")
    cli.tune_allocator()  # as the `hitlib` command does
    # and as it does, keep compiled programs: a variant's later seeds run the same step
    cli.use_compilation_cache()
    args.results = args.results.resolve()
    args.runs = args.results.parent / "runs"
    args.results.mkdir(parents=True, exist_ok=True)
    curve(args) if args.curve else grid(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

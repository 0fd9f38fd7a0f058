"""What each training recipe costs, computed on this CPU from shapes and XLA's compiled analyses; printed as JSON.

For every recipe of `hitlib.recipes.RECIPES` (the `tiny` one too): the parameters of both networks, the FLOPs of one
training step (XLA's cost analysis of the compiled step: discriminator update with R1 and bCR where the recipe uses
it, generator update, EMA) and the peak memory of one device (XLA's memory analysis of the same compiled step:
arguments + temporaries + outputs - donated aliases) for the recipe's batch on 1 device and for its per-device batch
on 8 devices (data parallelism replicates the state and splits the batch, so one device of eight runs the step at
batch B / 8; the all-reduce's buffers, the size of the gradients, are not in that figure), with the generator
computing in float32 and in bfloat16 (the discriminator stays float32 in both).

Measured here: parameters, FLOPs, memory (all exact properties of the compiled program; XLA on a TPU fuses
differently, so its memory can differ). Estimated: the step time on a v5e chip, FLOPs / (197 TFLOP/s bfloat16 peak ×
the utilisation `--utilisation`, default 0.35, an assumption, not a measurement), and from it the days to the recipe's
step count on a v5e-8 (8 chips, per-device batch B / 8).

    python benchmarks/recipe_costs.py --save        # every recipe (about half an hour on 2 cores), resumable
    python benchmarks/recipe_costs.py --recipes tiny

With --save the results go to benchmarks/results/recipe_costs.json, one entry at a time: a rerun skips what is there.
"""
import argparse
import dataclasses
import datetime
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from hitlib import recipes, train

V5E_PEAK_BF16 = 197e12  # FLOP/s of one v5e chip in bfloat16 (Google Cloud's published peak)
V5E_HBM_BYTES = 16e9  # high-bandwidth memory of one v5e chip (16 GB, Google Cloud's published figure)
RESULTS = Path(__file__).resolve().parent / "results" / "recipe_costs.json"


def count(tree) -> int:
    return int(sum(leaf.size for leaf in jax.tree.leaves(tree)))


def compiled_step(config):
    "The recipe's training step compiled for one device at config.batch_size: (compiled, networks, state, seconds)."
    networks, state = train.create_train_state(config)
    step = train.make_train_step(config, networks)
    resolution = config.generator_config.resolution
    batch = jax.ShapeDtypeStruct((config.batch_size, resolution, resolution, 3), jnp.float32)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    return compiled, networks, state, time.perf_counter() - start


def step_cost(config) -> dict:
    compiled, _, state, seconds = compiled_step(config)
    flops = compiled.cost_analysis()
    flops = flops[0] if isinstance(flops, (list, tuple)) else flops
    memory = compiled.memory_analysis()
    peak = (memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes)
    return {"batch": config.batch_size, "flops": float(flops["flops"]), "peak_bytes": int(peak),
            "state_bytes": int(sum(leaf.nbytes for leaf in jax.tree.leaves(state))),
            "temp_bytes": int(memory.temp_size_in_bytes), "compile_seconds": round(seconds, 1)}


def recipe_cost(name: str, utilisation: float, cache: dict) -> dict:
    config = recipes.train_config(name)
    networks, state = train.create_train_state(config)
    result = {"recipe": name, "generator": config.generator, "resolution": config.generator_config.resolution,
              "batch_size": config.batch_size, "steps": config.steps,
              "g_params": count(state.g_params), "d_params": count(state.d_params), "per_device": {}}
    del networks, state
    for devices in (1, 8):
        if config.batch_size % devices:
            continue
        for dtype in ("float32", "bfloat16"):
            local = dataclasses.replace(config, batch_size=config.batch_size // devices,
                                        generator_overrides=config.generator_overrides + (f"compute_dtype={dtype}",))
            key = f"{config.generator}|{local.batch_size}|{local.bcr_weight > 0}|{config.d_channel_multiplier}|{dtype}"
            if key not in cache:
                cache[key] = step_cost(local)
            cost = dict(cache[key])
            cost["v5e_step_seconds_estimated"] = cost["flops"] / (V5E_PEAK_BF16 * utilisation)
            cost["fits_v5e_16gb_estimated"] = cost["peak_bytes"] < V5E_HBM_BYTES
            result["per_device"][f"{devices}x_{dtype}"] = cost
    eight = result["per_device"].get("8x_bfloat16")
    if eight:
        result["v5e8_days_to_paper_steps_estimated"] = config.steps * eight["v5e_step_seconds_estimated"] / 86400
        result["v5e8_images_per_second_estimated"] = config.batch_size / eight["v5e_step_seconds_estimated"]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="*", default=list(recipes.RECIPES))
    parser.add_argument("--utilisation", type=float, default=0.35,
                        help="assumed share of the v5e's bfloat16 peak that the step reaches (default 0.35)")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/recipe_costs.json")
    args = parser.parse_args()
    saved = json.loads(RESULTS.read_text()) if args.save and RESULTS.exists() else {}
    if saved and saved.get("utilisation") != args.utilisation:
        saved = {}
    costs = saved.get("recipes", {})
    cache = saved.get("compiled", {})
    for name in args.recipes:
        if name not in costs:
            costs[name] = recipe_cost(name, args.utilisation, cache)
            if args.save:
                report = {"what": __doc__.split("\n")[0], "date": datetime.date.today().isoformat(),
                          "machine": platform.processor() or platform.machine(), "jax": jax.__version__,
                          "utilisation": args.utilisation, "v5e_peak_bf16_flops": V5E_PEAK_BF16,
                          "measured": ["g_params", "d_params", "flops", "peak_bytes", "state_bytes", "temp_bytes",
                                       "compile_seconds"],
                          "estimated": ["v5e_step_seconds_estimated", "fits_v5e_16gb_estimated", "v5e8_days_to_paper_steps_estimated",
                                        "v5e8_images_per_second_estimated"],
                          "recipes": costs, "compiled": cache}
                RESULTS.parent.mkdir(exist_ok=True)
                RESULTS.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(costs[name]), flush=True)


if __name__ == "__main__":
    main()

"""Training-step speed on this machine, printed as JSON (speed is measured, not asserted).

For each training configuration and batch size: the whole jitted step of `hitlib.train.make_train_step` and its
parts, each jitted alone — the generator's forward pass (training mode) and its forward-and-backward pass, the
discriminator's gradient on reals and fakes, the R1 term's gradient, the generator objective through the
discriminator, the optimiser and EMA updates — with compile time, seconds per call (median), XLA's FLOP count and
the share of this machine's float32 matmul rate, measured in the same run.

    python benchmarks/train_step_speed.py --quick            # tiny, batch 8 (a minute)
    python benchmarks/train_step_speed.py                    # tiny and release-128 at batch 8 (about 10 minutes)
    python benchmarks/train_step_speed.py --save NAME        # also write benchmarks/results/NAME.json
    python benchmarks/train_step_speed.py --options          # also the step of each option that is off by default
    python benchmarks/train_step_speed.py --profile          # also where each program's time goes, by kind of work

To compare two commits side by side, run this file from one checkout with `PYTHONPATH` pointing at the other
(`git worktree add /tmp/old <commit>; PYTHONPATH=/tmp/old python benchmarks/train_step_speed.py`): the script
measures whichever `hitlib` it imports, and records its path. `--malloc tuned` (the default) sets glibc's
malloc as the `hitlib` command does (`hitlib.cli.tune_allocator`); `--malloc glibc` leaves its defaults (and is
what a commit from before `tune_allocator` can run).
"""
import argparse
import collections
import dataclasses
import json
import os
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import hitlib
from hitlib import cli, losses, recipes, train
from hitlib.config import get_config
from hitlib.generator import summary
from hitlib.recipes import TrainConfig

# run as a script, this folder is on sys.path: one home for the two timing helpers
from generator_speed import (forward_program, machine_facts, matmul_flops_per_second, median_seconds,
                             write_result)


# XLA's names for the instructions of a compiled program (`%name = ...` in its text); a CPU thunk
# event in the profiler's trace carries the name of the instruction it runs
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ", re.M)
# each instruction's kind, from its name: XLA names a fusion after the operations it fuses
# (`copy_bitcast_fusion.3`) and a matmul that the CPU backend hands to its matmul library
# `ynn_fusion.N` (XNNPACK's successor), one it emits itself `dot.N` -- a heuristic from names,
# but one that needs no parsing of the program. Order matters: the first match wins.
KINDS = (
    ("matmul", re.compile(r"^(ynn_fusion|dot|convolution)")),
    ("transpose_or_copy", re.compile(r"(copy|transpose)")),
    ("pad_slice_concat", re.compile(r"(pad|slice|concatenate)")),
    ("reduce", re.compile(r"reduce")),
    ("elementwise", re.compile(r".")),
)


def kind_of(instruction: str) -> str:
    return next(kind for kind, pattern in KINDS if pattern.search(instruction))


def profile(compiled, args):
    """Where one call of `compiled(*args)` spends its time, from JAX's profiler: the seconds of
    XLA's thunks on the CPU summed by kind of work (two threads may run two thunks at once, so
    the sum may exceed the call's wall time), and the five slowest instructions."""
    from jax.profiler import ProfileData

    names = set(_INSTRUCTION.findall(compiled.as_text()))
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            jax.block_until_ready(compiled(*args))
        traces = list(Path(folder).rglob("*.xplane.pb"))
        data = ProfileData.from_file(str(traces[-1]))
        seconds = collections.Counter()
        for plane in data.planes:
            for line in plane.lines if plane.name == "/host:CPU" else ():
                for event in line.events:
                    if event.name in names:
                        seconds[event.name] += event.duration_ns / 1e9
    by_kind = collections.Counter()
    for name, value in seconds.items():
        by_kind[kind_of(name)] += value
    total = sum(by_kind.values())
    return {"thunk_seconds": round(total, 3),
            "by_kind": {kind: {"seconds": round(value, 3), "share": round(value / total, 3)}
                        for kind, value in by_kind.most_common()} if total else {},
            "slowest": {name: round(value, 3) for name, value in seconds.most_common(5)}}


def measure(fn, args, repeats, peak, jitted=None, profiled=False, flops=None):
    """Compile time, seconds per call, XLA's FLOPs and the share of the matmul rate of `fn(*args)`;
    `matmul_floor_seconds`: the FLOPs at the matmul rate (no program of them can be faster);
    profiled: also `profile` on a CPU. flops: the program's FLOPs where XLA's count of the
    compiled program is wrong (it counts a loop's body once)."""
    jitted = jax.jit(fn) if jitted is None else jitted
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", 0.0)) if flops is None else float(flops)
    jax.block_until_ready(compiled(*args))  # warm-up
    seconds = median_seconds(lambda: jax.block_until_ready(compiled(*args)), repeats)
    result = {"compile_seconds": round(compile_seconds, 2), "seconds": round(seconds, 4),
              "gflops": round(flops / 1e9, 2),
              "fraction_of_matmul_rate": round(flops / seconds / peak, 3),
              "matmul_floor_seconds": round(flops / peak, 4)}
    if profiled and jax.default_backend() == "cpu":
        result["profile"] = profile(compiled, args)
    return result


def training_config(name, batch):
    """`tiny`: the recipe `hitlib train` runs by default; `release-128`: the release's ImageNet-128
    generator with the paper's discriminator, R1 γ = 10, both Adam (the issue's measurement)."""
    if name == "tiny":
        return recipes.train_config("tiny", batch_size=batch)
    return TrainConfig(generator=name, batch_size=batch, r1_gamma=10.0)


# The training step's options, each off by default: the step it changes, measured beside the default one.
OPTIONS = {
    # lazy R1 (r1_every=16): the program of the 15 steps in 16 that skip R1
    "step_between_lazy_r1": (dict(r1_every=16), 1),
    # the release's simultaneous updates: G's gradient through the D before its update
    "step_simultaneous_updates": (dict(updates="simultaneous"), 0),
}


def step_parts(name, batch, repeats, peak, options=False, profiled=False):
    "Every part of one training step of configuration `name` at `batch`, and the whole step."
    config = training_config(name, batch)
    networks, state = train.create_train_state(config)
    size = networks.resolution
    real = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), minval=-1.0, maxval=1.0)
    z = jax.random.normal(jax.random.key(0), (batch, networks.latent_dim))

    def generate(g_params, z):
        return networks.generator(g_params, state.g_batch_stats)(z, train=True)

    fake = jax.jit(lambda p, z: generate(p, z))(state.g_params, z)  # its own compilation

    def d_adversarial(d_params, real, fake):
        d = networks.discriminator(d_params)
        return losses.discriminator_loss(d(real), d(fake), config.loss)

    def r1(d_params, real):
        return losses.r1_penalty(networks.discriminator(d_params), real, config.r1_gamma)

    def g_objective(images, d_params):
        return losses.generator_loss(networks.discriminator(d_params)(images), config.loss)

    def updates(state, g_grads, d_grads):
        g_step, _ = networks.g_tx.update(g_grads, state.g_opt_state, state.g_params)
        d_step, _ = networks.d_tx.update(d_grads, state.d_opt_state, state.d_params)
        g_params = optax.apply_updates(state.g_params, g_step)
        ema = train.ema_update(state.ema_params, g_params, state.step + 1, config.ema_decay,
                               config.ema_start)
        return g_params, optax.apply_updates(state.d_params, d_step), ema

    parts = {
        "generator_forward": (generate, (state.g_params, z)),
        "generator_forward_backward": (
            jax.grad(lambda p, z: jnp.sum(generate(p, z) ** 2)), (state.g_params, z)),
        "discriminator_real_and_fake": (jax.grad(d_adversarial), (state.d_params, real, fake)),
        "r1_penalty": (jax.grad(r1), (state.d_params, real)),
        "generator_objective_through_d": (jax.grad(g_objective), (fake, state.d_params)),
        "optimiser_and_ema": (updates, (state, state.g_params, state.d_params)),
    }
    result = {"config": name, "resolution": size, "batch": batch, "parts": {}}
    for part, (fn, args) in parts.items():
        result["parts"][part] = measure(fn, args, repeats, peak, profiled=profiled)
        print(json.dumps({name: batch, part: result["parts"][part]}), flush=True)
    step = train.make_train_step(config, networks, donate=False)
    result["step"] = measure(None, (state, real), max(1, repeats - 1), peak, jitted=step,
                             profiled=profiled)
    print(json.dumps({name: batch, "step": result["step"]}), flush=True)
    for option, (fields, step_number) in OPTIONS.items() if options else ():
        variant = dataclasses.replace(config, **fields)
        at = state.replace(step=jnp.asarray(step_number, jnp.int32))
        step = train.make_train_steps(variant, networks, donate=False)(step_number)
        result[option] = measure(None, (at, real), max(1, repeats - 1), peak, jitted=step,
                                 profiled=profiled)
        print(json.dumps({name: batch, option: result[option]}), flush=True)
    return result


def inference_forward(preset, batch, repeats, peak, profiled=False):
    """The generator's jitted inference forward pass (`train=False`) of `preset` at `batch`. Its
    FLOPs are the model's (chapter 7b's `summary`, as `generator_speed.py` counts them): the
    compiled program runs the high-resolution stages tile by tile in a loop, whose body XLA's
    cost analysis counts once."""
    config = get_config(preset)
    forward, args = forward_program(config, batch)
    flops = summary(config)["flops"] * batch
    result = {"preset": preset, "batch": batch,
              **measure(None, args, repeats, peak, jitted=forward, profiled=profiled,
                        flops=flops)}
    print(json.dumps(result), flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny, batch 8 only")
    parser.add_argument("--configs", nargs="*", default=["tiny", "release-128"],
                        help="training configurations whose step to time (none: only --forward)")
    parser.add_argument("--batches", nargs="+", type=int, default=[8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--save", metavar="NAME", help="write benchmarks/results/NAME.json")
    parser.add_argument("--options", action="store_true",
                        help="also time the step of each option that is off by default (lazy R1, simultaneous)")
    parser.add_argument("--forward", nargs="*", default=[], metavar="PRESET:BATCH",
                        help="also the inference forward pass of these generators (e.g. release-256:32)")
    parser.add_argument("--profile", action="store_true",
                        help="also where each program's time goes on a CPU, by kind of work (JAX's profiler)")
    parser.add_argument("--malloc", choices=["tuned", "glibc"], default="tuned",
                        help="malloc as the hitlib command sets it (default), or glibc's defaults")
    args = parser.parse_args()
    if args.malloc == "tuned" and not hasattr(cli, "tune_allocator"):
        parser.error("--malloc tuned: this hitlib predates tune_allocator; use --malloc glibc")
    if args.malloc == "tuned" and not cli.tune_allocator():
        parser.error("--malloc tuned: this C library is not glibc, or MALLOC_* is set")
    load_before = os.getloadavg()
    peak = matmul_flops_per_second()
    configs = ["tiny"] if args.quick else args.configs
    batches = [8] if args.quick else args.batches
    runs = [step_parts(config, batch, args.repeats, peak, args.options, args.profile)
            for config in configs for batch in batches]
    result = {**machine_facts(), "hitlib": str(Path(hitlib.__file__).resolve().parent),
              "malloc": args.malloc, "load_average_before": [round(x, 2) for x in load_before],
              "matmul_gflops_per_second": round(peak / 1e9, 1), "runs": runs}
    forwards = [spec.rsplit(":", 1) for spec in args.forward]
    if forwards:
        result["inference_forward"] = [
            inference_forward(preset, int(batch), args.repeats, peak, args.profile)
            for preset, batch in forwards]
    write_result(result, args.save)


if __name__ == "__main__":
    main()

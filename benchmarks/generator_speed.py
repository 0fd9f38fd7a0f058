"""Generator speed on this machine, printed as JSON (issue: speed is measured, not asserted).

For each configuration and batch size: compile time, images per second, the model's FLOPs per image, the achieved
FLOP/s and its ratio to this machine's own float32 matmul rate, measured by the same script. Also the time per image of
HiT-B at 256 vs 1024 (the paper claims a cost nearly linear in the number of pixels).

    python benchmarks/generator_speed.py                 # the full run (several minutes on 2 cores)
    python benchmarks/generator_speed.py --quick         # tiny config only, for a smoke test
    python benchmarks/generator_speed.py --save          # also write benchmarks/results/generator_speed.json

The matmul rate is measured before and after the generator runs; both are reported, with the machine's load average,
because a busy machine (another process on the cores) lowers every figure. Fractions use the faster of the two.
"""
import argparse
import datetime
import os
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from hitlib.config import get_config
from hitlib.generator import Generator, summary


def median_seconds(fn, repeats):
    "Median wall time of `fn()` (which must block until its result is ready) over `repeats` calls."
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops_per_second(size=2048, repeats=10):
    "This machine's float32 matmul rate: a jitted size x size x size matmul, 2·size³ FLOPs."
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    return 2 * size**3 / median_seconds(lambda: matmul(a, b).block_until_ready(), repeats)


def forward_program(config, batch):
    """(jitted inference forward pass of a freshly initialised `config` generator, its arguments
    (weights, latents [batch, latent_dim])): the program every forward timing here measures."""
    graphdef, state = nnx.split(Generator(config, rngs=nnx.Rngs(0)))

    @jax.jit
    def forward(state, z):
        return nnx.merge(graphdef, state)(z, train=False)

    z = jax.random.normal(jax.random.key(0), (batch, config.latent_dim), jnp.float32)
    return forward, (state, z)


def forward_seconds(config, batch, repeats):
    "(compile seconds, median seconds per call) of a jitted inference forward pass of `config` at `batch`."
    forward, args = forward_program(config, batch)
    start = time.perf_counter()
    compiled = forward.lower(*args).compile()
    compile_seconds = time.perf_counter() - start
    compiled(*args).block_until_ready()  # warm-up
    return compile_seconds, median_seconds(lambda: compiled(*args).block_until_ready(), repeats)


def cpu_model():
    """The processor's model name and its widest vector and matrix extensions, from /proc/cpuinfo
    (Linux; None elsewhere): two machines of the same size can differ twofold in matmul rate."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    wide = [flag for flag in ("avx2", "avx512f", "amx_tile", "amx_bf16") if flag in flags]
    return " ".join([fields.get("model name", "?")] + wide)


def machine_facts():
    "The date, JAX and the machine a measurement ran on, for its JSON."
    return {"date": datetime.date.today().isoformat(), "jax": jax.__version__, "cpu_count": os.cpu_count(),
            "platform": platform.processor() or platform.machine(), "cpu_model": cpu_model(),
            "device": jax.devices()[0].device_kind, "num_devices": jax.device_count()}


def write_result(result, name):
    "Print `result` as JSON, and write it to benchmarks/results/NAME.json if `name`."
    print(json.dumps(result, indent=2))
    if name:
        path = Path(__file__).resolve().parent / "results" / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


def generator_speed(preset, batch, repeats, peak):
    "Compile time, images/s, FLOPs/image and the achieved fraction of the matmul rate of a jitted forward pass."
    config = get_config(preset)
    compile_seconds, seconds = forward_seconds(config, batch, repeats)
    # The model's FLOPs (XLA's count of the untiled computation, chapter 7b's `summary`), not the compiled program's:
    # XLA's cost analysis counts the body of the tiled stages' loop once, whatever its trip count.
    flops = summary(config)["flops"] * batch
    return {
        "config": preset, "resolution": config.resolution, "batch": batch,
        "compile_seconds": round(compile_seconds, 2), "seconds_per_batch": round(seconds, 4),
        "images_per_second": round(batch / seconds, 3), "gflops_per_image": round(flops / batch / 1e9, 3),
        "achieved_gflops_per_second": round(flops / seconds / 1e9, 1),
        "fraction_of_matmul_rate": round(flops / seconds / peak, 3),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config, batch 1 and 8 only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/generator_speed.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    peak = matmul_flops_per_second()
    runs = []
    presets = {"tiny": (1, 8)} if args.quick else {"tiny": (1, 8, 32), "release-128": (1, 8, 32),
                                                     "hit-b-256": (1, 8, 32)}
    for preset, batches in presets.items():
        for batch in batches:
            runs.append(generator_speed(preset, batch, args.repeats, peak))
    peak_after = matmul_flops_per_second()
    roofline = max(peak, peak_after)  # the faster of the two: the conservative denominator
    for run in runs:
        run["fraction_of_matmul_rate"] = round(run["achieved_gflops_per_second"] * 1e9 / roofline, 3)
    result = {**machine_facts(), "load_average_before": [round(x, 2) for x in load_before],
              "matmul_gflops_per_second_after": round(peak_after / 1e9, 1),
              "matmul_gflops_per_second": round(roofline / 1e9, 1),
              "matmul_gflops_per_second_before": round(peak / 1e9, 1), "runs": runs}
    if not args.quick:
        at_256 = generator_speed("hit-b-256", 1, args.repeats, peak)
        at_1024 = generator_speed("hit-b-1024", 1, max(1, args.repeats - 1), peak)
        per_image = (at_1024["seconds_per_batch"], at_256["seconds_per_batch"])
        result["hit_b_1024_vs_256"] = {
            "seconds_per_image_256": per_image[1], "seconds_per_image_1024": per_image[0],
            "time_ratio": round(per_image[0] / per_image[1], 2), "pixel_ratio": 16,
            "flops_ratio": round(at_1024["gflops_per_image"] / at_256["gflops_per_image"], 2),
        }
    write_result(result, "generator_speed" if args.save else None)


if __name__ == "__main__":
    main()

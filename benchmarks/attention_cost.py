"""Cost of one self-attention layer against the number of tokens, printed as JSON (chapter 3, section 3.2).

For square maps of side 8, 16, ... and each of Table 5's variants (full, axial, blocked local, multi-axis; balanced
block sizes for the blocked ones): the best wall time of a jitted `hitlib.multi_axis` layer (projections included), the
exact multiply-add counts of `attention_flops` (attention core alone and with the projections), the achieved rate, and
the log-log slopes of time and multiply-adds against the number of tokens N, fitted over the three largest maps of each
variant. Section 3.2 claims O(N²) for full attention and O(N·√N) for balanced multi-axis attention.

Timing rounds are interleaved (every variant and size once per round, best of the rounds), so that a burst of load on a
shared machine hits all of them alike.

    python benchmarks/attention_cost.py                      # sides 8 ... 256; full attention up to 64 (about a minute)
    python benchmarks/attention_cost.py --quick              # sides 8 ... 32, for a smoke test
    python benchmarks/attention_cost.py --full-max-side 128  # full attention at 128×128 needs ~10 GB and much time
"""
import argparse
import json
import os
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from hitlib.blocking import block
from hitlib.multi_axis import attention_flops, axial_attention, full_attention, multi_axis_attention, regional_attention
from hitlib.reference.attention import init_attention_params
from hitlib.reference.blocking import balanced_block_size

LAYERS = {"full": full_attention, "axial": axial_attention, "blocked_local": regional_attention,
          "multi_axis": multi_axis_attention}
BLOCKED = ("blocked_local", "multi_axis")


def slope(xs, ys):
    "Least-squares slope of log(ys) against log(xs)."
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="sides 8, 16, 32 only")
    parser.add_argument("--max-side", type=int, default=256, help="largest map side for the sparse variants")
    parser.add_argument("--full-max-side", type=int, default=64, help="largest map side for full attention")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    max_side = 32 if args.quick else args.max_side
    sides = [s for s in (8, 16, 32, 64, 128, 256, 512) if s <= max_side]
    params = jax.tree.map(jnp.asarray, init_attention_params(np.random.default_rng(0), args.channels, args.heads))

    cases = []  # (kind, side, jitted function, input)
    for side in sides:
        image = jnp.asarray(np.random.default_rng(side).standard_normal((args.batch, side, side, args.channels)),
                            jnp.float32)
        p = balanced_block_size(side, side)
        for kind, fn in LAYERS.items():
            if kind == "full" and side > args.full_max_side:
                continue
            cases.append((kind, side, jax.jit(fn), block(image, p) if kind in BLOCKED else image))

    compile_seconds = {}
    for kind, side, fn, x in cases:
        start = time.perf_counter()
        jax.block_until_ready(fn(x, params))  # compile and run once
        compile_seconds[kind, side] = time.perf_counter() - start
    best = {(kind, side): float("inf") for kind, side, _, _ in cases}
    for _ in range(args.rounds):
        for kind, side, fn, x in cases:
            start = time.perf_counter()
            jax.block_until_ready(fn(x, params))
            best[kind, side] = min(best[kind, side], time.perf_counter() - start)

    results = {}
    for kind in LAYERS:
        kind_sides = [side for k, side, _, _ in cases if k == kind]
        tokens = [s * s for s in kind_sides]
        seconds = [best[kind, s] for s in kind_sides]
        core = [args.batch * attention_flops(kind, s, s, args.channels, args.heads, balanced_block_size(s, s))
                for s in kind_sides]
        total = [args.batch * attention_flops(kind, s, s, args.channels, args.heads, balanced_block_size(s, s),
                                              projections=True) for s in kind_sides]
        results[kind] = {
            "sides": kind_sides, "tokens": tokens,
            "block_sizes": [balanced_block_size(s, s) for s in kind_sides] if kind in BLOCKED else None,
            "ms": [round(t * 1e3, 3) for t in seconds],
            "compile_s": [round(compile_seconds[kind, s], 2) for s in kind_sides],
            "mmacs_core": [round(f / 1e6, 3) for f in core],
            "mmacs_with_projections": [round(f / 1e6, 3) for f in total],
            "gmacs_per_second": [round(f / t / 1e9, 2) for f, t in zip(total, seconds)],
            "slope_time_top3": round(slope(tokens[-3:], seconds[-3:]), 3),
            "slope_macs_core_top3": round(slope(tokens[-3:], core[-3:]), 3),
            "slope_macs_with_projections_top3": round(slope(tokens[-3:], total[-3:]), 3),
        }
    common = [s for s in results["full"]["sides"]]
    ratio_side = common[-1]
    index = results["multi_axis"]["sides"].index(ratio_side)
    summary = {
        "full_over_multi_axis_side": ratio_side,
        "time_ratio": round(results["full"]["ms"][-1] / results["multi_axis"]["ms"][index], 1),
        "macs_with_projections_ratio": round(results["full"]["mmacs_with_projections"][-1]
                                             / results["multi_axis"]["mmacs_with_projections"][index], 1),
    }
    text = json.dumps({"device": jax.devices()[0].device_kind, "platform": platform.processor() or platform.machine(),
                       "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
                       "jax": jax.__version__, "channels": args.channels, "heads": args.heads, "batch": args.batch,
                       "rounds": args.rounds, "results": results, "full_vs_multi_axis": summary}, indent=1)
    print(re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda match: "[" + " ".join(match.group(1).split()) + "]", text))


if __name__ == "__main__":
    main()

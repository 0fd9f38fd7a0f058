"""The generator's time per image against its output resolution, printed as JSON (speed is measured, not asserted).

The paper says HiT "has a nearly linear computational complexity with respect to the image size". This measures it:
HiT-B (the stages of `hit-b-1024`, cut after the stage of each resolution, 8 to 1024 pixels;
at 8 the one stage makes the RGB image and has no attention) and the same generator
with full self-attention in every stage but the last (the one that turns tokens into RGB, which has no self-attention
in HiT either), where full attention's weights fit in `--max-attention-gb`. For each: XLA's FLOPs per image (chapter
7b's `summary`, from shapes), the median seconds of a jitted forward pass of one image, and its compile time.

    python benchmarks/resolution_scaling.py                  # 8 ... 1024 (several minutes on 2 cores)
    python benchmarks/resolution_scaling.py --max-resolution 128 --save NAME
"""
import argparse
import json
import os


from hitlib import config as generator_config
from hitlib.generator import summary

# run as a script, this folder is on sys.path: one home for the timing helpers
from generator_speed import forward_seconds, machine_facts, write_result

PRESET = "hit-b-1024"


def generator_at(resolution: int, attention: str) -> generator_config.GeneratorConfig:
    """HiT-B's first stages up to `resolution`; the last one without self-attention (it
    makes the RGB image). attention: "multi_axis" (HiT-B's) or "full" in the others."""
    full = generator_config.get_config(PRESET)
    n = generator_config.stages_for_resolution(resolution)
    blocks = list(full.block_sizes[:n])
    blocks[-1] = None
    if attention == "full":  # full attention ignores the block size, but a stage needs one to attend
        blocks = [4] * (n - 1) + [None]
    lists = {"widths": full.widths, "num_layers": full.num_layers, "num_heads": full.num_heads}
    overrides = [f"resolution={resolution}"] + [
        f"{key}={','.join(str(v) for v in values[:n])}" for key, values in lists.items()
    ]
    overrides.append("block_sizes=" + ",".join("none" if b is None else str(b) for b in blocks))
    overrides.append("attention=" + ",".join([attention] * n))
    return generator_config.get_config(PRESET, overrides)


def attention_gb(config) -> float:
    "The largest self-attention layer's weights for one image (all heads), float32, in GB."
    tokens = [(8 * 2**i) ** 2 for i, block in enumerate(config.block_sizes) if block is not None]
    heads = [h for h, block in zip(config.num_heads, config.block_sizes) if block is not None]
    if config.attention[0] != "full":
        return 0.0  # multi-axis: blocks of a few dozen tokens (chapter 5)
    return max((h * n * n * 4 / 1e9 for h, n in zip(heads, tokens)), default=0.0)


def forward_time(config, repeats: int) -> dict:
    "Compile time and median seconds of a jitted forward pass of one image."
    compile_seconds, seconds = forward_seconds(config, 1, repeats)
    return {"compile_seconds": round(compile_seconds, 2), "seconds_per_image": round(seconds, 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-resolution", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-attention-gb", type=float, default=8.0,
                        help="skip a full-attention generator whose largest attention weights exceed this")
    parser.add_argument("--save", metavar="NAME", help="also write benchmarks/results/NAME.json")
    args = parser.parse_args()
    resolutions = [r for r in (8, 16, 32, 64, 128, 256, 512, 1024) if r <= args.max_resolution]
    if not resolutions:
        parser.error(f"--max-resolution {args.max_resolution}: nothing to measure below 8")
    load_before = os.getloadavg()
    rows = []
    for attention in ("multi_axis", "full"):
        for resolution in resolutions:
            config = generator_at(resolution, attention)
            row = {"attention": attention, "resolution": resolution,
                   "gflops_per_image": round(summary(config)["flops"] / 1e9, 3),
                   "attention_gb": round(attention_gb(config), 3)}
            if row["attention_gb"] > args.max_attention_gb:
                row["skipped"] = f"full attention's weights need {row['attention_gb']:.0f} GB per image"
            else:
                row.update(forward_time(config, args.repeats))
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {**machine_facts(), "preset": PRESET, "load_average_before": [round(x, 2) for x in load_before],
              "rows": rows}
    write_result(result, args.save)


if __name__ == "__main__":
    main()

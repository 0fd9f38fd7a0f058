"""Can the input pipeline keep a TPU fed? Images per second of `hitlib train`'s own pipeline, printed as JSON.

Measured here: prepared shards of random images at 128 (ImageNet: stored 146×146, random 128 crops and flips) and
256 (FFHQ: 256×256, flips) are read exactly as `hitlib.train.train` reads them — `hitlib.data.make_dataset` over a
`ShardedArraySource`, batches of 64 through `iterate_batches` with Grain threads — with 1 thread and with one per core,
after a warm-up; the shards are first read once so they sit in the page cache (a TPU host reads them from a local disk
or its page cache the same way). The figure per core is the one-thread rate.

Estimated: what a v5e-8 consumes when training HiT-B at 256 (`ffhq-256`, batch 256) or the ImageNet model at 128
(`imagenet-128`), from `benchmarks/results/recipe_costs.json` (run `recipe_costs.py --save` first): images per second
= batch / estimated step time, and the host cores that takes at the measured rate per core.

    python benchmarks/input_pipeline.py --save      # writes benchmarks/results/input_pipeline.json
"""
import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from hitlib import data

RESULTS = Path(__file__).resolve().parent / "results"
V5E8_HOST_VCPUS = 224  # a v5e-8 TPU VM (machine type ct5lp-hightpu-8t): 224 vCPUs


def write_shards(folder: Path, count: int, resolution: int, crop_fraction: float, seed: int = 0) -> Path:
    "Shards in hitlib's format (what `hitlib prepare` writes) of `count` random images, without decoding any file."
    size = data.storage_size(resolution, crop_fraction)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shards, per_shard = [], 1024
    for index, start in enumerate(range(0, count, per_shard)):
        n = min(per_shard, count - start)
        name = f"images-{index:05d}.npy"
        np.save(folder / name, rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
        shards.append({"images": name, "count": n})
    manifest = {"format": data.SHARDS_FORMAT, "source": "random", "resolution": resolution,
                "crop_fraction": crop_fraction, "size": size, "count": count, "shards": shards, "class_names": None,
                "skipped": [], "upscaled": 0}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def images_per_second(source, resolution: int, threads: int, batch: int, batches: int) -> float:
    dataset = data.make_dataset(source, batch, seed=0, resolution=resolution, flip=True)
    iterator = data.iterate_batches(dataset, 0, batches + 4, num_threads=threads)
    for _ in range(4):  # warm-up: threads started, buffers full
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batch * batches / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4096, help="images per dataset (default 4096)")
    parser.add_argument("--batches", type=int, default=40, help="timed batches of 64 (default 40)")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    costs_path = RESULTS / "recipe_costs.json"
    costs = json.loads(costs_path.read_text())["recipes"] if costs_path.exists() else {}
    report = {"what": __doc__.split("\n")[0], "date": datetime.date.today().isoformat(),
              "machine": platform.processor() or platform.machine(), "cores": cores,
              "load_average_before": os.getloadavg()[0], "batch": 64, "datasets": []}
    with tempfile.TemporaryDirectory() as scratch:
        for recipe, resolution, crop in (("imagenet-128", 128, data.IMAGENET_CROP_FRACTION), ("ffhq-256", 256, 1.0)):
            source = data.ShardedArraySource(write_shards(Path(scratch) / recipe, args.images, resolution, crop))
            for i in range(len(source)):  # into the page cache
                source[i]
            one = images_per_second(source, resolution, 1, 64, args.batches)
            many = images_per_second(source, resolution, cores, 64, args.batches)
            entry = {"recipe": recipe, "resolution": resolution, "stored": source.size,
                     "augmentation": "random crop + flip" if crop < 1 else "flip",
                     "images_per_second_1_thread": one, f"images_per_second_{cores}_threads": many,
                     "images_per_second_per_core": one}
            if recipe in costs and "v5e8_images_per_second_estimated" in costs[recipe]:
                needed = costs[recipe]["v5e8_images_per_second_estimated"]
                entry.update(v5e8_images_per_second_estimated=needed,
                             v5e8_host_cores_needed_estimated=needed / one,
                             v5e8_host_vcpus=V5E8_HOST_VCPUS,
                             keeps_up_estimated=bool(needed / one <= V5E8_HOST_VCPUS / 2))
            report["datasets"].append(entry)
            print(json.dumps(entry), flush=True)
    report["load_average_after"] = os.getloadavg()[0]
    if args.save:
        (RESULTS / "input_pipeline.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

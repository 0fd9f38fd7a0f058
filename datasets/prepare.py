"""Prepare the paper's datasets (or any image folder) as `.npy` shards that `hitlib.data.ShardedArraySource` reads.

Each image is decoded once (any PNG/JPEG pixel format -> RGB), its centre square resized to S×S (PIL Lanczos when
shrinking, bicubic when enlarging) and written to `OUT/images-KKKKK.npy` (uint8 [n, S, S, 3]), with
`OUT/labels-KKKKK.npy` (int32 [n]) for ImageNet, `OUT/files.txt` (the source files in order) and `OUT/manifest.json`
last. S is the resolution, except for ImageNet, stored at round(R / 0.875) (146 for R = 128) so that training can take
random R×R crops (proportion 0.875) and evaluation the centre crop. See chapter 11a and datasets/README.md.

    python datasets/prepare.py ffhq     images1024x1024 /data/ffhq256       --resolution 256
    python datasets/prepare.py celebahq celeba_hq       /data/celebahq256   --resolution 256
    python datasets/prepare.py imagenet-train ILSVRC2012/train /data/in128-train --resolution 128
    python datasets/prepare.py imagenet-val   ILSVRC2012/val   /data/in128-val   --classes-from /data/in128-train \\
        [--labels-csv LOC_val_solution.csv]
    python datasets/prepare.py folder   my_images       /data/mine128       --resolution 128 [--crop-fraction F] \\
        [--labels subfolders]

Common options: --workers N (decoding processes, default: all cores), --shard-size N (images per shard, default 4096),
--skip-bad (leave unreadable files out and list them in the manifest instead of stopping at the first one).
"""
import argparse
import json
import os
import sys
from pathlib import Path

from hitlib import data

IMAGENET_CROP_FRACTION = 0.875  # random crops of proportion 0.875 for training, the centre crop for evaluation


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("kind", choices=["ffhq", "celebahq", "imagenet-train", "imagenet-val", "folder"])
    parser.add_argument("source", type=Path, help="the folder of images")
    parser.add_argument("output", type=Path, help="a new (or empty) folder for the shards")
    parser.add_argument("--resolution", type=int, help="side trained on (default: 256, ImageNet 128)")
    parser.add_argument("--crop-fraction", type=float, help="only for 'folder' (default 1)")
    parser.add_argument("--labels", choices=["subfolders"], help="only for 'folder': class = first-level subfolder")
    parser.add_argument("--classes-from", type=Path, help="imagenet-val: the prepared training set (its class list)")
    parser.add_argument("--labels-csv", type=Path, help="imagenet-val, flat layout: 'name,synset ...' per line")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes (0: in this one)")
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--skip-bad", action="store_true", help="leave unreadable files out (listed in the manifest)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    imagenet = args.kind.startswith("imagenet")
    options = dict(resolution=args.resolution or (128 if imagenet else 256), shard_size=args.shard_size,
                   workers=args.workers, skip_bad=args.skip_bad, progress=not args.quiet)
    if args.kind != "folder" and (args.crop_fraction is not None or args.labels is not None):
        raise SystemExit("--crop-fraction and --labels are fixed for the named datasets; use 'folder' to choose them")
    if args.kind != "imagenet-val" and (args.classes_from or args.labels_csv):
        raise SystemExit("--classes-from and --labels-csv are for imagenet-val")
    if args.kind == "folder":
        options.update(crop_fraction=args.crop_fraction or 1.0, labels=args.labels)
    elif args.kind == "imagenet-train":
        options.update(crop_fraction=IMAGENET_CROP_FRACTION, labels="subfolders")
    elif args.kind == "imagenet-val":
        if args.classes_from is None:
            raise SystemExit("imagenet-val needs --classes-from, the prepared training set (for its class order)")
        class_names = data.ShardedArraySource(args.classes_from).class_names
        options.update(crop_fraction=IMAGENET_CROP_FRACTION, class_names=class_names)
        if args.labels_csv:
            options.update(labels="mapping", label_of=data.read_label_file(args.labels_csv))
        else:
            options.update(labels="subfolders")
    manifest = data.prepare_image_folder(args.source, args.output, **options)
    summary = {key: manifest[key] for key in ("count", "resolution", "size", "crop_fraction")}
    summary.update(shards=len(manifest["shards"]), skipped=len(manifest["skipped"]),
                   classes=len(manifest["class_names"]) if manifest["class_names"] else None)
    print(f"{args.output}: {json.dumps(summary)}")
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])

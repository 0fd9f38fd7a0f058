"""Prepare the paper's datasets (or any image folder) as `.npy` shards that `hitlib train --data` reads.

The same as `hitlib prepare` (chapter 13; the code is `hitlib.data.prepare_image_folder`, chapter 11a), kept here
beside the data it documents. See datasets/README.md.

    python datasets/prepare.py ffhq     images1024x1024 /data/ffhq256       --resolution 256
    python datasets/prepare.py celebahq celeba_hq       /data/celebahq256   --resolution 256
    python datasets/prepare.py imagenet-train ILSVRC2012/train /data/in128-train --resolution 128
    python datasets/prepare.py imagenet-val   ILSVRC2012/val   /data/in128-val   --classes-from /data/in128-train \\
        [--labels-csv LOC_val_solution.csv]
    python datasets/prepare.py folder   my_images       /data/mine128       --resolution 128 [--crop-fraction F] \\
        [--labels subfolders]
"""
import sys

from hitlib import cli

if __name__ == "__main__":
    sys.exit(cli.main(["prepare", *sys.argv[1:]]))

"""Convert pytorch-fid's FID Inception weights into the `.npz` file that `hitlib.inception` loads.

Run once, on a machine with PyTorch (the CPU build is enough; torchvision and pytorch-fid are not needed):

    python scripts/convert_inception_weights.py pt_inception-2015-12-05-6726825d.pth \\
        --output ~/.cache/hitlib/fid_inception_v3.npz

The input is the file pytorch-fid downloads (`pytorch_fid.inception.FID_WEIGHTS_URL`,
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth): the
2015-12-05 TensorFlow Inception graph's weights in torchvision's layout. It is read with
`torch.load(..., weights_only=True)`, which loads tensors only and refuses to run code from the pickle. The output is a
plain, uncompressed `.npz` of float32 arrays keyed like `Mixed_5b/branch1x1/conv/kernel` (channels-last kernels
`[k_h, k_w, C_in, C_out]`, `fc/kernel` `[2048, 1008]`); `hitlib.inception.load_inception_weights` reads it with
`allow_pickle=False` and checks every key and shape. Any missing, unexpected or misshapen key stops the conversion with
its name. The default output path is where `load_inception_weights()` looks when given no path and
$HITLIB_INCEPTION_WEIGHTS is unset.
"""
import argparse
import sys
from pathlib import Path

from hitlib.inception import (DEFAULT_WEIGHTS_PATH, HOW_TO_GET_WEIGHTS, load_inception_weights, save_inception_weights,
                              torch_to_flax_weights)


def read_torch_state_dict(source) -> dict:
    "pytorch-fid's `.pth` -> {name: NumPy array}, via torch.load(weights_only=True) (no code from the pickle runs)."
    import torch

    state_dict = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{source}: expected a state_dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    not_tensors = [name for name, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{source}: entry {not_tensors[0]!r} is not a tensor")
    return {name: value.detach().cpu().numpy() for name, value in state_dict.items()}


def convert(source, output) -> Path:
    "Convert `source` (.pth) to `output` (.npz), then load the result once to check it; returns the output path."
    flat = torch_to_flax_weights(read_torch_state_dict(source))
    path = save_inception_weights(output, flat)
    load_inception_weights(path)  # validates every key and shape of what was written
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="pytorch-fid's weights file, pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--output", default=str(DEFAULT_WEIGHTS_PATH),
                        help=f"the .npz to write (default: {DEFAULT_WEIGHTS_PATH})")
    args = parser.parse_args(argv)
    if not Path(args.source).expanduser().is_file():
        print(f"error: no file {args.source}. {HOW_TO_GET_WEIGHTS}", file=sys.stderr)
        return 2
    try:
        import torch  # noqa: F401
    except ImportError:
        print("error: reading a .pth file needs PyTorch (its CPU build is enough): pip install torch", file=sys.stderr)
        return 2
    path = convert(Path(args.source).expanduser(), args.output)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
